"""Exporting `InferTrace` records: encoded straight to OTLP protobuf, or as SDK spans.

With `--tracing otlp`, `SpanChunker` encodes each finished record on the event loop into the
open `EncodedChunk` (an OTLP export request under construction) with `InferTraceEncoder`, which
starts every span as a copy of a cached template (the attributes that repeat from request to
request: model, version, route, peer) and sets ids, times and the three per-call numbers. A
full chunk (256 requests) or one 0.5 s old goes to a BatchSpanProcessor whose
`FastOTLPSpanExporter` sends it as it is. That exporter is opentelemetry-exporter-otlp's gRPC
span exporter (every OTEL_EXPORTER_OTLP_* variable, TLS, headers, compression, retries and its
own metrics work as documented) that also accepts chunks and records beside SDK spans. The
bytes are the SDK's: tests/unit/telemetry compare them with the SDK's own encoding of
`InferTrace.readable_spans`. Records of failed requests, rare, take the SDK's encoder.

`ExpandingSpanExporter` wraps any other exporter (console, in-memory) and hands it SDK spans.

The private helpers imported below belong to the pinned opentelemetry-exporter-otlp-proto-common
(pyproject.toml pins the exporter family to one version); the comparison test catches a change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _encode_span,
    encode_spans,
)
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from server.telemetry.infer_trace import PROCESSOR_VIEW, InferTrace, server_attributes

__all__ = [
    "EncodedChunk",
    "ExpandingSpanExporter",
    "FastOTLPSpanExporter",
    "InferTraceEncoder",
    "SpanChunker",
]

_SERVER = PbSpan.SpanKind.SPAN_KIND_SERVER
_INTERNAL = PbSpan.SpanKind.SPAN_KIND_INTERNAL
_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_PARENT = _LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_CACHE_LIMIT = 4096  # distinct templates kept per span kind
_TEMPLATE_ID = 0x7E3A  # the placeholder span that carries our resource and scope envelope


class _Templates:
    """Spans that differ only in ids and times, by key: a record's span starts as a copy of
    one (protobuf copies in C; building the same attributes again costs ~3x more). Cleared
    when it grows past the limit (peers come and go)."""

    def __init__(self, name: str | None, kind: int, make: Callable[..., dict[str, Any]]) -> None:
        self._name, self._kind, self._make = name, kind, make
        self._spans: dict[tuple[Any, ...], PbSpan] = {}

    def get(self, *key: Any) -> PbSpan:
        got = self._spans.get(key)
        if got is None:
            if len(self._spans) >= _CACHE_LIMIT:
                self._spans.clear()
            got = PbSpan(
                name=self._name or key[0],
                kind=self._kind,
                flags=_LOCAL_PARENT,
                attributes=_encode_attributes(self._make(*key)),
            )
            got.status.SetInParent()  # the SDK always sends a status, UNSET here
            self._spans[key] = got
        return got


class InferTraceEncoder:
    """Appends the OTLP spans of records to a ScopeSpans' `spans`."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        new_span_id: Callable[[], int],
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.new_span_id = new_span_id
        self._server = _Templates(
            None, _SERVER, lambda m, p, u: server_attributes(m, p, u, grpc.StatusCode.OK)
        )
        self._route = _Templates(
            "microtune.route",
            _INTERNAL,
            lambda model, requested, served, reason: {
                "microtune.model": model,
                "microtune.requested_version": requested,
                "microtune.served_version": served,
                "microtune.route_reason": reason,
            },
        )
        self._queue = _Templates(
            "microtune.queue",
            _INTERNAL,
            lambda model, v: {"microtune.model": model, "microtune.version": v},
        )
        self._execute = _Templates("microtune.execute", _INTERNAL, self._execute_prefix)

    @staticmethod
    def _execute_prefix(model: str, v: int, batch: int, padded: int, mode: str) -> dict[str, Any]:
        return {"microtune.model": model, "microtune.version": v, "microtune.batch_size": batch,
                "microtune.padded_batch": padded, "microtune.execution": mode,
                "microtune.input_ns": 0, "microtune.compute_ns": 0,
                "microtune.output_ns": 0}  # fmt: skip

    def add(self, spans: Any, rec: InferTrace) -> int:
        """Encode `rec` into the repeated field `spans`; returns the number of spans."""
        t = rec.timings
        if t is None or rec.route_error is not None or rec.code is not grpc.StatusCode.OK:
            encoded = [
                _encode_span(s)
                for s in rec.readable_spans(self.resource, self.scope, self.new_span_id)
            ]
            spans.extend(encoded)
            return len(encoded)
        assert rec.served is not None
        trace_id = rec.trace_id.to_bytes(16, "big")
        server_id = rec.span_id.to_bytes(8, "big")
        state = rec.trace_state
        route_id, queue_id, exec_id = rec.ids(self.new_span_id)
        n = 3
        if rec.own_server:
            s = spans.add()
            s.CopyFrom(self._server.get(rec.method, rec.peer, rec.user_agent))
            s.trace_id, s.span_id = trace_id, server_id
            s.start_time_unix_nano, s.end_time_unix_nano = rec.start_ns, rec.end_ns
            if rec.parent_id:
                s.parent_span_id, s.flags = rec.parent_id.to_bytes(8, "big"), _REMOTE_PARENT
            if state:
                s.trace_state = state
            n = 4
        queue_start, exec_start = rec.queue_and_execute()
        for template, span_id, start, end in (
            (self._route.get(rec.model, rec.requested, rec.served, rec.reason), route_id,
             rec.route_start, rec.route_end),
            (self._queue.get(rec.model, rec.served), queue_id, queue_start, exec_start),
            (self._execute.get(rec.model, rec.served, t.batch_size, t.padded_batch or t.batch_size,
                               t.mode), exec_id, exec_start, rec.answer_ns),
        ):  # fmt: skip
            s = spans.add()
            s.CopyFrom(template)
            s.trace_id, s.span_id, s.parent_span_id = (
                trace_id,
                span_id.to_bytes(8, "big"),
                server_id,
            )
            s.start_time_unix_nano, s.end_time_unix_nano = start, end
            if state:
                s.trace_state = state
        # `s` is the execute span: its per-call times (placeholders in the template, set in
        # place: ~2.5 µs cheaper than appending new attributes) and the batch's links.
        a = s.attributes
        a[5].value.int_value = t.input_ns
        a[6].value.int_value = t.infer_ns
        a[7].value.int_value = t.output_ns
        for ref in t.links:
            if len(ref) == 24:
                s.links.add(trace_id=ref[:16], span_id=ref[16:], flags=_REMOTE_PARENT)
        return n

    def envelope(self) -> tuple[ExportTraceServiceRequest, Any]:
        """An export request holding our resource and scope and no span yet, and the repeated
        field its spans go to."""
        request = encode_spans([self._template()])
        spans = request.resource_spans[0].scope_spans[0].spans
        del spans[-1]
        return request, spans

    def encode(self, data: Sequence[ReadableSpan | InferTrace]) -> ExportTraceServiceRequest:
        """The export request for a mixed batch, grouped by resource and scope as the SDK does."""
        sdk = [d for d in data if not isinstance(d, InferTrace)]
        records = [d for d in data if isinstance(d, InferTrace)]
        if not records:
            return encode_spans(sdk)
        # A placeholder span of our resource and scope, encoded by the SDK with the others,
        # gives the envelope (resource, scope, schema URLs) the SDK would have made; our spans
        # replace it.
        request = encode_spans([*sdk, self._template()])
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                if ss.spans and ss.spans[-1].span_id == _TEMPLATE_ID.to_bytes(8, "big"):
                    del ss.spans[-1]
                    for rec in records:
                        self.add(ss.spans, rec)
                    return request
        raise AssertionError("the placeholder span vanished from the encoding")

    def _template(self) -> ReadableSpan:
        ctx = SpanContext(_TEMPLATE_ID, _TEMPLATE_ID, False)
        return ReadableSpan("", ctx, resource=self.resource, instrumentation_scope=self.scope)

    @staticmethod
    def count(data: Sequence[ReadableSpan | InferTrace]) -> int:
        n = 0
        for d in data:
            if not isinstance(d, InferTrace):
                n += 1
            else:
                n += int(d.own_server) + int(d.route_end != 0) + 2 * int(d.timings is not None)
        return n


class EncodedChunk:
    """Records already encoded (on the event loop): one export request's worth of spans."""

    __slots__ = ("records", "request", "span_count", "spans")

    context = PROCESSOR_VIEW  # what a span processor reads before queueing it

    def __init__(self, encoder: InferTraceEncoder) -> None:
        self.request, self.spans = encoder.envelope()
        self.records = 0
        self.span_count = 0


class SpanChunker:
    """Encodes finished records into chunks on the event loop's thread, `encode_every` records
    at a time, and hands each full chunk, or any chunk `flush_s` after its first record, to
    `emit`.

    Why on the loop: encoding is Python work (~8 µs a request); in the export thread it fought
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
        add, spans = self._encoder.add, chunk.spans
        for rec in waiting:
            chunk.span_count += add(spans, rec)
        chunk.records += len(waiting)

    def flush(self) -> None:
        self._encode()
        chunk, self._chunk = self._chunk, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if chunk is not None:
            self._emit(chunk)


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, also taking `EncodedChunk`s and `InferTrace` records."""

    def __init__(self, encoder: InferTraceEncoder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = encoder

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        chunks = [d for d in data if isinstance(d, EncodedChunk)]
        rest = [d for d in data if not isinstance(d, EncodedChunk)]
        request = self._encoder.encode(rest) if rest or not chunks else None
        for chunk in chunks:
            if request is None:
                request = chunk.request  # the usual case, one chunk: sent as it is
            else:
                request.MergeFrom(chunk.request)  # repeated resource_spans: appended
        assert request is not None
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
        e = self._encoder
        out: list[ReadableSpan] = []
        for s in spans:
            if isinstance(s, InferTrace):
                out.extend(s.readable_spans(e.resource, e.scope, e.new_span_id))
            else:
                out.append(s)
        return self.inner.export(out)

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.inner.force_flush(timeout_millis)
