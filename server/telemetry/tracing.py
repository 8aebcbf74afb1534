"""OpenTelemetry tracing of the front process (the worker exports nothing itself).

Every RPC but ModelInfer gets its SERVER span from opentelemetry-instrumentation-grpc's aio
interceptor (health checks filtered out; a client's W3C `traceparent` continues its trace).
ModelInfer, the hot RPC, is traced by `RequestTracer` with the same span name, kind,
attributes and parent-based sampling, at a fraction of the cost (docs/architecture.md,
Decisions): one `InferTrace` record per sampled request, turned into spans in the export
thread (server.telemetry.infer_trace, server.telemetry.otlp_fast). Inside, ModelInfer and each
request of ModelStreamInfer have:

- `microtune.route`: model, requested and served version, routing reason;
- `microtune.queue`: time the call waited in the worker (batcher queue);
- `microtune.execute`: the model execution the request ran in: batch size, padded bucket,
  graph replay or eager, input/compute/output nanoseconds. The request the worker counted the
  execution on carries span links to every request the batch served.

Queue and execute spans are reconstructed from the worker's measured durations, ending when
the answer reached the front. With tracing off no provider exists and the servicer and handler
skip all of this with one `is None` check; an unsampled request skips it as well.
Export: OTLP/gRPC configured by the standard OTEL_EXPORTER_OTLP_* and OTEL_BSP_* variables (read
by the exporter and the batch processor), or the console; sampling parent-based with a ratio.
Resource: service.name "microtune" and service.version unless OTEL_SERVICE_NAME /
OTEL_RESOURCE_ATTRIBUTES say otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from server.telemetry.infer_trace import InferTrace, span_ids_from
from server.telemetry.otlp_fast import (
    ExpandingSpanExporter,
    FastOTLPSpanExporter,
    InferTraceEncoder,
    SpanChunker,
)

__all__ = ["INFER_METHOD", "RequestTracer", "Tracing", "make_tracing", "register_services"]

log = logging.getLogger("microtune.tracing")

INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
_SCOPE = "microtune"


@dataclass(frozen=True)
class Tracing:
    """The front's tracing: the SDK provider (for the interceptor) and where finished
    `InferTrace` records go (`sink`: encoded in chunks for OTLP, else the provider's span
    processor, which hands SDK spans to its exporter)."""

    provider: TracerProvider
    sink: Callable[[InferTrace], None]
    ratio: float
    chunker: SpanChunker | None = None
    chunk_processor: SpanProcessor | None = None

    def request_tracer(self) -> RequestTracer:
        return RequestTracer(self)

    def shutdown(self) -> None:
        """Export what is still queued (call on the event loop: it flushes the open chunk)."""
        if self.chunker is not None:
            self.chunker.flush()
        if self.chunk_processor is not None:
            self.chunk_processor.shutdown()
        self.provider.shutdown()


def make_tracing(
    exporter: str, ratio: float, service_version: str, span_exporter: SpanExporter | None = None
) -> Tracing | None:
    """`exporter`: "off", "otlp" or "console"; `span_exporter` overrides it (tests: exported
    synchronously, each record as SDK spans)."""
    if exporter == "off" and span_exporter is None:
        return None
    # Our service.name/version are defaults: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    # (e.g. a k8s pod name) win. Resource.create() alone would let the code's attributes win.
    resource = Resource.create(
        {"service.name": "microtune", "service.version": service_version}
    ).merge(OTELResourceDetector().detect())
    tp = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(ratio)))
    encoder = InferTraceEncoder(
        resource, InstrumentationScope(_SCOPE, service_version), span_ids_from(tp.id_generator)
    )
    if exporter == "otlp" and span_exporter is None:
        # The instrumentation's spans (other RPCs) batch as usual; ModelInfer's arrive as
        # chunks already encoded, each exported as soon as it is full (256 requests) or 0.5 s
        # old, by a second processor with its own exporter (both read OTEL_EXPORTER_OTLP_*).
        tp.add_span_processor(BatchSpanProcessor(FastOTLPSpanExporter(encoder)))
        chunks = BatchSpanProcessor(
            FastOTLPSpanExporter(encoder), max_queue_size=64, max_export_batch_size=1
        )
        chunker = SpanChunker(encoder, chunks.on_end)  # type: ignore[arg-type]
        return Tracing(tp, chunker.add, ratio, chunker, chunks)
    processor: SpanProcessor
    if span_exporter is not None:
        processor = SimpleSpanProcessor(ExpandingSpanExporter(span_exporter, encoder))
    else:
        processor = BatchSpanProcessor(ExpandingSpanExporter(ConsoleSpanExporter(), encoder))
    tp.add_span_processor(processor)
    return Tracing(tp, processor.on_end, ratio)  # type: ignore[arg-type]  # see infer_trace


# RPCs the instrumentation does not trace: ModelInfer (ours, RequestTracer) and health checks
# (Kubernetes probes: noise).
UNTRACED = frozenset({INFER_METHOD, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


Registration = Callable[[grpc.aio.Server], None]


async def register_services(
    server: grpc.aio.Server, registrations: Sequence[Registration], tracing: Tracing | None
) -> None:
    """Run each registration (a generated `add_*_to_server(servicer, s)`, reflection...) on
    `server`; with tracing, every method not in UNTRACED is wrapped once, here, by
    opentelemetry-instrumentation-grpc's interceptor.

    Why not install the interceptor: grpc.aio then runs an interceptor chain on every call, a
    coroutine per RPC before the handler is even found, ModelInfer included (a pass-through
    interceptor cost a bare grpc.aio server ~15 % of its throughput, bench/floor_server.py at
    c=16). The instrumentation's interceptor only reads the method name from the call details,
    so wrapping each method's handler once gives the same spans per call.
    """
    if tracing is None:
        for add in registrations:
            add(server)
        return
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    inner = aio_server_interceptor(tracer_provider=tracing.provider)
    capture = _Capture()
    for add in registrations:
        add(capture)
    for service, handlers in capture.tables.items():
        traced: dict[str, grpc.RpcMethodHandler] = {}
        for name, handler in handlers.items():
            method = f"/{service}/{name}"
            if method in UNTRACED:
                traced[name] = handler
                continue

            async def same(_details: grpc.HandlerCallDetails, h: grpc.RpcMethodHandler = handler):
                return h

            traced[name] = await inner.intercept_service(same, _Details(method))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, traced),))
        server.add_registered_method_handlers(service, traced)
    for generic in capture.untabled():
        server.add_generic_rpc_handlers((generic,))  # no method table to wrap: left untraced


@dataclass(frozen=True)
class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    """A method's call details as the instrumentation reads them (the name; no metadata)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class _Capture(grpc.aio.Server):
    """Records what registrations add. A grpc.aio.Server because grpc-reflection picks its
    asyncio servicer by `isinstance(server, grpc.aio.Server)`."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        self.generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self.tables[service_name] = dict(method_handlers)

    def untabled(self) -> list[grpc.GenericRpcHandler]:
        """Generic handlers of services that came without a method table."""
        return [
            g for g in self.generic
            if getattr(g, "service_name", lambda: None)() not in self.tables
        ]  # fmt: skip

    def add_insecure_port(self, address: str) -> int:
        raise NotImplementedError

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self, grace: float | None) -> None:
        raise NotImplementedError

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        raise NotImplementedError


class RequestTracer:
    """Starts and finishes the `InferTrace` of a request; everything else is slot writes."""

    def __init__(self, tracing: Tracing) -> None:
        self._sink = tracing.sink
        self.dropped = 0  # records the sink refused (see end())
        self._new_trace_id = tracing.provider.id_generator.generate_trace_id
        self._new_span_id = tracing.provider.id_generator.generate_span_id
        # TraceIdRatioBased's own rule, applied without building a sampling result per request.
        self._bound = TraceIdRatioBased.get_bound_for_rate(tracing.ratio)
        self._fields = frozenset(propagate.get_global_textmap().fields)

    def begin(
        self, context: grpc.aio.ServicerContext, method: str = INFER_METHOD
    ) -> InferTrace | None:
        """The trace of a ModelInfer that starts now, or None when it is not sampled: a
        sampled client `traceparent` is continued; otherwise the ratio decides."""
        start = time.time_ns()
        md = context.invocation_metadata() or ()
        parent = None
        user_agent = ""
        for key, value in md:
            if key == "user-agent":
                user_agent = value if isinstance(value, str) else value.decode()
            elif key in self._fields:
                parent = md
        state = ""
        if parent is not None:
            ctx = trace.get_current_span(propagate.extract(dict(parent))).get_span_context()
            if ctx.is_valid:
                if not ctx.trace_flags.sampled:
                    return None  # parent-based: the client decided
                state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
                return InferTrace(ctx.trace_id, self._new_span_id(), ctx.span_id, state,
                                  method=method, peer=context.peer(), user_agent=user_agent,
                                  start_ns=start)  # fmt: skip
        trace_id = self._new_trace_id()
        if trace_id & TraceIdRatioBased.TRACE_ID_LIMIT >= self._bound:
            return None
        return InferTrace(trace_id, self._new_span_id(), method=method, peer=context.peer(),
                          user_agent=user_agent, start_ns=start)  # fmt: skip

    def begin_inner(self) -> InferTrace | None:
        """The inner spans of one request of a stream whose server span the instrumentation
        made (the current span); None when that span is not recording."""
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        ctx = span.get_span_context()
        state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
        return InferTrace(ctx.trace_id, ctx.span_id, trace_state=state, own_server=False)

    def end(self, rec: InferTrace, code: grpc.StatusCode, details: str = "") -> None:
        rec.end_ns = time.time_ns()
        rec.code = code
        rec.details = details
        try:
            self._sink(rec)
        except Exception:
            # A trace is never worth a request: the answer is ready, so drop the spans (and
            # say so once; a bug here would otherwise log on every request).
            self.dropped += 1
            if self.dropped == 1:
                log.exception("could not record the spans of a request; dropping them")
