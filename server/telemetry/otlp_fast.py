"""Exporting `InferTrace` records: straight to OTLP protobuf, or as SDK spans to any exporter.

`FastOTLPSpanExporter` is opentelemetry-exporter-otlp's gRPC span exporter (so every
OTEL_EXPORTER_OTLP_* variable, TLS, headers, compression, retries and its own metrics work as
documented) with one change: the batch it receives from the BatchSpanProcessor may hold
`InferTrace` records beside ordinary SDK spans, and records are encoded by `InferTraceEncoder`
instead of being turned into four SDK spans first. The encoder reuses the attribute lists that
repeat from request to request (model, version, route, peer), which is where the SDK's generic
encoder spends its time; the bytes on the wire are the same (tests/unit/telemetry compare them
with the SDK's encoding of `InferTrace.readable_spans`). Records of failed requests, rare, take
the SDK's path.

`ExpandingSpanExporter` wraps any other exporter (console, in-memory) and hands it SDK spans.

The private helpers imported below belong to the pinned opentelemetry-exporter-otlp-proto-common
(pyproject.toml pins the exporter family to one version); the comparison test catches a change.
"""

from __future__ import annotations

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
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from server.telemetry.infer_trace import (
    InferTrace,
    server_attributes,
)

__all__ = ["ExpandingSpanExporter", "FastOTLPSpanExporter", "InferTraceEncoder"]

_SERVER = PbSpan.SpanKind.SPAN_KIND_SERVER
_INTERNAL = PbSpan.SpanKind.SPAN_KIND_INTERNAL
_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_PARENT = _LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_CACHE_LIMIT = 4096  # distinct templates kept per span kind
_TEMPLATE_ID = 0x7E3A  # the placeholder span that carries our resource and scope envelope


def _kv(key: str, value: int) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(int_value=value))


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
                "microtune.padded_batch": padded, "microtune.execution": mode}  # fmt: skip

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
        # `s` is the execute span: its per-call attributes and the batch's links.
        s.attributes.extend(
            (
                _kv("microtune.input_ns", t.input_ns),
                _kv("microtune.compute_ns", t.infer_ns),
                _kv("microtune.output_ns", t.output_ns),
            )
        )
        for ref in t.links:
            if len(ref) == 24:
                s.links.add(trace_id=ref[:16], span_id=ref[16:], flags=_REMOTE_PARENT)
        return n

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


class FastOTLPSpanExporter(OTLPSpanExporter):
    """The OTLP/gRPC span exporter, encoding `InferTrace` records directly."""

    def __init__(self, encoder: InferTraceEncoder, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._encoder = encoder

    def _translate_data(self, data: Sequence[Any]) -> ExportTraceServiceRequest:
        return self._encoder.encode(data)

    def _count_data(self, data: Sequence[Any]) -> int:
        return self._encoder.count(data)


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
