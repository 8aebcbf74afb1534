"""Exporting `InferTrace` records: encoded straight to OTLP protobuf, or as SDK spans.

With `--tracing otlp`, `SpanChunker` encodes finished records on the event loop into the open
`EncodedChunk` (the spans of an OTLP export request, as bytes) with
server.telemetry.otlp_wire's `InferTraceEncoder`. A full chunk (256 requests) or one 0.5 s old
goes to a BatchSpanProcessor whose `FastOTLPSpanExporter` sends its bytes as they are. That
exporter is opentelemetry-exporter-otlp's gRPC span exporter (every OTEL_EXPORTER_OTLP_*
variable, TLS, headers, compression, retries and its own metrics work as documented) that also
accepts chunks and records beside SDK spans, with a stub that passes bytes through.

`ExpandingSpanExporter` wraps any other exporter (console, in-memory) and hands it SDK spans.

The exporter family is pinned to one version (pyproject.toml): the encoder uses private helpers
of opentelemetry-exporter-otlp-proto-common and this exporter replaces its base's stub; tests
catch a change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from server.telemetry.infer_trace import PROCESSOR_VIEW, InferTrace
from server.telemetry.otlp_wire import InferTraceEncoder

__all__ = [
    "EncodedChunk",
    "ExpandingSpanExporter",
    "FastOTLPSpanExporter",
    "InferTraceEncoder",
    "SpanChunker",
]


class EncodedChunk:
    """Records already encoded (on the event loop): one export request's worth of spans."""

    __slots__ = ("_encoder", "records", "span_count", "spans")

    context = PROCESSOR_VIEW  # what a span processor reads before queueing it

    def __init__(self, encoder: InferTraceEncoder) -> None:
        self._encoder = encoder
        self.spans: list[bytes] = []  # ScopeSpans.spans entries, as InferTraceEncoder.add wrote
        self.records = 0
        self.span_count = 0

    def payload(self) -> bytes:
        """The serialized export request."""
        return self._encoder.payload(self.spans)


class SpanChunker:
    """Encodes finished records into chunks on the event loop's thread, `encode_every` records
    at a time, and hands each full chunk, or any chunk `flush_s` after its first record, to
    `emit`.

    Why on the loop: encoding is Python work (~2.5 µs a request); in the export thread it fought
    the event loop for the GIL, and each time the loop released it (epoll, gRPC's C calls) the
    export thread kept it for up to the 5 ms switch interval (the "convoy effect"): p99 went from
    4 to 11 ms and the front lost ~3x the CPU the encoding itself takes. The export thread now
    only sends bytes (protobuf serializes in C).

    Why in runs: encoding one record at the end of each request, between gRPC's work, cost the
    loop about twice what the same encoding costs in a tight loop (caches); 64 records at once
    block the loop ~0.5 ms. Not thread-safe: call from the loop only.
    """

    def __init__(
        self,
        encoder: InferTraceEncoder,
        emit: Callable[[EncodedChunk], None],
        records_per_chunk: int = 256,
        encode_every: int = 64,
        flush_s: float = 0.5,
    ) -> None:
        self._encoder = encoder
        self._emit = emit
        self._limit = records_per_chunk
        self._every = min(encode_every, records_per_chunk)
        self._flush_s = flush_s
        self._waiting: list[InferTrace] = []
        self._chunk: EncodedChunk | None = None
        self._timer: asyncio.TimerHandle | None = None

    def add(self, rec: InferTrace) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._flush_s, self.flush)
        waiting = self._waiting
        waiting.append(rec)
        if len(waiting) >= self._every:
            self._encode()
            if self._chunk is not None and self._chunk.records >= self._limit:
                self.flush()

    def _encode(self) -> None:
        waiting, self._waiting = self._waiting, []
        if not waiting:
            return
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = EncodedChunk(self._encoder)
        chunk.span_count += self._encoder.add_many(chunk.spans, waiting)
        chunk.records += len(waiting)

    def flush(self) -> None:
        self._encode()
        chunk, self._chunk = self._chunk, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if chunk is not None:
            self._emit(chunk)


class _BytesTraceService:
    """TraceService's Export on a channel, sending an already serialized request as it is."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.Export = channel.unary_unary(
            "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            request_serializer=_serialized,
            response_deserializer=ExportTraceServiceResponse.FromString,
        )


def _serialized(request: bytes | ExportTraceServiceRequest) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, also taking `EncodedChunk`s and `InferTrace` records."""

    def __init__(self, encoder: InferTraceEncoder, **kwargs: Any) -> None:
        self._encoder = encoder
        super().__init__(**kwargs)

    def _initialize_channel_and_stub(self) -> None:
        # The base makes its channel and a TraceServiceStub here (again after UNAVAILABLE);
        # the stub is swapped for one that also takes bytes.
        super()._initialize_channel_and_stub()  # type: ignore[no-untyped-call]
        self._client = _BytesTraceService(self._channel)

    def _translate_data(self, data: Sequence[Any]) -> bytes | ExportTraceServiceRequest:  # type: ignore[override]
        chunks = [d for d in data if isinstance(d, EncodedChunk)]
        rest = [d for d in data if not isinstance(d, EncodedChunk)]
        if len(chunks) == 1 and not rest:
            return chunks[0].payload()  # the usual case: sent as it is
        request = self._encoder.encode(rest)
        for chunk in chunks:
            request.MergeFromString(chunk.payload())  # repeated resource_spans: appended
        return request

    def _count_data(self, data: Sequence[Any]) -> int:
        chunks = [d for d in data if isinstance(d, EncodedChunk)]
        rest = [d for d in data if not isinstance(d, EncodedChunk)]
        return self._encoder.count(rest) + sum(c.span_count for c in chunks)


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
