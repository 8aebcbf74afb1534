"""OpenTelemetry tracing of the front process (the worker exports nothing itself).

One SERVER span per RPC comes from opentelemetry-instrumentation-grpc's aio interceptor (health
checks filtered out; a client's W3C `traceparent` continues its trace). Inside ModelInfer the
handler adds, through `RequestTracer`:

- `microtune.route`: model, requested and served version, routing reason;
- `microtune.queue`: time the call waited in the worker (batcher queue);
- `microtune.execute`: the model execution the request ran in: batch size, padded bucket,
  graph replay or eager, input/compute/output nanoseconds. The first request of a batch carries
  span links to every request the batch served (the worker returns their span contexts).

Queue and execute spans are reconstructed from the worker's measured durations, ending when
the answer reached the front. With tracing off no provider exists and the handler skips all of
this with one `is None` check; a request whose trace the sampler dropped skips it as well.
Export: OTLP/gRPC configured by the standard OTEL_EXPORTER_OTLP_* variables (read by the
exporter), or the console; sampling parent-based with a ratio. Resource: service.name
"microtune" and service.version unless OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES say
otherwise.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, SpanContext, TraceFlags

from runtime.ipc.protocol import Timings

__all__ = [
    "RequestTracer",
    "decode_span_ref",
    "encode_span_ref",
    "make_tracer_provider",
    "server_interceptor",
]


def make_tracer_provider(
    exporter: str, ratio: float, service_version: str, span_exporter: SpanExporter | None = None
) -> TracerProvider | None:
    """`exporter`: "off", "otlp" or "console"; `span_exporter` overrides it (tests)."""
    if exporter == "off" and span_exporter is None:
        return None
    # Our service.name/version are defaults: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    # (e.g. a k8s pod name) win. Resource.create() alone would let the code's attributes win.
    resource = Resource.create(
        {"service.name": "microtune", "service.version": service_version}
    ).merge(OTELResourceDetector().detect())
    tp = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    if span_exporter is None:
        if exporter == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            span_exporter = OTLPSpanExporter()
        else:
            span_exporter = ConsoleSpanExporter()
        tp.add_span_processor(BatchSpanProcessor(span_exporter))
    else:
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor

        tp.add_span_processor(SimpleSpanProcessor(span_exporter))
    return tp


def server_interceptor(tp: TracerProvider) -> Any:
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return aio_server_interceptor(
        tracer_provider=tp, filter_=filters.negate(filters.health_check())
    )


def encode_span_ref() -> bytes:
    """The current span's (trace id, span id) as 24 bytes for the worker; b"" if none."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return b""
    return ctx.trace_id.to_bytes(16, "big") + ctx.span_id.to_bytes(8, "big")


def decode_span_ref(ref: bytes) -> SpanContext | None:
    if len(ref) != 24:
        return None
    return SpanContext(
        trace_id=int.from_bytes(ref[:16], "big"),
        span_id=int.from_bytes(ref[16:], "big"),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
    )


class RequestTracer:
    def __init__(self, tp: TracerProvider) -> None:
        self.tracer = tp.get_tracer("microtune")

    def recording(self) -> bool:
        """Whether the current (server) span is sampled; if not, the request's inner spans
        would be dropped by the parent-based sampler, so the handler skips them altogether."""
        return trace.get_current_span().is_recording()

    def route_span(self) -> trace.Span:
        return self.tracer.start_span("microtune.route")

    def end_route(
        self, span: trace.Span, model: str, requested: str, served: int, reason: str
    ) -> None:
        span.set_attribute("microtune.model", model)
        span.set_attribute("microtune.requested_version", requested)
        span.set_attribute("microtune.served_version", served)
        span.set_attribute("microtune.route_reason", reason)
        span.end()

    def fail_route(self, span: trace.Span, model: str, requested: str, exc: BaseException) -> None:
        """Routing refused the request (unknown model or version, nothing ready)."""
        span.set_attribute("microtune.model", model)
        span.set_attribute("microtune.requested_version", requested)
        span.record_exception(exc)
        span.end()

    def execution(self, model: str, version: int, t: Timings, links: Sequence[bytes]) -> None:
        """Queue and execute spans, ending now (when the worker's answer arrived)."""
        end = time.time_ns()
        exec_start = end - (t.input_ns + t.infer_ns + t.output_ns)
        queue_start = exec_start - t.queue_ns
        attrs = {"microtune.model": model, "microtune.version": version}
        q = self.tracer.start_span("microtune.queue", start_time=queue_start, attributes=attrs)
        q.end(end_time=exec_start)
        span_links = [Link(c) for c in (decode_span_ref(r) for r in links) if c is not None]
        e = self.tracer.start_span(
            "microtune.execute",
            start_time=exec_start,
            links=span_links,
            attributes={
                **attrs,
                "microtune.batch_size": t.batch_size,
                "microtune.padded_batch": t.padded_batch or t.batch_size,
                "microtune.execution": t.mode,
                "microtune.input_ns": t.input_ns,
                "microtune.compute_ns": t.infer_ns,
                "microtune.output_ns": t.output_ns,
            },
        )
        e.end(end_time=end)
