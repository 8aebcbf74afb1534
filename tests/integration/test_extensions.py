"""Extensions that are off by default, on a server started with them on:
`--model-control-mode explicit` (RepositoryModelLoad/Unload) and `--allow-client-shm` (system
shared memory), both driven by tritonclient as a Triton user would."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2
from harness import DEMO, Server, raises, running_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ARGS = (
    "--model-control-mode",
    "explicit",
    "--load-model",
    "simple,id_fp32",
    "--allow-client-shm",
    "true",
)


@pytest.fixture(scope="module")
def ext(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(model_repository, tmp_path_factory.mktemp("ext"), ARGS) as s:
        yield s


@pytest.fixture()
def c(ext: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(ext.url)
    yield client
    client.close()


def fp32_input(batch: int) -> tuple[grpcclient.InferInput, np.ndarray]:
    x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4)
    inp = grpcclient.InferInput("IN", [batch, 4], "FP32")
    inp.set_data_from_numpy(x)
    return inp, x


def dense_input() -> grpcclient.InferInput:
    inp = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
    inp.set_data_from_numpy(np.ones((1, 256), dtype=np.float32))
    return inp


# ---------------------------------------------------------------------------- model control


def test_metadata_lists_system_shared_memory_when_it_is_on(
    c: grpcclient.InferenceServerClient,
) -> None:
    extensions = set(c.get_server_metadata().extensions)
    assert "system_shared_memory" in extensions
    assert "cuda_shared_memory" not in extensions  # (a CPU worker: no CUDA device)


def test_startup_loads_only_the_named_models(c: grpcclient.InferenceServerClient) -> None:
    assert c.is_server_ready()
    assert c.is_model_ready("simple") and c.is_model_ready("id_fp32")
    assert not c.is_model_ready("dense")
    index = {m.name: m for m in c.get_model_repository_index().models}
    assert "dense" in index and index["dense"].state != "READY"


def test_load_infer_unload(c: grpcclient.InferenceServerClient) -> None:
    c.load_model("dense")
    assert c.is_model_ready("dense", "1") and c.is_model_ready("dense", "2")
    assert c.infer("dense", [dense_input()]).as_numpy("OUTPUT0").shape == (1, 10)
    c.unload_model("dense")
    assert not c.is_model_ready("dense")
    raises(lambda: c.infer("dense", [dense_input()]), "UNAVAILABLE", "'dense'")
    # Loading again brings it back.
    c.load_model("dense")
    assert c.infer("dense", [dense_input()]).get_response().model_version == "2"
    c.unload_model("dense")


def test_load_failures(c: grpcclient.InferenceServerClient) -> None:
    raises(lambda: c.load_model("no_such_model"), "INTERNAL", "'no_such_model'")
    raises(lambda: c.load_model("bad_corrupt"), "INTERNAL", "bad_corrupt")
    raises(lambda: c.unload_model("no_such_model"), "NOT_FOUND", "'no_such_model'")
    # The server goes on serving what it has.
    inp, x = fp32_input(2)
    np.testing.assert_array_equal(c.infer("id_fp32", [inp]).as_numpy("OUT"), x)


def test_repository_parameters_checked_as_in_triton(ext: Server) -> None:
    """Parameters the server does not know are refused, not ignored (a misspelt "configs"
    loaded the model without its override); a named repository is unsupported."""
    ch = grpc.insecure_channel(ext.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)

    def load(**params: pb.ModelRepositoryParameter) -> pb.RepositoryModelLoadRequest:
        req = pb.RepositoryModelLoadRequest(model_name="simple")
        for k, v in params.items():
            req.parameters[k.replace("_", ":")].CopyFrom(v)
        return req

    def error(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
        with pytest.raises(grpc.RpcError) as ei:
            call()
        return ei.value.code(), ei.value.details() or ""

    string, raw = (
        pb.ModelRepositoryParameter(string_param="{}"),
        pb.ModelRepositoryParameter(bytes_param=b"x"),
    )
    Code = grpc.StatusCode
    try:
        assert error(lambda: stub.RepositoryModelLoad(load(configs=string))) == (
            Code.INVALID_ARGUMENT,
            "unrecognized load parameter 'configs'.",
        )
        assert error(lambda: stub.RepositoryModelLoad(load(config=raw))) == (
            Code.INVALID_ARGUMENT,
            "invalid value type for load parameter 'config', expected string_param.",
        )
        assert error(lambda: stub.RepositoryModelLoad(load(file_1=string))) == (
            Code.INVALID_ARGUMENT,
            "invalid value type for load parameter 'file:1', expected bytes_param.",
        )
        unload = pb.RepositoryModelUnloadRequest(model_name="simple")
        unload.parameters["unload_dependents"].string_param = "yes"
        assert error(lambda: stub.RepositoryModelUnload(unload)) == (
            Code.INVALID_ARGUMENT,
            "invalid value type for 'unload_dependents' parameter, expected bool_param.",
        )
        named = "'repository_name' specification is not supported"
        assert error(
            lambda: stub.RepositoryIndex(pb.RepositoryIndexRequest(repository_name="other"))
        ) == (Code.UNIMPLEMENTED, named)
        assert error(
            lambda: stub.RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(repository_name="other", model_name="simple")
            )
        ) == (Code.UNIMPLEMENTED, named)
        assert stub.ModelReady(pb.ModelReadyRequest(name="simple")).ready  # left as it was
    finally:
        ch.close()


def test_reload_with_config_override(c: grpcclient.InferenceServerClient) -> None:
    cfg = {
        "name": "id_fp32",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 2,
        "input": [{"name": "IN", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "OUT", "data_type": "TYPE_FP32", "dims": [4]}],
    }
    try:
        c.load_model("id_fp32", config=json.dumps(cfg))
        assert c.get_model_config("id_fp32").config.max_batch_size == 2
        inp, _ = fp32_input(3)
        raises(lambda: c.infer("id_fp32", [inp]), "INVALID_ARGUMENT", "'IN'", "max_batch_size 2")
    finally:
        c.load_model("id_fp32")  # back to the repository's config
    assert c.get_model_config("id_fp32").config.max_batch_size == 8


# ---------------------------------------------------------------------------- system shm


def test_system_shared_memory_roundtrip(c: grpcclient.InferenceServerClient) -> None:
    inp_x = np.arange(8, dtype=np.float32).reshape(2, 4)
    nbytes = inp_x.nbytes
    key = f"/mt-itest-{os.getpid()}"  # not "microtune-": that prefix is the server's arenas
    region = shm.create_shared_memory_region("io", key, 2 * nbytes)
    try:
        shm.set_shared_memory_region(region, [inp_x])
        c.register_system_shared_memory("io", key, 2 * nbytes)
        status = c.get_system_shared_memory_status()
        assert [(r.name, r.byte_size) for r in status.regions.values()] == [("io", 2 * nbytes)]
        raises(
            lambda: c.register_system_shared_memory("io", key, nbytes),
            "ALREADY_EXISTS",
            "'io'",
        )
        inp = grpcclient.InferInput("IN", [2, 4], "FP32")
        inp.set_shared_memory("io", nbytes)
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory("io", nbytes, offset=nbytes)
        res = c.infer("id_fp32", [inp], outputs=[out])
        # The output went to the region: the response describes it but carries no bytes.
        resp = res.get_response()
        assert [(o.name, list(o.shape)) for o in resp.outputs] == [("OUT", [2, 4])]
        assert all(len(raw) == 0 for raw in resp.raw_output_contents)
        got = shm.get_contents_as_numpy(region, np.float32, [2, 4], offset=nbytes)
        np.testing.assert_array_equal(got, inp_x)
        c.unregister_system_shared_memory("io")
        assert not c.get_system_shared_memory_status().regions
        # A tensor that names a region no longer registered.
        raises(lambda: c.infer("id_fp32", [inp]), "INVALID_ARGUMENT", "'IN'", "'io'")
    finally:
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(region)


def test_a_region_shrunk_after_registration_is_refused(
    ext: Server, c: grpcclient.InferenceServerClient
) -> None:
    """A client that truncates its object after registering it (one restarted that creates
    the region again, smaller, under the same key) gets INVALID_ARGUMENT; the front's access to
    the missing pages would have killed it with SIGBUS."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    key = f"/mt-itest-shrink-{os.getpid()}"
    page = 4096  # the registered range starts on the third page: past the end once truncated
    region = shm.create_shared_memory_region("big", key, 3 * page)
    try:
        shm.set_shared_memory_region(region, [x], offset=2 * page)
        c.register_system_shared_memory("big", key, x.nbytes, offset=2 * page)
        fd = os.open(f"/dev/shm{key}", os.O_RDWR)
        try:
            os.ftruncate(fd, page)
        finally:
            os.close(fd)
        inp = grpcclient.InferInput("IN", [2, 4], "FP32")
        inp.set_shared_memory("big", x.nbytes)
        needles = ("'big'", f"'{key}'", f"shrunk to {page} bytes", "register it again")
        raises(lambda: c.infer("id_fp32", [inp]), "INVALID_ARGUMENT", *needles)
        plain, _ = fp32_input(2)
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory("big", x.nbytes)
        raises(lambda: c.infer("id_fp32", [plain], outputs=[out]), "INVALID_ARGUMENT", *needles)
        assert ext.proc.poll() is None, ext.log()[-3000:]
        res = c.infer("id_fp32", [plain])  # the front still serves
        np.testing.assert_array_equal(res.as_numpy("OUT"), x)
        c.unregister_system_shared_memory("big")
    finally:
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(region)


def test_system_shared_memory_errors(c: grpcclient.InferenceServerClient) -> None:
    raises(
        lambda: c.register_system_shared_memory("x", "/mt-itest-missing", 64),
        "INVALID_ARGUMENT",
        "'x'",
    )
    raises(lambda: c.get_system_shared_memory_status("nope"), "NOT_FOUND", "'nope'")
    raises(lambda: c.register_cuda_shared_memory("g", b"\0" * 64, 0, 64), "UNIMPLEMENTED", "'g'")


def fails_and_executions(c: grpcclient.InferenceServerClient, model: str) -> tuple[int, int]:
    """ModelStatistics of `model`'s one version: its failed requests and its executions."""
    (entry,) = c.get_inference_statistics(model, as_json=True)["model_stats"]
    fail = entry["inference_stats"].get("fail", {})
    return int(fail.get("count", 0)), int(entry.get("execution_count", 0))


def test_an_output_region_too_small_is_refused_and_left_as_it_was(
    ext: Server, c: grpcclient.InferenceServerClient
) -> None:
    """The output is copied from the worker's slot straight into the client's region, and only
    once it is known to fit: a region smaller than the output gets INVALID_ARGUMENT naming
    both sizes, and not a byte of it is written."""
    key = f"/mt-itest-small-out-{os.getpid()}"
    region = shm.create_shared_memory_region("small-out", key, 16)
    try:
        marker = np.full(4, 7.0, dtype=np.float32)
        shm.set_shared_memory_region(region, [marker])
        c.register_system_shared_memory("small-out", key, 16)
        inp, x = fp32_input(2)  # 32 bytes out
        out = grpcclient.InferRequestedOutput("OUT")
        out.set_shared_memory("small-out", 16)
        fails, executions = fails_and_executions(c, "id_fp32")
        raises(
            lambda: c.infer("id_fp32", [inp], outputs=[out]),
            "INVALID_ARGUMENT",
            "shared memory size specified with the request for output 'OUT' (16 bytes) should "
            "be at least 32 bytes to hold the results",
        )
        # a failed request, whose execution ran
        assert fails_and_executions(c, "id_fp32") == (fails + 1, executions + 1)
        got = shm.get_contents_as_numpy(region, np.float32, [4])
        np.testing.assert_array_equal(got, marker)
        inp, x = fp32_input(1)  # 16 bytes: fits
        res = c.infer("id_fp32", [inp], outputs=[out])
        assert all(len(raw) == 0 for raw in res.get_response().raw_output_contents)
        got = shm.get_contents_as_numpy(region, np.float32, [1, 4])
        np.testing.assert_array_equal(got, x)
        assert ext.proc.poll() is None, ext.log()[-3000:]
        c.unregister_system_shared_memory("small-out")
    finally:
        c.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(region)


def test_an_output_bound_to_no_region_is_refused_before_the_model_runs(
    c: grpcclient.InferenceServerClient,
) -> None:
    """Output regions were looked up only as the answer was copied: the model ran (and was
    counted) first, and earlier outputs of the request could already be in their regions.
    As in Triton, a request whose output region is unknown or too short for its offset is
    refused before it runs."""
    inp, _x = fp32_input(1)
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory("never-registered", 16)
    fails, executions = fails_and_executions(c, "id_fp32")
    raises(
        lambda: c.infer("id_fp32", [inp], outputs=[out]),
        "INVALID_ARGUMENT",
        "tensor 'OUT' refers to unregistered shared memory region 'never-registered'",
    )
    assert fails_and_executions(c, "id_fp32")[1] == executions  # never ran
    assert fails_and_executions(c, "id_fp32")[0] == fails  # refused, as any invalid request


def test_strict_readiness_follows_failed_models(model_repository: Path, tmp_path: Path) -> None:
    """--strict-readiness (Triton's default, the Helm chart's): a model that fails to load
    makes the server not ready, so that a rolling update whose models fail stops instead of
    replacing pods that serve; unloading it makes the server ready again. Liveness holds."""
    args = (
        "--model-control-mode",
        "explicit",
        "--load-model",
        "simple",
        "--strict-readiness",
        "true",
    )
    with running_server(model_repository, tmp_path, args) as s:
        c = grpcclient.InferenceServerClient(s.url)
        try:
            assert c.is_server_ready()
            raises(lambda: c.load_model("bad_corrupt"), "INTERNAL", "bad_corrupt")
            s.wait_health("readiness", NOT_SERVING, 10)
            assert not c.is_server_ready() and c.is_server_live()
            s.wait_health("liveness", SERVING, 10)
            c.unload_model("bad_corrupt")
            s.wait_health("readiness", SERVING, 10)
            assert c.is_server_ready()
        finally:
            c.close()


def test_readiness_and_index_in_explicit_mode_follow_what_was_asked_for(tmp_path: Path) -> None:
    """Explicit mode with --strict-readiness: a model of the repository nobody asked for does
    not make the server unready, even with a config that does not parse (it did, for good);
    asking for it and failing does, until it is unloaded, and so does asking again for one
    unloaded before (it did not: its entry kept the old config and the unloaded versions).
    The index lists the repository as it is now (as Triton's, which polls it): a model added
    since start-up shows, one removed and not loaded goes."""
    repo = tmp_path / "repo"
    shutil.copytree(DEMO / "simple", repo / "simple")
    (repo / "broken").mkdir()
    (repo / "broken" / "config.pbtxt").write_text("this is { not a config")
    args = ("--model-control-mode", "explicit", "--load-model", "simple")
    with running_server(repo, tmp_path / "log", (*args, "--strict-readiness", "true")) as s:
        c = grpcclient.InferenceServerClient(s.url)
        try:

            def index() -> dict[str, tuple[str, str]]:
                return {m.name: (m.state, m.reason) for m in c.get_model_repository_index().models}

            s.wait_health("readiness", SERVING, 10)
            assert c.is_server_ready() and c.is_model_ready("simple")
            assert index()["broken"] == ("", "")  # never loaded: its name only, as in Triton
            raises(lambda: c.load_model("broken"), "INTERNAL", "failed to load 'broken'")
            s.wait_health("readiness", NOT_SERVING, 10)
            assert not c.is_server_ready() and c.is_server_live()
            c.unload_model("broken")
            s.wait_health("readiness", SERVING, 10)

            shutil.copytree(DEMO / "simple", repo / "later")
            shutil.rmtree(repo / "broken")
            listed = index()
            assert listed["later"] == ("", "")
            assert "broken" not in listed and listed["simple"][0] == "READY"
            assert c.is_server_ready()

            c.unload_model("simple")
            (repo / "simple" / "config.pbtxt").write_text("this is { not a config")
            raises(lambda: c.load_model("simple"), "INTERNAL", "failed to load 'simple'")
            s.wait_health("readiness", NOT_SERVING, 10)
            assert not c.is_server_ready() and not c.is_model_ready("simple")
            c.unload_model("simple")
            s.wait_health("readiness", SERVING, 10)
        finally:
            c.close()
