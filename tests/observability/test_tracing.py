"""Traces: the server span of each RPC and the route / queue / execute spans inside ModelInfer.

In process (InMemorySpanExporter on the session's `traced` server, driven with grpc.aio stubs)
and over the wire (a `python -m server serve --tracing otlp` subprocess exporting to an
in-process fake OTLP collector).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from obs_support import InProcess, ServerProcess, fp32_request, in_process_app, wait_for
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, StatusCode, TraceFlags
from otlp_collector import FakeCollector

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg
from server.telemetry.tracing import make_tracing

SERVICE = "inference.GRPCInferenceService"
INFER_CHILDREN = {"microtune.route", "microtune.queue", "microtune.execute"}
Metadata = Sequence[tuple[str, str]]


# ----------------------------------------------------------------------------- helpers


def rpc_of(attributes: Any) -> tuple[str, str, str]:
    """(service, method, status name) of a server span, whichever RPC semantic conventions the
    instrumentation follows: the old ones (rpc.service + rpc.method = "ModelInfer",
    rpc.grpc.status_code = 0) or the new ones (rpc.method = "pkg.Service/Method",
    rpc.response.status_code = "OK")."""
    a = dict(attributes)
    system = a.get("rpc.system", a.get("rpc.system.name"))
    assert system == "grpc", a
    method = str(a["rpc.method"])
    if "rpc.service" in a:
        service = str(a["rpc.service"])
    else:
        service, _, method = method.rpartition("/")
    if "rpc.grpc.status_code" in a:
        status = grpc.StatusCode(
            next(c.value for c in grpc.StatusCode if c.value[0] == a["rpc.grpc.status_code"])
        ).name
    else:
        status = str(a["rpc.response.status_code"])
    return service, method, status


def traceparent(sampled: bool = True) -> tuple[SpanContext, list[tuple[str, str]]]:
    """A client span context and the gRPC metadata carrying it (W3C traceparent)."""
    ctx = SpanContext(
        trace_id=random.getrandbits(128) or 1,
        span_id=random.getrandbits(64) or 1,
        is_remote=False,
        trace_flags=TraceFlags(TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT),
    )
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(ctx)))
    assert "traceparent" in carrier
    return ctx, sorted(carrier.items())


def settle(exporter: InMemorySpanExporter, quiet_s: float = 0.2) -> list[ReadableSpan]:
    """The finished spans once no new one arrived for `quiet_s` (spans of an RPC end around
    the time its answer leaves)."""
    n, last = -1, time.monotonic()
    while True:
        spans = list(exporter.get_finished_spans())
        if len(spans) != n:
            n, last = len(spans), time.monotonic()
        elif time.monotonic() - last >= quiet_s:
            return spans
        time.sleep(0.02)


def fresh(srv: InProcess) -> InMemorySpanExporter:
    assert srv.exporter is not None
    settle(srv.exporter)
    srv.exporter.clear()
    return srv.exporter


def server_spans(spans: Sequence[ReadableSpan], method: str) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER and rpc_of(s.attributes)[1] == method]


def children(spans: Sequence[ReadableSpan], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    """Child spans of `parent` by name (asserting each name appears once)."""
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]
    by_name = {s.name: s for s in kids}
    assert len(by_name) == len(kids), [s.name for s in kids]
    return by_name


async def _infer(target: str, *reqs: pb.ModelInferRequest, metadata: Metadata = ()) -> list[Any]:
    async with grpc.aio.insecure_channel(target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        return list(
            await asyncio.gather(*(stub.ModelInfer(r, metadata=metadata or None) for r in reqs))
        )


# ----------------------------------------------------------------------------- in process


def test_one_server_span_per_rpc_and_no_health_spans(traced: InProcess) -> None:
    exporter = fresh(traced)

    async def calls() -> None:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            for service in ("", "readiness", "liveness"):
                await health.Check(health_pb2.HealthCheckRequest(service=service))
            await stub.ModelMetadata(pb.ModelMetadataRequest(name="dense"))
            await stub.ModelInfer(fp32_request("dense"))
            for service in ("", "readiness"):
                await health.Check(health_pb2.HealthCheckRequest(service=service))

    traced.run(calls())
    spans = settle(exporter)
    servers = [s for s in spans if s.kind is SpanKind.SERVER]
    assert sorted(rpc_of(s.attributes) for s in servers) == [
        (SERVICE, "ModelInfer", "OK"),
        (SERVICE, "ModelMetadata", "OK"),
    ]
    assert not [s for s in spans if "grpc.health" in s.name]
    for s in servers:
        assert s.parent is None  # no client context given: each RPC starts a trace
        assert s.name.endswith(f"{SERVICE}/{rpc_of(s.attributes)[1]}")
        assert s.resource.attributes["service.name"] == "microtune"
    # Metadata has no inner spans; ModelInfer has exactly route, queue and execute.
    (meta,) = server_spans(spans, "ModelMetadata")
    assert children(spans, meta) == {}
    (infer,) = server_spans(spans, "ModelInfer")
    assert set(children(spans, infer)) == INFER_CHILDREN
    # Nothing else was recorded: one server span per RPC, three children for the inference.
    assert len(spans) == 2 + 3


@pytest.mark.parametrize(("requested", "served", "reason"), [("", 2, "stable"), ("1", 1, "pinned")])
def test_infer_spans_route_queue_execute(
    traced: InProcess, requested: str, served: int, reason: str
) -> None:
    exporter = fresh(traced)
    req = fp32_request("dense")
    req.model_version = requested
    (resp,) = traced.run(_infer(traced.target, req))
    assert resp.model_version == str(served)
    spans = settle(exporter)
    (server,) = server_spans(spans, "ModelInfer")
    kids = children(spans, server)
    route, queue, execute = (kids[f"microtune.{n}"] for n in ("route", "queue", "execute"))
    for s in kids.values():
        assert s.kind is SpanKind.INTERNAL
        assert s.context.trace_id == server.context.trace_id
        assert server.start_time <= s.start_time <= s.end_time <= server.end_time
    assert dict(route.attributes) == {
        "microtune.model": "dense",
        "microtune.requested_version": requested,
        "microtune.served_version": served,
        "microtune.route_reason": reason,
    }
    assert dict(queue.attributes) == {"microtune.model": "dense", "microtune.version": served}
    a = dict(execute.attributes)
    assert a["microtune.model"] == "dense" and a["microtune.version"] == served
    assert a["microtune.batch_size"] == 1  # dense has no dynamic batching: alone
    assert a["microtune.padded_batch"] == 1  # no CUDA-graph bucket on CPU: the batch itself
    assert a["microtune.execution"] in ("eager", "replay")
    for key in ("microtune.input_ns", "microtune.compute_ns", "microtune.output_ns"):
        assert isinstance(a[key], int) and a[key] >= 0, key
    assert a["microtune.compute_ns"] > 0
    # Route first, then the queue span hands over to the execute span; the execute span lasts
    # exactly the worker's measured input + compute + output time.
    assert route.end_time <= queue.start_time
    assert queue.end_time == execute.start_time
    measured = a["microtune.input_ns"] + a["microtune.compute_ns"] + a["microtune.output_ns"]
    assert execute.end_time - execute.start_time == measured
    assert not execute.links  # a batch of one links to nobody else


def test_stream_requests_get_inner_spans_under_the_stream_span(traced: InProcess) -> None:
    # ModelStreamInfer's server span is the instrumentation's; each request adds its own
    # route, queue and execute spans under it.
    exporter = fresh(traced)

    async def stream() -> list[Any]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            reqs = [fp32_request("dense", request_id=f"s{i}") for i in range(2)]
            return [r async for r in stub.ModelStreamInfer(iter(reqs))]

    answers = traced.run(stream())
    assert [a.error_message for a in answers] == ["", ""]
    spans = settle(exporter)
    (server,) = server_spans(spans, "ModelStreamInfer")
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == server.context.span_id]
    assert sorted(s.name for s in kids) == sorted([*INFER_CHILDREN] * 2)
    assert {s.context.trace_id for s in kids} == {server.context.trace_id}


def test_streamed_request_that_fails_marks_its_route_span(traced: InProcess) -> None:
    # A stream has one server span for all its requests, so a request that fails after routing
    # says so on its route span: the code, ERROR for a server fault, an exception event.
    exporter = fresh(traced)

    async def stream() -> list[Any]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            reqs = [fp32_request("dense"), fp32_request("rows4", values=3)]
            return [r async for r in stub.ModelStreamInfer(iter(reqs))]

    ok, failed = traced.run(stream())
    assert ok.error_message == "" and failed.error_message != ""
    routes = [s for s in settle(exporter) if s.name == "microtune.route"]
    by_model = {s.attributes["microtune.model"]: s for s in routes}
    good, bad = by_model["dense"], by_model["rows4"]
    assert "rpc.grpc.status_code" not in good.attributes and not good.events
    assert good.status.status_code is StatusCode.UNSET
    assert bad.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]
    assert bad.status.status_code is StatusCode.ERROR
    (event,) = bad.events
    assert event.name == "exception"
    assert event.attributes["exception.type"] == "INTERNAL"
    assert event.attributes["exception.message"] == failed.error_message


def test_reflection_and_admin_rpcs_are_traced_too(traced: InProcess) -> None:
    # Every service's methods are wrapped at registration (no server interceptor): reflection,
    # registered through grpc-reflection's own helper, and the admin service get spans as well.
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from server._proto.microtune import admin_pb2, admin_pb2_grpc

    exporter = fresh(traced)

    async def calls() -> list[str]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            req = reflection_pb2.ServerReflectionRequest(list_services="")
            answers = [a async for a in stub.ServerReflectionInfo(iter([req]))]
            await admin_pb2_grpc.RoutingAdminStub(ch).GetRouting(
                admin_pb2.GetRoutingRequest(model="dense")
            )
            return [s.name for s in answers[0].list_services_response.service]

    services = traced.run(calls())
    assert f"{SERVICE}" in services and "grpc.health.v1.Health" in services
    names = {s.name for s in settle(exporter) if s.kind is SpanKind.SERVER}
    assert "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo" in names
    assert "/microtune.admin.v1.RoutingAdmin/GetRouting" in names


def test_failed_request_span_has_error_status(traced: InProcess) -> None:
    exporter = fresh(traced)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        traced.run(_infer(traced.target, fp32_request("rows4", values=3)))
    assert err.value.code() is grpc.StatusCode.INTERNAL
    (server,) = server_spans(settle(exporter), "ModelInfer")
    assert rpc_of(server.attributes)[2] == "INTERNAL"
    assert server.status.status_code is StatusCode.ERROR


def test_refused_route_still_ends_its_span(traced: InProcess) -> None:
    exporter = fresh(traced)
    req = fp32_request("dense")
    req.model_version = "7"  # dense has versions 1 and 2
    with pytest.raises(grpc.aio.AioRpcError) as err:
        traced.run(_infer(traced.target, req))
    spans = settle(exporter)
    (server,) = server_spans(spans, "ModelInfer")
    assert rpc_of(server.attributes)[2] == err.value.code().name
    kids = children(spans, server)
    assert set(kids) == {"microtune.route"}  # nothing was queued or executed
    route = kids["microtune.route"]
    assert route.attributes["microtune.model"] == "dense"
    assert route.attributes["microtune.requested_version"] == "7"
    assert [e.name for e in route.events] == ["exception"]


def test_client_traceparent_continues_the_clients_trace(traced: InProcess) -> None:
    exporter = fresh(traced)
    client, metadata = traceparent()
    traced.run(_infer(traced.target, fp32_request("dense"), metadata=metadata))
    spans = settle(exporter)
    (server,) = server_spans(spans, "ModelInfer")
    assert server.context.trace_id == client.trace_id
    assert server.parent is not None and server.parent.span_id == client.span_id
    assert server.parent.is_remote
    assert len(children(spans, server)) == 3
    assert {s.context.trace_id for s in spans} == {client.trace_id}


def test_client_that_did_not_sample_is_not_traced(traced: InProcess) -> None:
    # Parent-based sampling: the client's decision wins over the server's ratio (1.0 here).
    exporter = fresh(traced)
    _, metadata = traceparent(sampled=False)
    traced.run(_infer(traced.target, fp32_request("dense"), metadata=metadata))
    assert settle(exporter) == []


def test_batch_execute_span_links_every_request_of_the_batch(traced: InProcess) -> None:
    exporter = fresh(traced)
    n = 4
    reqs = [fp32_request("dense_batched", request_id=f"b{i}") for i in range(n)]
    traced.run(_infer(traced.target, *reqs))
    spans = settle(exporter)
    servers = server_spans(spans, "ModelInfer")
    assert len(servers) == n
    server_ids = {s.context.span_id for s in servers}
    executes = []
    for server in servers:
        kids = children(spans, server)
        assert set(kids) == INFER_CHILDREN
        executes.append((server, kids["microtune.execute"]))
    # The request the worker counted the execution on carries one link per request of the
    # batch (its own included); the others carry the same batch attributes and no links.
    counted = [(s, e) for s, e in executes if e.links]
    assert counted, "no execute span carries the batch's links"
    linked: set[int] = set()
    for _server, execute in counted:
        ids = [link.context.span_id for link in execute.links]
        assert len(ids) == len(set(ids)) == execute.attributes["microtune.batch_size"]
        assert set(ids) <= server_ids
        assert all(link.context.trace_id in {s.context.trace_id for s in servers}
                   for link in execute.links)  # fmt: skip
        linked |= set(ids)
    assert linked == server_ids  # every request is linked from the execution it ran in
    # Each execution is counted once: the batch sizes of the counted spans add up to n.
    assert sum(e.attributes["microtune.batch_size"] for _, e in counted) == n
    server, execute = max(counted, key=lambda se: se[1].attributes["microtune.batch_size"])
    assert execute.attributes["microtune.batch_size"] >= 2, "the requests never shared a batch"
    others = {link.context.span_id for link in execute.links} - {server.context.span_id}
    assert others, "the batch's execute span links no other request"
    # The requests served by that execution report its batch size in their own execute span.
    same = [e for _, e in executes if e.attributes["microtune.batch_size"] ==
            execute.attributes["microtune.batch_size"]]  # fmt: skip
    assert len(same) >= execute.attributes["microtune.batch_size"]


def test_tracing_off_records_nothing(
    model_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A global provider that records everything: a code path falling back to the global
    # tracer (instead of doing nothing) would show up in it.
    recorder = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(recorder))
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    with in_process_app(model_repository, None, tracing="off") as srv:
        assert srv.app.tracing is None
        assert srv.app.handler.tracer is None
        _, metadata = traceparent()
        srv.run(_infer(srv.target, fp32_request("dense"), fp32_request("dense_batched"),
                       metadata=metadata))  # fmt: skip
    assert recorder.get_finished_spans() == ()


def test_resource_service_name_defaults_and_otel_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def resource() -> dict[str, Any]:
        tracing = make_tracing("console", 1.0, "9.9.9", InMemorySpanExporter())
        assert tracing is not None
        attrs = dict(tracing.provider.resource.attributes)
        asyncio.run(tracing.shutdown())
        return attrs

    for var in ("OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(var, raising=False)
    r = resource()
    assert (r["service.name"], r["service.version"]) == ("microtune", "9.9.9")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.pod.name=pod-7,service.version=x")
    r = resource()
    assert (r["service.name"], r["service.version"], r["k8s.pod.name"]) == (
        "microtune",
        "x",
        "pod-7",
    )
    monkeypatch.setenv("OTEL_SERVICE_NAME", "scorer")
    assert resource()["service.name"] == "scorer"


# ----------------------------------------------------------------------------- over the wire


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_otlp_export_over_the_wire_continues_client_trace(
    model_repository: Path, tmp_path: Path, compression: str
) -> None:
    """(OTEL_EXPORTER_OTLP_COMPRESSION=none, OTLP's other value, stopped the server at start:
    the pinned exporter reads only gzip from the variable.)"""
    collector = FakeCollector().start()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_COMPRESSION": compression,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s instead of 5 s
        "OTEL_SERVICE_NAME": "microtune-under-test",
    }
    args = ["--model-repository", str(model_repository), "--tracing", "otlp",
            "--metrics-port", "0", "--log-format", "json"]  # fmt: skip
    try:
        with ServerProcess(tmp_path / "server", args, env) as server:
            client, metadata = traceparent()
            with grpc.insecure_channel(server.target) as ch:
                stub = pbg.GRPCInferenceServiceStub(ch)
                stub.ModelInfer(fp32_request("dense", request_id="wire-1"), metadata=metadata)

            def ours() -> list[Any]:
                got = [s for s in collector.spans() if s.trace_id == client.trace_id]
                return got if len(got) >= 4 else []

            spans = wait_for(ours, 20, "4 spans of the client's trace at the collector")
    finally:
        collector.stop()
    by_name = {s.span.name: s for s in spans}
    assert len(by_name) == len(spans) == 4, sorted(by_name)
    (server_name,) = [n for n in by_name if n.endswith(f"{SERVICE}/ModelInfer")]
    srv = by_name[server_name]
    assert srv.parent_span_id == client.span_id
    assert rpc_of(srv.attributes)[:2] == (SERVICE, "ModelInfer")
    for name in ("microtune.route", "microtune.queue", "microtune.execute"):
        assert by_name[name].parent_span_id == srv.span_id, name
    assert by_name["microtune.route"].attributes["microtune.model"] == "dense"
    assert by_name["microtune.execute"].attributes["microtune.batch_size"] == 1
    # OTEL_SERVICE_NAME (a standard variable) wins over the default service name.
    assert srv.resource["service.name"] == "microtune-under-test"
    assert "service.version" in srv.resource


# ----------------------------------------------------------------------------- misconfigured


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "5s", "is not a number of seconds"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "ten", "is not a number of seconds"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd", "is not one of gzip, none"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "lz4", "is not one of gzip, none"),
        # (grpc could send it, but a collector does not decode it over gRPC)
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "deflate", "is not one of gzip, none"),
    ],
)
def test_an_otlp_variable_the_exporter_cannot_use_is_a_start_error(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    """(The exporter's bare ValueError escaped App: a traceback naming no variable, exit 1.)"""
    from server.errors import CannotStart

    monkeypatch.setenv(variable, value)
    with pytest.raises(CannotStart) as info:
        make_tracing("otlp", 1.0, "9.9.9")
    assert str(info.value) == f"--tracing otlp: {variable}={value!r} {message}"
    make_tracing("console", 1.0, "9.9.9")  # only the OTLP exporter reads them


BOTH_COMPRESSIONS = {  # the traces' own variable wins
    "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "none",
}


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        ({}, grpc.Compression.NoCompression),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "gzip"}, grpc.Compression.Gzip),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": " NONE "}, grpc.Compression.NoCompression),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": ""}, grpc.Compression.NoCompression),  # unset
        (BOTH_COMPRESSIONS, grpc.Compression.NoCompression),
    ],
)
def test_the_otlp_compressions_the_docs_name_configure_the_sender(
    monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: grpc.Compression
) -> None:
    for name in ("OTEL_EXPORTER_OTLP_COMPRESSION", "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    tracing = make_tracing("otlp", 1.0, "9.9.9")
    assert tracing is not None and tracing.sender is not None
    try:
        assert tracing.sender._compression == expected
    finally:
        tracing.provider.shutdown()


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_bad_otlp_variable_stops_the_server_with_one_line(
    model_repository: Path, tmp_path: Path, frontends: str
) -> None:
    """A lone front ended with ~40 lines of traceback and exit code 1; under the supervisor
    every front died so and was restarted until --restart-limit, then the server exited 70."""
    args = ["--model-repository", str(model_repository), "--tracing", "otlp",
            "--metrics-port", "-1", "--log-format", "json", "--frontends", frontends]  # fmt: skip
    server = ServerProcess(tmp_path, args, {"OTEL_EXPORTER_OTLP_TIMEOUT": "5s"})
    with pytest.raises(AssertionError, match=r"server exited \(78\)"):
        server.start(timeout=60)
    err = server.stderr()
    assert "cannot start: --tracing otlp: OTEL_EXPORTER_OTLP_TIMEOUT='5s' is not a number" in err
    assert "Traceback" not in err
    assert all(line.startswith("{") for line in err.splitlines()), err  # JSON lines only
