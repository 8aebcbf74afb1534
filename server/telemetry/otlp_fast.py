"""Exporting `InferTrace` records: encoded straight to OTLP protobuf, or as SDK spans.

With `--tracing otlp`, `SpanChunker` encodes finished records on the event loop into the open
`EncodedChunk` (the spans of an OTLP export request, as bytes) with
server.telemetry.otlp_wire's `InferTraceEncoder`. A full chunk (1024 requests or 2 MiB) or one
0.5 s old goes to server.telemetry.otlp_async's sender, which sends its bytes as they are from
the event loop.

`ExpandingSpanExporter` wraps any other exporter (console, in-memory) and hands it SDK spans.

The exporter family is pinned to one version (pyproject.toml): the encoder uses private helpers
of opentelemetry-exporter-otlp-proto-common and the sender reads the SDK exporter's parsed
settings; tests catch a change.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from typing import Any

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from server.telemetry.infer_trace import InferTrace
from server.telemetry.otlp_wire import InferTraceEncoder

__all__ = [
    "EncodedChunk",
    "ExpandingSpanExporter",
    "InferTraceEncoder",
    "SpanChunker",
]


class EncodedChunk:
    """Records already encoded (on the event loop): one export request's worth of spans."""

    __slots__ = ("_encoder", "nbytes", "records", "span_count", "spans")

    def __init__(self, encoder: InferTraceEncoder) -> None:
        self._encoder = encoder
        self.spans: list[
            bytes
        ] = []  # ScopeSpans.spans entries, as InferTraceEncoder.add_many wrote
        self.records = 0
        self.span_count = 0
        self.nbytes = 0

    def payload(self) -> bytes:
        """The serialized export request."""
        return self._encoder.payload(self.spans)


class SpanChunker:
    """Encodes finished records into chunks on the event loop's thread, `encode_every` records
    at a time, and hands each full chunk, or any chunk `flush_s` after its first record, to
    `emit`.

    Why on the loop: encoding is Python work (~2 µs a request); in the export thread it fought
    the event loop for the GIL, and each time the loop released it (epoll, gRPC's C calls) the
    export thread kept it for up to the 5 ms switch interval (the "convoy effect"): p99 went from
    4 to 11 ms and the front lost ~3x the CPU the encoding itself takes. The export thread now
    only sends bytes (protobuf serializes in C).

    Why in runs: a run is written column by column with numpy (server.telemetry.otlp_wire), ~50
    µs a run plus ~1.4 µs a record in a tight loop; 128 records at once block the loop ~0.25 ms.
    Not thread-safe: call from the loop only.
    """

    def __init__(
        self,
        encoder: InferTraceEncoder,
        emit: Callable[[EncodedChunk], None],
        records_per_chunk: int = 1024,
        bytes_per_chunk: int = 2 << 20,
        encode_every: int = 128,
        flush_s: float = 0.5,
    ) -> None:
        self._encoder = encoder
        self._emit = emit
        self._limit = records_per_chunk
        self._max_bytes = bytes_per_chunk  # an OTLP receiver takes 4 MiB by default
        self._every = min(encode_every, records_per_chunk)
        self._flush_s = flush_s
        self._waiting: list[InferTrace] = []
        self._chunk: EncodedChunk | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, rec: InferTrace) -> None:
        if self._timer is None:
            # (its own context: not the log context of the request that armed it)
            self._timer = asyncio.get_running_loop().call_later(
                self._flush_s, self.flush, context=contextvars.Context()
            )
        waiting = self._waiting
        waiting.append(rec)
        if len(waiting) >= self._every:
            self._encode()
            chunk = self._chunk
            if chunk is not None and (
                chunk.records >= self._limit or chunk.nbytes >= self._max_bytes
            ):
                self.flush()

    def _encode(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = EncodedChunk(self._encoder)
        before = len(chunk.spans)
        chunk.span_count += self._encoder.add_many(chunk.spans, waiting)
        chunk.nbytes += sum(map(len, chunk.spans[before:]))
        chunk.records += len(waiting)

    def flush(self) -> None:
        self._encode()
        chunk, self._chunk = self._chunk, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if chunk is not None:
            self._emit(chunk)


class ExpandingSpanExporter(SpanExporter):
    """Any SpanExporter, given SDK spans for the records in its batches."""

    def __init__(self, inner: SpanExporter, encoder: InferTraceEncoder) -> None:
        self.inner = inner
        self._encoder = encoder

    def export(self, spans: Sequence[Any]) -> SpanExportResult:
        return self.inner.export(self._encoder.expand(spans))

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
