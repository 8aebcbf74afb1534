"""One inference's trace as one record: its server, route, queue and execute spans.

Building four SDK spans per request (start, attributes, end, then the exporter's generic
encoding) cost ~100 µs of the front's CPU per ModelInfer, more than the rest of the request
(docs/architecture.md, Decisions). So a sampled ModelInfer fills one `InferTrace` (a few slot
writes on the request path) and hands it to the span processor when it ends; the spans are
made from it in the export thread:

- `readable_spans()` turns it into SDK `ReadableSpan`s: what any SpanExporter (console,
  in-memory in the tests) receives. This is the reference meaning of a record.
- server.telemetry.otlp_fast encodes it straight to OTLP protobuf for the OTLP exporter; a test
  checks that this gives exactly what the SDK's own encoder makes of `readable_spans()`.

The server span is ours for ModelInfer (same name, kind and attributes as
opentelemetry-instrumentation-grpc's, which traces every other RPC); for ModelStreamInfer the
instrumentation owns it and the record carries only the inner spans (`own_server` False).

Span processors read only `span.context.trace_flags.sampled` before queueing (BatchSpanProcessor,
SimpleSpanProcessor): `context` answers that; a record exists only for a sampled trace.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from random import getrandbits
from urllib.parse import unquote

import grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, TraceFlags
from opentelemetry.trace.span import TraceState

from runtime.ipc.protocol import Timings

__all__ = [
    "PROCESSOR_VIEW",
    "InferTrace",
    "decode_span_ref",
    "random_span_ids",
    "server_attributes",
    "server_status",
    "span_ids_from",
    "span_ref",
]

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_OK = grpc.StatusCode.OK  # (an Enum member read through its class costs ~1k instructions)
# What span processors look at before queueing a finished span (see the module docstring).
PROCESSOR_VIEW = SpanContext(trace_id=1, span_id=1, is_remote=False, trace_flags=_SAMPLED)


class InferTrace:
    """The measurements of one sampled inference; spans are made from it later."""

    __slots__ = (
        "answer_ns",
        "children",
        "code",
        "details",
        "end_ns",
        "method",
        "model",
        "own_server",
        "parent_id",
        "peer",
        "reason",
        "ref",
        "requested",
        "route_end",
        "route_error",
        "route_start",
        "served",
        "server_key",
        "start_ns",
        "timings",
        "trace_state",
        "user_agent",
    )  # fmt: skip

    context = PROCESSOR_VIEW

    def __init__(
        self,
        ref: bytes,
        parent_id: int = 0,
        trace_state: str = "",
        method: str = "",
        peer: str = "",
        user_agent: str = "",
        start_ns: int = 0,
        own_server: bool = True,
    ) -> None:
        # Positional on the request path: a call with keywords cost ~2k instructions more.
        self.ref = ref  # trace id (16 bytes) and server span id (8): what batch links carry
        self.parent_id = parent_id  # the client's span (remote); 0 = the trace starts here
        self.trace_state = trace_state
        self.own_server = own_server
        self.method = method
        self.peer = peer
        self.user_agent = user_agent
        self.start_ns = start_ns
        # What the server span's constant part depends on (None: the instrumentation's span).
        self.server_key = (method, peer, user_agent, parent_id != 0) if own_server else None
        self.end_ns = 0
        self.code = _OK
        self.details = ""
        self.model = ""
        self.requested = ""
        self.route_start = 0
        self.route_end = 0  # 0 = routing never ran (the request failed before it)
        self.served: int | None = None
        self.reason = ""
        self.route_error: tuple[str, str] | None = None  # (exception type, message)
        self.timings: Timings | None = None  # set once the worker answered
        self.answer_ns = 0
        self.children = b""  # the route, queue and execute span ids, 8 bytes each; at export

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.ref[:16], "big")

    @property
    def span_id(self) -> int:
        """The server span's id: parent of the inner spans, target of links."""
        return int.from_bytes(self.ref[16:], "big")

    def ids(self, new_span_ids: Callable[[int], bytes]) -> bytes:
        """The inner spans' ids (route, queue, execute: 8 bytes each), drawn once: both
        encodings of a record agree on them."""
        if not self.children:
            self.children = new_span_ids(1)
        return self.children

    def queue_and_execute(self) -> tuple[int, int]:
        """(queue start, execute start): both spans end where the next begins; the execute
        span ends when the answer reached the front and lasts the worker's measured time."""
        t = self.timings
        assert t is not None
        exec_start = self.answer_ns - (t.input_ns + t.infer_ns + t.output_ns)
        return exec_start - t.queue_ns, exec_start

    def readable_spans(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        new_span_ids: Callable[[int], bytes],
    ) -> list[ReadableSpan]:
        children = self.ids(new_span_ids)
        route_id, queue_id, exec_id = (
            int.from_bytes(children[i : i + 8], "big") for i in (0, 8, 16)
        )
        state = TraceState.from_header([self.trace_state]) if self.trace_state else TraceState()

        trace_id = self.trace_id

        def ctx(span_id: int, remote: bool = False) -> SpanContext:
            return SpanContext(trace_id, span_id, remote, _SAMPLED, state)

        server = ctx(self.span_id)
        spans: list[ReadableSpan] = []

        def add(name: str, span_id: int, start: int, end: int, **kw: object) -> None:
            spans.append(
                ReadableSpan(
                    name=name,
                    context=ctx(span_id),
                    parent=server,
                    resource=resource,
                    instrumentation_scope=scope,
                    start_time=start,
                    end_time=end,
                    **kw,  # type: ignore[arg-type]
                )
            )

        if self.own_server:
            spans.append(
                ReadableSpan(
                    name=self.method,
                    context=server,
                    parent=ctx(self.parent_id, remote=True) if self.parent_id else None,
                    resource=resource,
                    instrumentation_scope=scope,
                    kind=SpanKind.SERVER,
                    attributes=server_attributes(
                        self.method, self.peer, self.user_agent, self.code
                    ),
                    status=server_status(self.code, self.details),
                    start_time=self.start_ns,
                    end_time=self.end_ns,
                )
            )
        if self.route_end:
            attrs: dict[str, str | int] = {
                "microtune.model": self.model,
                "microtune.requested_version": self.requested,
            }
            events: Sequence[Event] = ()
            status = None
            if self.route_error is not None:
                etype, message = self.route_error
                events = (Event("exception", route_exception(etype, message), self.route_end),)
            else:
                assert self.served is not None
                attrs["microtune.served_version"] = self.served
                attrs["microtune.route_reason"] = self.reason
                if not self.own_server and self.code is not _OK:
                    # A streamed request has no server span of its own (the stream's holds no
                    # per-message status), so the route span, its outermost, carries a failure
                    # after routing: the code, the instrumentation's status rule, an event.
                    attrs["rpc.grpc.status_code"] = self.code.value[0]
                    status = server_status(self.code, self.details)
                    exc = route_exception(self.code.name, self.details)
                    events = (Event("exception", exc, self.route_end),)
            extra = {"status": status} if status is not None else {}
            add("microtune.route", route_id, self.route_start, self.route_end,
                attributes=attrs, events=events, **extra)  # fmt: skip
        t = self.timings
        if t is not None:
            assert self.served is not None
            queue_start, exec_start = self.queue_and_execute()
            base = {"microtune.model": self.model, "microtune.version": self.served}
            add("microtune.queue", queue_id, queue_start, exec_start, attributes=base)
            links = [Link(c) for c in (decode_span_ref(r) for r in t.links) if c is not None]
            add("microtune.execute", exec_id, exec_start, self.answer_ns,
                attributes={**base, **execute_attributes(t)}, links=links)  # fmt: skip
        return spans


_ZERO_ID = bytes(8)


def random_span_ids(records: int = 1) -> bytes:
    """Span ids for `records` records, three each (24 bytes a record), as the SDK's
    RandomIdGenerator draws them: random, never 0. One draw for many records: drawing them
    one by one cost ~5k instructions a record."""
    while True:
        ids = getrandbits(192 * records).to_bytes(24 * records, "big")
        if _ZERO_ID not in ids:  # (rarely, also 8 zero bytes across two ids: drawn again)
            return ids


def span_ids_from(generator: IdGenerator) -> Callable[[int], bytes]:
    """Span ids for n records (three each, 8 bytes apiece) from the tracer provider's id
    generator."""
    if type(generator) is RandomIdGenerator:
        return random_span_ids  # the same draws, one call for many

    def draw(records: int = 1) -> bytes:
        return b"".join(generator.generate_span_id().to_bytes(8, "big") for _ in range(3 * records))

    return draw


def execute_attributes(t: Timings) -> dict[str, str | int]:
    return {
        "microtune.batch_size": t.batch_size,
        "microtune.padded_batch": t.padded_batch or t.batch_size,
        "microtune.execution": t.mode,
        "microtune.input_ns": t.input_ns,
        "microtune.compute_ns": t.infer_ns,
        "microtune.output_ns": t.output_ns,
    }


def route_exception(etype: str, message: str) -> dict[str, str]:
    """The OTel exception event's attributes (no stack: routing refusals are domain errors)."""
    return {"exception.type": etype, "exception.message": message, "exception.escaped": "False"}


def server_attributes(
    method: str, peer: str, user_agent: str, code: grpc.StatusCode
) -> dict[str, str | int]:
    """The attributes opentelemetry-instrumentation-grpc gives a server span (its
    `_start_span`, old RPC conventions), so ModelInfer's look like every other RPC's."""
    service, name = method.lstrip("/").split("/", 1)
    attrs: dict[str, str | int] = {
        "rpc.system": "grpc",
        "rpc.grpc.status_code": code.value[0],
        "rpc.method": name,
        "rpc.service": service,
    }
    if user_agent:
        attrs["rpc.user_agent"] = user_agent
    if peer and not peer.startswith("unix:"):
        try:
            ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
        except (IndexError, ValueError):
            return attrs
        ip = unquote(ip)
        attrs["net.peer.ip"] = ip
        attrs["net.peer.port"] = port
        if ip in ("[::1]", "127.0.0.1"):
            attrs["net.peer.name"] = "localhost"
    return attrs


def server_status(code: grpc.StatusCode, details: str) -> Status:
    """The status the instrumentation gives a server span for `code` (its own rule: ERROR for
    server faults such as INTERNAL or UNAVAILABLE, unset for the client's own errors)."""
    from opentelemetry.instrumentation.grpc._utilities import _server_status  # pinned version

    status: Status = _server_status(code, details)
    return status


def span_ref(trace_id: int, span_id: int) -> bytes:
    """A span's (trace id, span id) as the 24 bytes `InferTrace.ref` and batch links hold."""
    return (trace_id << 64 | span_id).to_bytes(24, "big")


def decode_span_ref(ref: bytes) -> SpanContext | None:
    if len(ref) != 24:
        return None
    return SpanContext(
        trace_id=int.from_bytes(ref[:16], "big"),
        span_id=int.from_bytes(ref[16:], "big"),
        is_remote=True,
        trace_flags=_SAMPLED,
    )
