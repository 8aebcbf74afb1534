"""Logs: JSON lines on stderr (front and worker alike), nothing per successful request at INFO,
and a failing request's line attributed with its request id, model, served version and trace."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import shutil
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from obs_support import ServerProcess, fp32_request, json_log_records, wait_for
from opentelemetry import propagate, trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg
from server.rpc.status import rpc_errors
from server.settings import DEMO_REPOSITORY
from server.telemetry.logs import setup_logging

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331


def _traceparent() -> list[tuple[str, str]]:
    ctx = SpanContext(TRACE_ID, PARENT_ID, is_remote=False, trace_flags=TraceFlags(1))
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(NonRecordingSpan(ctx)))
    return sorted(carrier.items())


def test_json_lines_and_one_attributed_line_per_failed_request(
    model_repository: Path, tmp_path: Path
) -> None:
    args = ["--model-repository", str(model_repository), "--log-format", "json",
            "--tracing", "console", "--metrics-port", "-1"]  # fmt: skip
    with ServerProcess(tmp_path / "server", args) as server:
        with grpc.insecure_channel(server.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            for i in range(5):
                stub.ModelInfer(fp32_request("dense", request_id=f"ok-{i}"))
            bad_shape = fp32_request("dense", values=7, request_id="client-error-1")
            with pytest.raises(grpc.RpcError) as client_err:
                stub.ModelInfer(bad_shape)
            assert client_err.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as model_err:
                stub.ModelInfer(
                    fp32_request("rows4", values=3, request_id="fail-1"), metadata=_traceparent()
                )
            assert model_err.value.code() is grpc.StatusCode.INTERNAL

        def failure_line() -> list[dict[str, Any]]:
            return [r for r in json_log_records(server.stderr()) if r.get("request_id")]

        wait_for(failure_line, 10, "the failed request's log line")
    records = json_log_records(server.stderr())  # every line, worker's included, is JSON
    assert records
    for r in records:
        assert {"ts", "level", "logger", "msg", "pid"} <= r.keys(), r
        assert r["ts"].endswith("Z")
    pids = {r["pid"] for r in records}
    assert len(pids) >= 2, "the worker's lines are missing (or not JSON)"
    assert any(r["logger"] == "microtune.worker" for r in records)

    # Exactly one request-level line: the model failure. Successes and the client's own error
    # (INVALID_ARGUMENT, answered to the client) log nothing at INFO.
    request_lines = [r for r in records if "request_id" in r or "trace_id" in r]
    assert len(request_lines) == 1, request_lines
    (line,) = request_lines
    assert line["level"] == "WARNING"
    assert line["request_id"] == "fail-1"
    assert line["model"] == "rows4"
    assert line["version"] == "1"  # the served version
    assert line["trace_id"] == f"{TRACE_ID:032x}"  # the client's trace, continued
    assert len(line["span_id"]) == 16 and int(line["span_id"], 16) != PARENT_ID
    assert "Reshape" in line["msg"]
    assert not [r for r in records if "ok-" in json.dumps(r) or "client-error" in json.dumps(r)]


def _string_request(model: str, value: bytes) -> pb.ModelInferRequest:
    """simple_string's two BYTES [1, 16] inputs, every element `value` (KServe raw framing:
    a 4-byte little-endian length before each element)."""
    req = pb.ModelInferRequest(model_name=model)
    raw = (struct.pack("<I", len(value)) + value) * 16
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add()
        t.name, t.datatype = name, "BYTES"
        t.shape.extend([1, 16])
        req.raw_input_contents.append(raw)
    return req


def test_every_stderr_line_is_json_with_the_demo_repository(tmp_path: Path) -> None:
    """`--log-format json` with the demo repository: start-up, every model's load, a request that
    onnxruntime fails at run time (simple_string's Cast of "abc" to int32) and shutdown write
    only JSON objects to stderr, the worker's lines included. onnxruntime's own error line is
    not among them: the error reaches the log once, as the failed request's WARNING."""
    args = ["--model-repository", str(DEMO_REPOSITORY), "--log-format", "json",
            "--metrics-port", "-1"]  # fmt: skip
    with ServerProcess(tmp_path / "server", args) as server:
        with grpc.insecure_channel(server.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(_string_request("simple_string", b"abc"), timeout=30)
            assert err.value.code() is grpc.StatusCode.INTERNAL
            assert "Cast" in (err.value.details() or "")
        wait_for(lambda: "inference failed" in server.stderr(), 10, "the failure's log line")
    records = json_log_records(server.stderr())  # asserts that every line is one JSON object
    loaded = {r["msg"].split()[1] for r in records if r["msg"].startswith("loaded ")}
    assert loaded == {p.name for p in DEMO_REPOSITORY.iterdir() if p.is_dir()}
    assert any(r["logger"] == "microtune.worker" for r in records)  # the worker's lines too
    assert not [r for r in records if r["logger"] in ("onnxruntime", "microtune.worker.stderr")]
    (failure,) = [r for r in records if "Cast" in r["msg"]]
    assert failure["level"] == "WARNING" and failure["model"] == "simple_string"


def test_internal_error_line_carries_the_request_fields() -> None:
    """rpc_errors' INTERNAL path (an unexpected exception) logs the error id with the request's
    id, model and requested version bound, and the traceback."""

    class Context:
        details = ""

        def time_remaining(self) -> None:
            return None  # no deadline

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            self.details = details
            raise grpc.aio.AbortError()

    class Servicer:
        @rpc_errors
        async def ModelInfer(self, request: bytes, context: Any) -> None:
            raise RuntimeError("boom")

    stream = io.StringIO()
    logger = logging.getLogger("microtune.rpc")
    saved = (logger.level, logger.propagate)
    setup_logging("INFO", "json", stream=stream, logger=logger)
    logger.propagate = False
    try:
        ctx = Context()
        # ModelInfer receives its request serialized (server.rpc.wire)
        message = pb.ModelInferRequest(model_name="dense", model_version="2", id="req-42")
        req = message.SerializeToString()
        with pytest.raises(grpc.aio.AbortError):
            asyncio.run(Servicer().ModelInfer(req, ctx))
    finally:
        for h in list(logger.handlers):
            logger.removeHandler(h)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
    (line,) = [json.loads(x) for x in stream.getvalue().splitlines()]
    error_id = ctx.details.split("(id ")[1].split(")")[0]
    assert line["level"] == "ERROR"
    assert line["msg"] == f"internal error {error_id} in ModelInfer"
    assert (line["request_id"], line["model"], line["version"]) == ("req-42", "dense", "2")
    assert "RuntimeError: boom" in line["exc"]


def test_debug_level_keeps_grpc_per_call_lines_out() -> None:
    """--log-level DEBUG: grpc's Cython layer logged a DEBUG line per call (11,339 lines for
    11,283 requests); its INFO and above still come through, ours at DEBUG too."""
    out = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("grpc").level)
    try:
        setup_logging("DEBUG", "text", stream=out)
        logging.getLogger("grpc._cython.cygrpc").debug("Loaded running loop")
        logging.getLogger("grpc._cython.cygrpc").info("grpc info")
        logging.getLogger("microtune").debug("ours")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("grpc").setLevel(saved[2])
    text = out.getvalue()
    assert "Loaded running loop" not in text
    assert "grpc info" in text and "ours" in text


def _refused_repository(root: Path) -> Path:
    """`simple`, and four models that cannot load: a config microtune refuses, one that does
    not parse, a version directory without its model file, and no version directory."""
    shutil.copytree(DEMO_REPOSITORY / "simple", root / "simple")
    config = (DEMO_REPOSITORY / "simple" / "config.pbtxt").read_text()
    for name, extra in (("seq", "sequence_batching { }\n"), ("typo", "max_batchsize: 8\n")):
        shutil.copytree(DEMO_REPOSITORY / "simple", root / name)
        renamed = config.replace('name: "simple"', f'name: "{name}"')
        (root / name / "config.pbtxt").write_text(renamed + extra)
    (root / "nofile" / "1").mkdir(parents=True)
    (root / "noversion").mkdir()
    return root


def test_each_refused_model_is_logged_once_and_the_last_line_says_not_ready(
    tmp_path: Path,
) -> None:
    """A model refused at start-up (none of its versions can load) was in RepositoryIndex
    only: the log ended "microtune ready: 5 model(s)" while strict readiness kept the server
    NOT_SERVING for good. Each reason is now an ERROR line, said once (poll mode does not say
    it again at every poll, and says a model that comes without a version directory), and the
    start-up's last line says the server is not ready, and why."""
    repo = _refused_repository(tmp_path / "models")
    args = ["--model-repository", str(repo), "--log-format", "json", "--metrics-port", "-1",
            "--model-control-mode", "poll", "--repository-poll-s", "0.5"]  # fmt: skip
    server = ServerProcess(tmp_path / "server", args).start(ready=False)
    try:
        wait_for(lambda: "microtune started" in server.stderr(), 60, "the start-up's last line")
        (repo / "late").mkdir()  # a model without a version, added while the server runs
        (repo / "late" / "config.pbtxt").write_text(
            (repo / "simple" / "config.pbtxt").read_text().replace('"simple"', '"late"')
        )
        wait_for(lambda: "'late'" in server.stderr(), 10, "the late model's error")
        time.sleep(2.0)  # four polls more
        with grpc.insecure_channel(server.target) as ch:
            got = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=10
            )
        assert got.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        server.stop()
    records = json_log_records(server.stderr())
    errors = sorted(r["msg"] for r in records if r["level"] == "ERROR")
    assert len(errors) == 5, errors
    assert errors[0].startswith("config of model 'typo' does not parse: "), errors
    assert 'no field named "max_batchsize"' in errors[0]
    assert errors[1:] == [
        "failed to load 'late': model 'late' has no version directory selected by its "
        "version policy (found: none)",
        "model 'noversion' has no version directory selected by its version policy (found: none)",
        "model 'seq': sequence_batching (stateful models): not supported by microtune",
        "model nofile version 1 has no model.onnx",
    ], errors
    (started,) = [r for r in records if r["msg"].startswith("microtune started")]
    assert started["level"] == "WARNING"
    assert started["msg"] == (
        "microtune started, not ready: 5 model(s), 4 unavailable (nofile, noversion, seq, "
        "typo); readiness stays NOT_SERVING while they fail (--strict-readiness)"
    )
    assert not [r for r in records if r["msg"].startswith("microtune ready")]
