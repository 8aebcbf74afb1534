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
  graph replay or eager, input/compute/output nanoseconds. When the execution served several
  requests, the one the worker counted it on carries span links to every sampled one of them.

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
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import time_ns

import grpc
from opentelemetry import propagate, trace
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from server.errors import CannotStart
from server.rpc.registration import Registrations, decoding_in_handler
from server.telemetry.infer_trace import InferTrace, random_span_ids, span_ids_from, span_ref
from server.telemetry.otlp_async import AsyncChunkSender
from server.telemetry.otlp_fast import (
    ExpandingSpanExporter,
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
    sender: AsyncChunkSender | None = None

    def request_tracer(self) -> RequestTracer:
        return RequestTracer(self)

    async def shutdown(self) -> None:
        """Export what is still queued (on the event loop: it flushes the open chunk)."""
        if self.chunker is not None:
            self.chunker.flush()
        if self.sender is not None:
            await self.sender.close()
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
        # The instrumentation's spans (other RPCs, a few) batch as usual; ModelInfer's are
        # encoded into chunks on the event loop and sent from it (server.telemetry.otlp_async)
        # as soon as one is full (1024 requests) or 0.5 s old. Both read OTEL_EXPORTER_OTLP_*.
        tp.add_span_processor(BatchSpanProcessor(_otlp_exporter()))
        sender = AsyncChunkSender(_otlp_exporter())
        chunker = SpanChunker(encoder, lambda chunk: sender.submit(chunk.payload))
        return Tracing(tp, chunker.add, ratio, chunker, sender)
    processor: SpanProcessor
    if span_exporter is not None:
        processor = SimpleSpanProcessor(ExpandingSpanExporter(span_exporter, encoder))
    else:
        processor = BatchSpanProcessor(ExpandingSpanExporter(ConsoleSpanExporter(), encoder))
    tp.add_span_processor(processor)
    return Tracing(tp, processor.on_end, ratio)  # type: ignore[arg-type]  # see infer_trace


def _otlp_exporter() -> OTLPSpanExporter:
    """The OTLP exporter as the OTEL_EXPORTER_OTLP_* variables configure it. A value it cannot
    use stops the server at start (CannotStart: one line naming the variable, exit code 78):
    the exporter raises a bare ValueError ("could not convert string to float: '5s'") that
    names no variable, and a front that died of it was restarted, failing alike, until the
    supervisor gave up. (Its constructor only reads configuration: nothing connects yet.)"""
    compression = _compression()
    try:
        return OTLPSpanExporter(compression=compression)
    except Exception as exc:  # ValueError, RuntimeError...
        raise CannotStart(f"--tracing otlp: {_misconfigured(exc)}") from None


# OTLP's values (the specification's OTEL_EXPORTER_OTLP_COMPRESSION: gzip or none). The pinned
# exporter (opentelemetry-exporter-otlp-proto-grpc 1.45) maps only "gzip" from the variable and
# refuses "none", so the variable is read here and the exporter given the result. (grpc could
# send deflate too, but collectors decode gzip, snappy and zstd over gRPC, not deflate: each
# export would fail.)
_COMPRESSIONS = {"gzip": grpc.Compression.Gzip, "none": grpc.Compression.NoCompression}
# The traces' own variable wins, as in the exporter.
_COMPRESSION_VARIABLES = (
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
    "OTEL_EXPORTER_OTLP_COMPRESSION",
)


def _compression() -> grpc.Compression:
    for name in _COMPRESSION_VARIABLES:
        value = os.environ.get(name, "")
        if not value.strip():  # (an empty variable is an unset one, as the specification says)
            continue
        compression = _COMPRESSIONS.get(value.strip().lower())
        if compression is None:
            raise CannotStart(
                f"--tracing otlp: {name}={value!r} is not one of {', '.join(_COMPRESSIONS)}"
            )
        return compression
    return grpc.Compression.NoCompression


def _misconfigured(exc: Exception) -> str:
    """The OTEL_EXPORTER_OTLP_* variable (and value) behind `exc`, else `exc` itself."""
    for name, value in sorted(os.environ.items()):
        if name.startswith("OTEL_EXPORTER_OTLP_") and name.endswith("_TIMEOUT"):
            try:
                float(value)
            except ValueError:
                return f"{name}={value!r} is not a number of seconds"
    return f"the OTLP exporter refused its OTEL_EXPORTER_OTLP_* settings: {exc}"


# RPCs the instrumentation does not trace: ModelInfer (ours, RequestTracer) and health checks
# (Kubernetes probes: noise).
UNTRACED = frozenset({INFER_METHOD, "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})


Registration = Callable[[grpc.aio.Server], None]


async def register_services(
    server: grpc.aio.Server, registrations: Sequence[Registration], tracing: Tracing | None
) -> None:
    """Run each registration (a generated `add_*_to_server(servicer, s)`, reflection...) on
    `server`, each method decoding its own request (server.rpc.registration
    .decoding_in_handler: a request that does not parse is INVALID_ARGUMENT); with tracing,
    every method not in UNTRACED is wrapped once, here, by opentelemetry-instrumentation-grpc's
    interceptor.

    Why not install the interceptor: grpc.aio then runs an interceptor chain on every call, a
    coroutine per RPC before the handler is even found, ModelInfer included (a pass-through
    interceptor cost a bare grpc.aio server ~15 % of its throughput, bench/floor_server.py at
    c=16). The instrumentation's interceptor only reads the method name from the call details,
    so wrapping each method's handler once gives the same spans per call.
    """
    capture = Registrations()
    for add in registrations:
        add(capture)
    inner = None
    if tracing is not None:
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        inner = aio_server_interceptor(tracer_provider=tracing.provider)
    for service, handlers in capture.tables.items():
        table: dict[str, grpc.RpcMethodHandler] = {}
        for name, handler in handlers.items():
            table[name] = decoding_in_handler(handler)
            method = f"/{service}/{name}"
            if inner is None or method in UNTRACED:
                continue

            async def same(
                _details: grpc.HandlerCallDetails, h: grpc.RpcMethodHandler = table[name]
            ) -> grpc.RpcMethodHandler:
                return h

            table[name] = await inner.intercept_service(same, _Details(method))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, table),))
        server.add_registered_method_handlers(service, table)
    for generic in capture.untabled():
        server.add_generic_rpc_handlers((generic,))  # no method table to wrap: left untraced


@dataclass(frozen=True)
class _Details(grpc.HandlerCallDetails):  # type: ignore[misc]
    """A method's call details as the instrumentation reads them (the name; no metadata)."""

    method: str
    invocation_metadata: tuple[tuple[str, str], ...] = ()


class RequestTracer:
    """Starts and finishes the `InferTrace` of a request; everything else is slot writes."""

    _REFS = 256  # (trace id, span id) pairs drawn at once

    def __init__(self, tracing: Tracing) -> None:
        self._sink = tracing.sink
        self.dropped = 0  # records the sink refused (see end())
        generator = tracing.provider.id_generator
        self._new_span_id = generator.generate_span_id
        self._draw_refs = _ref_source(generator, self._REFS)
        self._refs = b""  # drawn (trace id, server span id) pairs, 24 bytes each ...
        self._at = 0  # ... and the next one's offset
        # TraceIdRatioBased's own rule, applied without building a sampling result per request.
        self._bound = TraceIdRatioBased.get_bound_for_rate(tracing.ratio)
        self._all = self._bound > TraceIdRatioBased.TRACE_ID_LIMIT  # ratio 1: no test needed
        self._fields = frozenset(propagate.get_global_textmap().fields)

    def begin(
        self,
        context: grpc.aio.ServicerContext,
        md: Sequence[tuple[str, str | bytes]] | None,
        method: str = INFER_METHOD,
    ) -> InferTrace | None:
        """The trace of a ModelInfer that starts now (`md`: its invocation metadata), or None
        when it is not sampled: a sampled client `traceparent` is continued; otherwise the
        ratio decides."""
        start = time_ns()
        md = md or ()
        parent = None
        user_agent = ""
        for key, value in md:
            if key == "user-agent":
                user_agent = value if isinstance(value, str) else value.decode()
            elif key in self._fields:
                parent = md
        if parent is not None:
            ctx = trace.get_current_span(propagate.extract(dict(parent))).get_span_context()
            if ctx.is_valid:
                if not ctx.trace_flags.sampled:
                    return None  # parent-based: the client decided
                state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
                ref = span_ref(ctx.trace_id, self._new_span_id())
                return InferTrace(
                    ref, ctx.span_id, state, method, context.peer(), user_agent, start
                )
        # A new trace: its ids come from a pool drawn in bulk (one draw per request cost
        # ~3k instructions), sliced here rather than in a method (a call costs ~1.5k).
        at = self._at
        refs = self._refs
        if at >= len(refs):
            refs = self._refs = self._draw_refs()
            at = 0
        self._at = at + 24
        ref = refs[at : at + 24]
        if self._all or int.from_bytes(ref[8:16], "big") < self._bound:  # trace id's low 64 bits
            return InferTrace(ref, 0, "", method, context.peer(), user_agent, start)
        return None

    def begin_inner(self) -> InferTrace | None:
        """The inner spans of one request of a stream whose server span the instrumentation
        made (the current span); None when that span is not recording."""
        span = trace.get_current_span()
        if not span.is_recording():
            return None
        ctx = span.get_span_context()
        state = ",".join(f"{k}={v}" for k, v in ctx.trace_state.items())
        return InferTrace(span_ref(ctx.trace_id, ctx.span_id), 0, state, own_server=False)

    def end(self, rec: InferTrace, code: grpc.StatusCode, details: str = "") -> None:
        rec.end_ns = time_ns()
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


def _ref_source(generator: IdGenerator, n: int) -> Callable[[], bytes]:
    """Draws `n` (trace id, span id) pairs, 24 bytes each, from the provider's generator:
    RandomIdGenerator's draws in one `getrandbits`, any other generator's call by call."""
    if type(generator) is RandomIdGenerator:
        return lambda: random_span_ids(n)  # 3 x 8 random bytes, none 8 zero bytes: the same

    def draw() -> bytes:
        return b"".join(
            span_ref(generator.generate_trace_id(), generator.generate_span_id()) for _ in range(n)
        )

    return draw
