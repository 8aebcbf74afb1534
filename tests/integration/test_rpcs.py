"""Every RPC of inference.GRPCInferenceService through three clients: tritonclient.grpc (sync),
tritonclient.grpc.aio, and the raw generated stub with the reference proto's messages."""

from __future__ import annotations

import asyncio
import tomllib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import BAD_MODELS, ROOT, Server
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException

T = TypeVar("T")

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
# Extensions these tests rely on; the server may list more.
EXTENSIONS = {"model_configuration", "statistics", "model_repository"}

# RPCs this server does not implement (in its default configuration): UNIMPLEMENTED, and the
# message names the RPC.
UNIMPLEMENTED_RPCS = ("RepositoryModelLoad", "RepositoryModelUnload", "TraceSetting", "LogSettings")
# Client shared memory is off unless --allow-client-shm: UNIMPLEMENTED, and the message says how
# to turn it on.
SHM_RPCS = (
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
)
# RPCs that answer in the default configuration, each tested below with every client.
SERVED_RPCS = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelConfig",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelStatistics",
    "RepositoryIndex",
)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 30.0) -> T:
    """Run one coroutine on a fresh event loop, bounded in time."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro_fn(), timeout)

    return asyncio.run(bounded())


def simple_inputs(batch: int = 1) -> tuple[list[grpcclient.InferInput], np.ndarray, np.ndarray]:
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16)
    b = np.full((batch, 16), 3, dtype=np.int32)
    ins = [
        grpcclient.InferInput("INPUT0", [batch, 16], "INT32"),
        grpcclient.InferInput("INPUT1", [batch, 16], "INT32"),
    ]
    ins[0].set_data_from_numpy(a)
    ins[1].set_data_from_numpy(b)
    return ins, a, b


def simple_request(batch: int = 1, rid: str = "") -> tuple[pb.ModelInferRequest, np.ndarray]:
    a = np.arange(batch * 16, dtype=np.int32).reshape(batch, 16)
    req = pb.ModelInferRequest(model_name="simple", id=rid)
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[batch, 16])
        req.raw_input_contents.append(a.tobytes())
    return req, a


def expect_unimplemented(exc: InferenceServerException | grpc.RpcError, rpc: str) -> None:
    if isinstance(exc, grpc.RpcError):
        code, details = exc.code(), exc.details() or ""
        assert code == grpc.StatusCode.UNIMPLEMENTED, (code, details)
    else:
        assert exc.status() == "StatusCode.UNIMPLEMENTED", (exc.status(), exc.message())
        details = exc.message() or ""
    if rpc in SHM_RPCS:
        assert "shared memory" in details and "--allow-client-shm" in details, details
    else:
        assert rpc in UNIMPLEMENTED_RPCS, rpc
        assert rpc in details, details


def test_every_rpc_is_covered() -> None:
    """A new RPC in the reference proto must be added to one of the lists above."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    listed = SERVED_RPCS + UNIMPLEMENTED_RPCS + SHM_RPCS
    assert sorted(m.name for m in service.methods) == sorted(listed)


def check_simple_stats(stats: Any, before: dict[str, int], batch: int, n: int) -> None:
    inf = stats.inference_stats
    assert stats.name == "simple" and stats.version == "1"
    assert inf.success.count == before["success"] + n
    assert stats.inference_count == before["inference_count"] + n * batch
    assert stats.execution_count == before["execution_count"] + n
    for phase in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        d = getattr(inf, phase)
        assert d.count >= n and d.ns > 0, (phase, d)
    assert stats.last_inference > 0
    assert any(b.batch_size == batch and b.compute_infer.count >= n for b in stats.batch_stats)


def counters(stats: Any) -> dict[str, int]:
    return {
        "success": stats.inference_stats.success.count,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
    }


# ============================================================================ tritonclient.grpc


class TestSyncClient:
    def test_live_and_ready(self, client: grpcclient.InferenceServerClient) -> None:
        assert client.is_server_live() is True
        assert client.is_server_ready() is True

    def test_model_ready(self, client: grpcclient.InferenceServerClient) -> None:
        assert client.is_model_ready("simple") is True
        assert client.is_model_ready("dense", "1") is True
        assert client.is_model_ready("dense", "2") is True
        # Unknown model / version and broken models: not ready, with an OK status.
        assert client.is_model_ready("no_such_model") is False
        assert client.is_model_ready("dense", "7") is False
        for name in BAD_MODELS:
            assert client.is_model_ready(name) is False, name

    def test_server_metadata(self, client: grpcclient.InferenceServerClient) -> None:
        md = client.get_server_metadata()
        assert md.name == "triton"
        assert md.version == VERSION
        assert set(md.extensions) >= EXTENSIONS
        # Client shared memory is off here (--allow-client-shm): not listed, as its RPCs
        # are refused (tests/integration/test_extensions.py has it on, and listed).
        assert not {"system_shared_memory", "cuda_shared_memory"} & set(md.extensions)

    def test_model_metadata(self, client: grpcclient.InferenceServerClient) -> None:
        md = client.get_model_metadata("simple")
        assert md.name == "simple"
        assert md.platform == "onnxruntime_onnx"
        assert list(md.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [
            ("INPUT0", "INT32", [-1, 16]),
            ("INPUT1", "INT32", [-1, 16]),
        ]
        assert [(t.name, t.datatype, list(t.shape)) for t in md.outputs] == [
            ("OUTPUT0", "INT32", [-1, 16]),
            ("OUTPUT1", "INT32", [-1, 16]),
        ]
        # As Triton: the version asked for, or without one every ready version.
        dense = client.get_model_metadata("dense", "1")
        assert list(dense.versions) == ["1"]
        assert list(client.get_model_metadata("dense").versions) == ["1", "2"]
        assert [list(t.shape) for t in dense.inputs] == [[-1, 256]]

    def test_model_metadata_as_json(self, client: grpcclient.InferenceServerClient) -> None:
        md = client.get_model_metadata("simple_identity", as_json=True)
        assert md["inputs"] == [{"name": "INPUT0", "datatype": "BYTES", "shape": ["-1", "-1"]}]

    def test_model_config(self, client: grpcclient.InferenceServerClient) -> None:
        cfg = client.get_model_config("simple", as_json=True)["config"]
        assert cfg["name"] == "simple"
        assert cfg["platform"] == "onnxruntime_onnx"
        assert cfg["max_batch_size"] == 8
        assert [(i["name"], i["data_type"], i["dims"]) for i in cfg["input"]] == [
            ("INPUT0", "TYPE_INT32", ["16"]),
            ("INPUT1", "TYPE_INT32", ["16"]),
        ]
        assert [(o["name"], o["data_type"], o["dims"]) for o in cfg["output"]] == [
            ("OUTPUT0", "TYPE_INT32", ["16"]),
            ("OUTPUT1", "TYPE_INT32", ["16"]),
        ]
        s = client.get_model_config("simple_string").config
        assert s.input[0].data_type == mc.TYPE_STRING and list(s.input[0].dims) == [16]

    def test_infer(self, client: grpcclient.InferenceServerClient) -> None:
        ins, a, b = simple_inputs(batch=3)
        outs = [
            grpcclient.InferRequestedOutput("OUTPUT0"),
            grpcclient.InferRequestedOutput("OUTPUT1"),
        ]
        res = client.infer("simple", ins, outputs=outs, request_id="req-1")
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
        resp = res.get_response()
        assert resp.model_name == "simple" and resp.model_version == "1" and resp.id == "req-1"

    def test_infer_one_output_and_version(self, client: grpcclient.InferenceServerClient) -> None:
        ins, a, b = simple_inputs()
        res = client.infer(
            "simple", ins, model_version="1", outputs=[grpcclient.InferRequestedOutput("OUTPUT1")]
        )
        np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
        assert res.as_numpy("OUTPUT0") is None

    def test_infer_serves_requested_version(self, client: grpcclient.InferenceServerClient) -> None:
        x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
        inp = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
        inp.set_data_from_numpy(x)
        r1 = client.infer("dense", [inp], model_version="1")
        r2 = client.infer("dense", [inp], model_version="2")
        latest = client.infer("dense", [inp])
        assert r1.get_response().model_version == "1"
        assert r2.get_response().model_version == "2"
        assert latest.get_response().model_version == "2"
        assert not np.array_equal(r1.as_numpy("OUTPUT0"), r2.as_numpy("OUTPUT0"))
        np.testing.assert_array_equal(latest.as_numpy("OUTPUT0"), r2.as_numpy("OUTPUT0"))

    def test_stream_infer_error_does_not_end_stream(
        self, client: grpcclient.InferenceServerClient
    ) -> None:
        import queue

        got: queue.Queue[tuple[Any, Any]] = queue.Queue()
        client.start_stream(callback=lambda result, error: got.put((result, error)))
        try:
            ins, a, b = simple_inputs()
            client.async_stream_infer("simple", ins, request_id="s1")
            bad = grpcclient.InferInput("WRONG", [1, 16], "INT32")
            bad.set_data_from_numpy(a)
            client.async_stream_infer("simple", [bad, ins[1]], request_id="s2")
            client.async_stream_infer("simple", ins, request_id="s3")
            results = [got.get(timeout=10) for _ in range(3)]
        finally:
            client.stop_stream()
        # One request at a time on a stream, answered in order.
        (r1, e1), (r2, e2), (r3, e3) = results
        assert e1 is None and r1.get_response().id == "s1"
        np.testing.assert_array_equal(r1.as_numpy("OUTPUT0"), a + b)
        assert r2 is None and e2 is not None
        assert "unexpected input 'WRONG'" in e2.message()
        assert e3 is None and r3.get_response().id == "s3"

    def test_statistics(self, client: grpcclient.InferenceServerClient) -> None:
        before = counters(client.get_inference_statistics("simple").model_stats[0])
        for _ in range(3):
            ins, _, _ = simple_inputs(batch=4)
            client.infer("simple", ins)
        stats = client.get_inference_statistics("simple", "1").model_stats
        assert len(stats) == 1
        check_simple_stats(stats[0], before, batch=4, n=3)

    def test_statistics_all_models(self, client: grpcclient.InferenceServerClient) -> None:
        names = {s.name for s in client.get_inference_statistics("").model_stats}
        assert {"simple", "dense", "id_fp32", "id_bytes"} <= names
        assert not names & set(BAD_MODELS)
        dense = client.get_inference_statistics("dense").model_stats
        assert sorted(s.version for s in dense) == ["1", "2"]

    def test_statistics_unknown_model(self, client: grpcclient.InferenceServerClient) -> None:
        with pytest.raises(InferenceServerException) as ei:
            client.get_inference_statistics("no_such_model")
        assert ei.value.status() == "StatusCode.NOT_FOUND"
        assert "no_such_model" in ei.value.message()

    def test_repository_index(self, client: grpcclient.InferenceServerClient) -> None:
        index = client.get_model_repository_index().models
        by_name: dict[str, list[Any]] = {}
        for m in index:
            by_name.setdefault(m.name, []).append(m)
        assert [(m.version, m.state) for m in by_name["dense"]] == [("1", "READY"), ("2", "READY")]
        assert by_name["simple"][0].state == "READY" and by_name["simple"][0].reason == ""
        for name in BAD_MODELS:
            (entry,) = by_name[name]
            assert entry.state == "UNAVAILABLE", entry
            assert entry.reason, entry
        assert "onnxruntime cannot load" in by_name["bad_corrupt"][0].reason
        assert "'IN' is INT64 but the ONNX graph has FP32" in by_name["bad_dtype"][0].reason
        assert "'NOPE' is not an input of the ONNX graph" in by_name["bad_input_name"][0].reason
        assert "no version directory" in by_name["bad_no_versions"][0].reason
        assert by_name["bad_no_versions"][0].version == ""
        ready = client.get_model_repository_index(as_json=True)
        assert ready["models"]

    def test_repository_index_ready_filter(self, channel: grpc.Channel) -> None:
        # tritonclient does not expose `ready`; the raw stub does.
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=10).models
        assert {m.state for m in index} == {"READY"}
        names = {m.name for m in index}
        assert "simple" in names and "id_fp16" in names
        assert not names & set(BAD_MODELS)

    @pytest.mark.parametrize(
        ("rpc", "call"),
        [
            ("RepositoryModelLoad", lambda c: c.load_model("simple")),
            ("RepositoryModelUnload", lambda c: c.unload_model("simple")),
            ("SystemSharedMemoryStatus", lambda c: c.get_system_shared_memory_status()),
            (
                "SystemSharedMemoryRegister",
                lambda c: c.register_system_shared_memory("r", "/k", 64),
            ),
            ("SystemSharedMemoryUnregister", lambda c: c.unregister_system_shared_memory("r")),
            ("CudaSharedMemoryStatus", lambda c: c.get_cuda_shared_memory_status()),
            (
                "CudaSharedMemoryRegister",
                lambda c: c.register_cuda_shared_memory("r", b"\0" * 64, 0, 64),
            ),
            ("CudaSharedMemoryUnregister", lambda c: c.unregister_cuda_shared_memory("r")),
            ("TraceSetting", lambda c: c.get_trace_settings()),
            ("TraceSetting", lambda c: c.update_trace_settings(settings={"trace_rate": "1"})),
            ("LogSettings", lambda c: c.get_log_settings()),
            ("LogSettings", lambda c: c.update_log_settings({"log_verbose_level": 1})),
        ],
    )
    def test_unimplemented(
        self,
        client: grpcclient.InferenceServerClient,
        rpc: str,
        call: Callable[[grpcclient.InferenceServerClient], object],
    ) -> None:
        with pytest.raises(InferenceServerException) as ei:
            call(client)
        expect_unimplemented(ei.value, rpc)


# ============================================================================ tritonclient.grpc.aio


class TestAioClient:
    def test_health_and_metadata(self, server: Server) -> None:
        async def go() -> None:
            async with aioclient.InferenceServerClient(server.url) as c:
                assert await c.is_server_live() is True
                assert await c.is_server_ready() is True
                assert await c.is_model_ready("simple") is True
                assert await c.is_model_ready("dense", "2") is True
                assert await c.is_model_ready("no_such_model") is False
                assert await c.is_model_ready("bad_corrupt") is False
                md = await c.get_server_metadata()
                assert (md.name, md.version) == ("triton", VERSION)
                assert set(md.extensions) >= EXTENSIONS
                mm = await c.get_model_metadata("dense", "2")
                assert mm.platform == "onnxruntime_onnx" and list(mm.versions) == ["2"]
                assert [list(t.shape) for t in mm.outputs] == [[-1, 10]]
                cfg = (await c.get_model_config("dense")).config
                assert cfg.max_batch_size == 8
                assert [(i.name, i.data_type, list(i.dims)) for i in cfg.input] == [
                    ("INPUT0", mc.TYPE_FP32, [256])
                ]
                idx = await c.get_model_repository_index()
                states = {(m.name, m.version): m.state for m in idx.models}
                assert states[("simple", "1")] == "READY"
                assert states[("bad_no_versions", "")] == "UNAVAILABLE"

        run(go)

    def test_infer_concurrent(self, server: Server) -> None:
        async def go() -> None:
            async with aioclient.InferenceServerClient(server.url) as c:

                async def one(batch: int) -> None:
                    ins, a, b = simple_inputs(batch)
                    res = await c.infer("simple", ins, request_id=f"b{batch}")
                    np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), a + b)
                    np.testing.assert_array_equal(res.as_numpy("OUTPUT1"), a - b)
                    assert res.get_response().id == f"b{batch}"

                await asyncio.gather(*(one(1 + i % 8) for i in range(32)))

        run(go)

    def test_stream_infer(self, server: Server) -> None:
        async def go() -> None:
            async with aioclient.InferenceServerClient(server.url) as c:
                ins, a, b = simple_inputs()
                bad = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
                bad.set_data_from_numpy(a.astype(np.float32))

                async def requests() -> AsyncIterator[dict[str, Any]]:
                    yield {"model_name": "simple", "inputs": ins, "request_id": "a1"}
                    yield {"model_name": "simple", "inputs": [bad, ins[1]], "request_id": "a2"}
                    yield {"model_name": "nope", "inputs": ins, "request_id": "a3"}
                    yield {"model_name": "simple", "inputs": ins, "request_id": "a4"}

                seen: list[tuple[Any, Any]] = []
                async for result, error in c.stream_infer(requests(), stream_timeout=20):
                    seen.append((result, error))
                assert len(seen) == 4
                assert seen[0][1] is None and seen[0][0].get_response().id == "a1"
                np.testing.assert_array_equal(seen[0][0].as_numpy("OUTPUT0"), a + b)
                assert seen[1][0] is None
                assert "input 'INPUT0' has datatype FP32" in seen[1][1].message()
                assert "Request for unknown model: 'nope'" in seen[2][1].message()
                assert seen[3][1] is None and seen[3][0].get_response().id == "a4"

        run(go)

    def test_statistics(self, server: Server) -> None:
        async def go() -> None:
            async with aioclient.InferenceServerClient(server.url) as c:
                before = counters((await c.get_inference_statistics("simple")).model_stats[0])
                for _ in range(2):
                    ins, _, _ = simple_inputs(batch=2)
                    await c.infer("simple", ins)
                stats = (await c.get_inference_statistics("simple")).model_stats
                check_simple_stats(stats[0], before, batch=2, n=2)
                everything = (await c.get_inference_statistics()).model_stats
                assert {"simple", "id_int8"} <= {s.name for s in everything}
                with pytest.raises(InferenceServerException) as ei:
                    await c.get_inference_statistics("no_such_model")
                assert ei.value.status() == "StatusCode.NOT_FOUND"

        run(go)

    def test_unimplemented(self, server: Server) -> None:
        async def go() -> None:
            async with aioclient.InferenceServerClient(server.url) as c:
                calls = [
                    ("RepositoryModelLoad", c.load_model("simple")),
                    ("RepositoryModelUnload", c.unload_model("simple")),
                    ("SystemSharedMemoryStatus", c.get_system_shared_memory_status()),
                    ("CudaSharedMemoryStatus", c.get_cuda_shared_memory_status()),
                    ("TraceSetting", c.get_trace_settings()),
                    ("LogSettings", c.get_log_settings()),
                ]
                for rpc, coro in calls:
                    with pytest.raises(InferenceServerException) as ei:
                        await coro
                    expect_unimplemented(ei.value, rpc)

        run(go)


# ============================================================================ raw stub


class TestRawStub:
    def test_health(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        assert stub.ServerLive(pb.ServerLiveRequest(), timeout=5).live is True
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready is True
        ready = stub.ModelReady(pb.ModelReadyRequest(name="dense", version="1"), timeout=5)
        assert ready.ready is True
        # Unknown model: an OK status with ready=False (as Triton answers).
        unknown = stub.ModelReady(pb.ModelReadyRequest(name="no_such_model"), timeout=5)
        assert unknown.ready is False
        assert stub.ModelReady(pb.ModelReadyRequest(name="dense", version="9")).ready is False

    @pytest.mark.parametrize("version", ["abc", "-1", "9" * 5000])
    def test_a_version_string_that_is_none(
        self, stub: service_pb2_grpc.GRPCInferenceServiceStub, version: str
    ) -> None:
        """As in Triton, INVALID_ARGUMENT in its wording, on every RPC that names a version:
        ModelReady said ready=False, and 5000 digits (past Python's int() limit) answered
        INTERNAL with a traceback in the log. ModelStatistics checks it without a model name
        too (Triton's handler parses the version first): it answered every model's rows."""
        wording = f"failed to get model version from specified version string '{version[:64]}'"
        calls = {
            "ModelReady": lambda: stub.ModelReady(
                pb.ModelReadyRequest(name="dense", version=version), timeout=5
            ),
            "ModelMetadata": lambda: stub.ModelMetadata(
                pb.ModelMetadataRequest(name="dense", version=version), timeout=5
            ),
            "ModelStatistics": lambda: stub.ModelStatistics(
                pb.ModelStatisticsRequest(name="dense", version=version), timeout=5
            ),
            "ModelStatistics of every model": lambda: stub.ModelStatistics(
                pb.ModelStatisticsRequest(version=version), timeout=5
            ),
            "ModelInfer": lambda: stub.ModelInfer(
                pb.ModelInferRequest(model_name="dense", model_version=version), timeout=5
            ),
        }
        for rpc, call in calls.items():
            with pytest.raises(grpc.RpcError) as info:
                call()
            err = info.value
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, err.details())
            assert wording in (err.details() or ""), (rpc, err.details())

    def test_server_metadata(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        md = stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5)
        assert md.name == "triton" and md.version == VERSION
        assert set(md.extensions) >= EXTENSIONS

    def test_model_metadata_and_config(
        self, stub: service_pb2_grpc.GRPCInferenceServiceStub
    ) -> None:
        md = stub.ModelMetadata(pb.ModelMetadataRequest(name="id_fp16", version="1"), timeout=5)
        assert (md.name, md.platform, list(md.versions)) == ("id_fp16", "onnxruntime_onnx", ["1"])
        assert [(t.name, t.datatype, list(t.shape)) for t in md.inputs] == [("IN", "FP16", [-1, 4])]
        cfg = stub.ModelConfig(pb.ModelConfigRequest(name="id_fp16"), timeout=5).config
        assert cfg.max_batch_size == 8 and cfg.platform == "onnxruntime_onnx"
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
            ("OUT", mc.TYPE_FP16, [4])
        ]
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelMetadata(pb.ModelMetadataRequest(name="no_such_model"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no_such_model" in ei.value.details()
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelConfig(pb.ModelConfigRequest(name="bad_corrupt"), timeout=5)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "bad_corrupt" in ei.value.details()

    def test_infer(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        req, a = simple_request(batch=2, rid="raw-1")
        resp = stub.ModelInfer(req, timeout=10)
        assert (resp.model_name, resp.model_version, resp.id) == ("simple", "1", "raw-1")
        assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
            ("OUTPUT0", "INT32", [2, 16]),
            ("OUTPUT1", "INT32", [2, 16]),
        ]
        out0 = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32).reshape(2, 16)
        out1 = np.frombuffer(resp.raw_output_contents[1], dtype=np.int32).reshape(2, 16)
        np.testing.assert_array_equal(out0, a + a)
        np.testing.assert_array_equal(out1, np.zeros_like(a))

    def test_stream_infer(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        good, a = simple_request(rid="g1")
        bad = pb.ModelInferRequest()
        bad.CopyFrom(good)
        bad.id = "bad"
        bad.raw_input_contents[1] = b"\x00" * 10  # 10 bytes for a [1, 16] INT32 tensor
        bad.model_version = "1"
        again, _ = simple_request(rid="g2")
        responses = list(stub.ModelStreamInfer(iter([good, bad, again]), timeout=20))
        assert len(responses) == 3
        assert responses[0].error_message == "" and responses[0].infer_response.id == "g1"
        assert "input 'INPUT1' has 10 bytes of raw content" in responses[1].error_message
        head = responses[1].infer_response  # as Triton's: the request's id, name and version
        assert (head.id, head.model_name, head.model_version) == ("bad", "simple", "1")
        # Every response completes its request (the model is not decoupled), errors included:
        # clients loop until they see Triton's flag.
        for r in responses:
            flag = r.infer_response.parameters["triton_final_response"]
            assert flag.WhichOneof("parameter_choice") == "bool_param" and flag.bool_param
        assert responses[2].error_message == "" and responses[2].infer_response.id == "g2"
        out = np.frombuffer(responses[2].infer_response.raw_output_contents[0], dtype=np.int32)
        np.testing.assert_array_equal(out, (a + a).ravel())

    def test_statistics(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        req = pb.ModelStatisticsRequest(name="simple", version="1")
        before = counters(stub.ModelStatistics(req, timeout=5).model_stats[0])
        stub.ModelInfer(simple_request(batch=5)[0], timeout=10)
        stats = stub.ModelStatistics(req, timeout=5).model_stats
        check_simple_stats(stats[0], before, batch=5, n=1)
        every = stub.ModelStatistics(pb.ModelStatisticsRequest(), timeout=5).model_stats
        assert {"simple", "dense", "id_bool"} <= {s.name for s in every}
        # A valid version without a name is ignored, as in Triton: every model's rows.
        same = stub.ModelStatistics(pb.ModelStatisticsRequest(version="7"), timeout=5)
        assert {(s.name, s.version) for s in same.model_stats} == {
            (s.name, s.version) for s in every
        }
        for name, version, code in [
            ("no_such_model", "", grpc.StatusCode.NOT_FOUND),
            ("simple", "7", grpc.StatusCode.NOT_FOUND),
        ]:
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelStatistics(pb.ModelStatisticsRequest(name=name, version=version))
            assert ei.value.code() == code, ei.value.details()
            assert name in ei.value.details() or version in ei.value.details()

    def test_repository_index(self, stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
        every = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=5).models
        bad = {m.name: m for m in every if m.name in BAD_MODELS}
        assert set(bad) == set(BAD_MODELS)
        assert all(m.state == "UNAVAILABLE" and m.reason for m in bad.values())
        ready = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5).models
        assert all(m.state == "READY" for m in ready)
        assert len(ready) == len(every) - len(BAD_MODELS)

    @pytest.mark.parametrize("rpc", UNIMPLEMENTED_RPCS + SHM_RPCS)
    def test_unimplemented(self, stub: service_pb2_grpc.GRPCInferenceServiceStub, rpc: str) -> None:
        request_msg = getattr(pb, f"{rpc}Request")()
        if hasattr(request_msg, "model_name"):
            request_msg.model_name = "simple"
        with pytest.raises(grpc.RpcError) as ei:
            getattr(stub, rpc)(request_msg, timeout=5)
        expect_unimplemented(ei.value, rpc)


# ============================================================================ grpc.health.v1


@pytest.mark.parametrize(
    "service", ["", "readiness", "startup", "liveness", "inference.GRPCInferenceService"]
)
def test_health_serving(channel: grpc.Channel, service: str) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("package", ["grpc.reflection.v1", "grpc.reflection.v1alpha"])
def test_reflection_is_served_as_v1_and_v1alpha(channel: grpc.Channel, package: str) -> None:
    """Both reflection protocols (the same messages under two package names: v1alpha's types
    read and write v1's bytes) list the services and describe each of them, v1's own service
    included, in its own package: clients that speak only v1 got UNIMPLEMENTED."""
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2 as r

    info = channel.stream_stream(
        f"/{package}.ServerReflection/ServerReflectionInfo",
        request_serializer=r.ServerReflectionRequest.SerializeToString,
        response_deserializer=r.ServerReflectionResponse.FromString,
    )
    symbols = ["inference.GRPCInferenceService", "grpc.reflection.v1.ServerReflection"]
    asks = [r.ServerReflectionRequest(list_services="")]
    asks += [r.ServerReflectionRequest(file_containing_symbol=s) for s in symbols]
    listed, *described = list(info(iter(asks), timeout=10))
    assert {s.name for s in listed.list_services_response.service} == {
        "inference.GRPCInferenceService",
        "microtune.admin.v1.RoutingAdmin",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(
            d.file_descriptor_response.file_descriptor_proto[0]
        )
        for d in described
    ]
    assert [f.package for f in files] == ["inference", "grpc.reflection.v1"]
    (method,) = files[1].service[0].method
    assert (method.name, method.input_type, method.output_type) == (
        "ServerReflectionInfo",
        ".grpc.reflection.v1.ServerReflectionRequest",
        ".grpc.reflection.v1.ServerReflectionResponse",
    )


def test_health_unknown_service(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    with pytest.raises(grpc.RpcError) as ei:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
    assert ei.value.code() == grpc.StatusCode.NOT_FOUND
