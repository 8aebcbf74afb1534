"""`--frontends 2`: two front processes share the gRPC port (SO_REUSEPORT) and one worker.

The kernel hands every listener of the port its share of new connections, so a front must
not listen before it can serve: a front that listened while still loading its models answered
its share NOT_FOUND ("unknown model") or UNAVAILABLE while the other front could have served
them. Here, on a repository of many models (so that a front's loading takes a while), every
request on a fresh connection succeeds:

- right after the server reports ready (the second front may still be loading);
- while a SIGKILLed front is being replaced (the supervisor restarts it; the replacement
  joins the port only once loaded).

The killed front's arena leaves /dev/shm, and stopping the server leaves no process and no
arena of any front behind.

Client shared memory, ModelStatistics and routing admin decisions are the pod's: a region
registered through one connection is listed by, used through and unregistered through any
connection, whichever front it reached; statistics count every front's requests; SetRouting
and ClearRouting apply on every front before they answer.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from harness import DEMO, SHM, Server, children_of, pid_alive, raises, running_server
from routing_support import (
    admin_stub,
    apb,
    copy_dense,
    dense_config_json,
    dense_input,
    dense_request,
)
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

from runtime.engine.regions import fake_handle

COPIES = 48  # of the demo's `simple`: a front's load of the repository takes a while


@pytest.fixture(scope="module")
def many_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fronts") / "models"
    config = (DEMO / "simple" / "config.pbtxt").read_text()
    model = (DEMO / "simple" / "1" / "model.onnx").read_bytes()
    for i in range(COPIES):
        name = f"simple_{i:02d}"
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model)
        (root / name / "config.pbtxt").write_text(
            re.sub(r'^name: "simple"', f'name: "{name}"', config, flags=re.M)
        )
    return root


def fronts_of(supervisor: int) -> list[int]:
    """The supervisor's front processes: its children that own a shared-memory arena."""
    return sorted(p for p in children_of(supervisor) if list(SHM.glob(f"microtune-{p}-*")))


def infer_on_fresh_connections(url: str, seconds: float) -> collections.Counter[str]:
    """One ModelInfer per new channel (so the kernel picks a listener each time), for
    `seconds`: the status codes seen, with each failure's message."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    codes: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        req = pb.ModelInferRequest(model_name=f"simple_{i % COPIES:02d}")
        for name in ("INPUT0", "INPUT1"):
            req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            req.raw_input_contents.append(a.tobytes())
        with grpc.insecure_channel(url) as ch:
            try:
                resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
                out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
                codes["OK" if (out == a.ravel() * 2).all() else "WRONG"] += 1
            except grpc.RpcError as exc:
                codes[f"{exc.code().name}: {exc.details()}"] += 1
        i += 1
    return codes


def test_a_front_serves_only_once_loaded(many_models: Path, tmp_path: Path) -> None:
    s = Server(many_models, tmp_path, extra_args=("--frontends", "2"))
    every_front: set[int] = set()
    try:
        first = infer_on_fresh_connections(s.url, 1.5)
        assert set(first) == {"OK"}, dict(first)

        deadline = time.monotonic() + 60
        while len(fronts := fronts_of(s.pid)) < 2:
            assert time.monotonic() < deadline, f"two fronts never came up:\n{s.log()[-4000:]}"
            time.sleep(0.05)
        every_front.update(fronts)
        victim, survivor = fronts
        victim_arenas = list(SHM.glob(f"microtune-{victim}-*"))
        ready_lines = s.log().count("microtune ready")

        os.kill(victim, signal.SIGKILL)
        # Its listening socket is closed once the supervisor has reaped it: the leader of a
        # dying process is a zombie while its other threads, which share the socket, still exit
        # (a connection queued on it then is reset: the kernel's doing, not this test's).
        while Path(f"/proc/{victim}").exists():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        during = collections.Counter[str]()
        while s.log().count("microtune ready") <= ready_lines:  # the replacement is loading
            assert time.monotonic() < deadline, f"no replacement front:\n{s.log()[-4000:]}"
            during.update(infer_on_fresh_connections(s.url, 0.2))
        during.update(infer_on_fresh_connections(s.url, 1.0))  # and once it serves
        assert set(during) == {"OK"}, dict(during)
        assert during["OK"] > 20, dict(during)

        fronts = fronts_of(s.pid)
        every_front.update(fronts)
        assert survivor in fronts and victim not in fronts and len(fronts) == 2, fronts
        assert re.search(r"front \d died \(exit code -9\); restarting", s.log()), s.log()[-3000:]
        assert not [p for p in victim_arenas if p.exists()], victim_arenas
    finally:
        s.stop()
    left = [p.name for f in every_front for p in SHM.glob(f"microtune-{f}-*")]
    assert not left, left
    assert not [f for f in every_front if pid_alive(f)]


# ----------------------------------------------------------------------------- client shm

SHM_ARGS = ("--frontends", "2", "--allow-client-shm", "true", "--fake-cuda-ipc", "true")
FRESH = 24  # connections opened one after another: both fronts get some (P(not) = 2**-23)


@pytest.fixture(scope="module")
def shm_server(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    with running_server(model_repository, tmp_path_factory.mktemp("fronts-shm"), SHM_ARGS) as s:
        yield s


# gRPC shares one connection between channels to the same target unless told not to.
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def fresh(url: str) -> Iterator[grpcclient.InferenceServerClient]:
    """FRESH clients, each on a connection of its own."""
    for _ in range(FRESH):
        c = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
        try:
            yield c
        finally:
            c.close()


def shm_io(region_in: str, region_out: str, nbytes: int) -> tuple[object, object]:
    inp = grpcclient.InferInput("IN", [3, 4], "FP32")
    inp.set_shared_memory(region_in, nbytes)
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory(region_out, nbytes)
    return inp, out


def release(owner: grpcclient.InferenceServerClient, regions: tuple[Any, ...]) -> None:
    """A test's cleanup: unregister everything through `owner`, close it, free the regions."""
    with contextlib.suppress(Exception):
        owner.unregister_system_shared_memory()
        owner.unregister_cuda_shared_memory()
    owner.close()
    for region in regions:
        shm.destroy_shared_memory_region(region)


def test_client_shm_registered_on_one_connection_is_the_pods(shm_server: Server) -> None:
    """perf_analyzer registers its regions on one connection and infers on others: with
    several fronts, every front must know them (and forget them once unregistered)."""
    url, pid = shm_server.url, os.getpid()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    sys_in = shm.create_shared_memory_region("in", f"/mt-fronts-{pid}-in", x.nbytes)
    sys_out = shm.create_shared_memory_region("out", f"/mt-fronts-{pid}-out", x.nbytes)
    dev_key = f"/mt-fronts-{pid}-dev"
    dev = shm.create_shared_memory_region("dev", dev_key, x.nbytes)  # a fake CUDA buffer
    owner = grpcclient.InferenceServerClient(url)
    try:
        owner.register_system_shared_memory("in", f"/mt-fronts-{pid}-in", x.nbytes)
        owner.register_system_shared_memory("out", f"/mt-fronts-{pid}-out", x.nbytes)
        owner.register_cuda_shared_memory("dev", base64.b64encode(fake_handle(dev_key)), 0, 48)
        for i, c in enumerate(fresh(url)):
            assert sorted(c.get_system_shared_memory_status(as_json=True)["regions"]) == [
                "in",
                "out",
            ]
            assert list(c.get_cuda_shared_memory_status(as_json=True)["regions"]) == ["dev"]
            shm.set_shared_memory_region(sys_in, [x + i])
            inp, out = shm_io("in", "out", x.nbytes)
            c.infer("id_fp32", [inp], outputs=[out])
            got = shm.get_contents_as_numpy(sys_out, np.float32, [3, 4])
            np.testing.assert_array_equal(got, x + i)
            shm.set_shared_memory_region(dev, [x * i])  # input in the (fake) CUDA region
            inp, out = shm_io("dev", "out", x.nbytes)
            c.infer("id_fp32", [inp], outputs=[out])
            got = shm.get_contents_as_numpy(sys_out, np.float32, [3, 4])
            np.testing.assert_array_equal(got, x * i)
        with grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION) as other:
            other.unregister_system_shared_memory("in")
            other.unregister_cuda_shared_memory("dev")
        for c in fresh(url):
            for region in ("in", "dev"):
                inp, out = shm_io(region, "out", x.nbytes)
                raises(
                    lambda c=c, inp=inp, out=out: c.infer("id_fp32", [inp], outputs=[out]),
                    "INVALID_ARGUMENT",
                    f"tensor 'IN' refers to unregistered shared memory region '{region}'",
                )
            assert list(c.get_system_shared_memory_status(as_json=True)["regions"]) == ["out"]
            assert not c.get_cuda_shared_memory_status(as_json=True).get("regions")
    finally:
        release(owner, (sys_in, sys_out, dev))


def test_a_cuda_region_replaced_under_its_name_is_followed(shm_server: Server) -> None:
    """Unregistered and registered again (another buffer) before the other front noticed: that
    front lets its old mapping go and opens the new one, on the first request."""
    url, pid = shm_server.url, os.getpid()
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    keys = [f"/mt-fronts-{pid}-old", f"/mt-fronts-{pid}-new"]
    old, new = (shm.create_shared_memory_region(f"r{i}", k, x.nbytes) for i, k in enumerate(keys))
    out = shm.create_shared_memory_region("o", f"/mt-fronts-{pid}-o", x.nbytes)
    shm.set_shared_memory_region(old, [x])
    shm.set_shared_memory_region(new, [x * 10])
    owner = grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION)
    try:
        owner.register_system_shared_memory("o", f"/mt-fronts-{pid}-o", x.nbytes)
        owner.register_cuda_shared_memory("g", base64.b64encode(fake_handle(keys[0])), 0, 48)
        for c in fresh(url):  # every front opens "g" (the old buffer)
            inp, o = shm_io("g", "o", x.nbytes)
            c.infer("id_fp32", [inp], outputs=[o])
        owner.unregister_cuda_shared_memory("g")
        owner.register_cuda_shared_memory("g", base64.b64encode(fake_handle(keys[1])), 0, 48)
        for c in fresh(url):
            inp, o = shm_io("g", "o", x.nbytes)
            c.infer("id_fp32", [inp], outputs=[o])
            np.testing.assert_array_equal(
                shm.get_contents_as_numpy(out, np.float32, [3, 4]), x * 10
            )
    finally:
        release(owner, (old, new, out))


def test_model_statistics_count_the_whole_pod(shm_server: Server) -> None:
    """perf_analyzer reads the statistics on one connection while its load spreads over every
    front: each front answers for the pod, as Triton answers for the server."""
    url = shm_server.url
    x = np.arange(12, dtype=np.int32).reshape(3, 4)

    def counts(c: grpcclient.InferenceServerClient) -> tuple[int, int, int]:
        (st,) = c.get_inference_statistics("id_int32", "1", as_json=True)["model_stats"]
        success = st["inference_stats"]["success"]
        return (
            int(success.get("count", 0)),
            int(st.get("inference_count", 0)),
            int(st.get("execution_count", 0)),
        )

    with grpcclient.InferenceServerClient(url, channel_args=OWN_CONNECTION) as c:
        before = counts(c)
    sent = 0
    for c in fresh(url):
        inp = grpcclient.InferInput("IN", [3, 4], "INT32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer("id_int32", [inp]).as_numpy("OUT"), x)
        sent += 1
    want = (before[0] + sent, before[1] + 3 * sent, before[2] + sent)
    for c in fresh(url):
        assert counts(c) == want


def test_routing_admin_decisions_are_the_pods(shm_server: Server) -> None:
    """SetRouting reaches one front and answers once every front routes by it (and so does
    ClearRouting): the next call, on a fresh connection, sees it whichever front it reaches."""
    url = shm_server.url
    everything_to_1 = json.dumps({"weights": {"1": 10_000, "2": 0}, "labels": {"stable": 1}})

    def each_front_says(source: str, version: str) -> None:
        for _ in range(FRESH):
            with grpc.insecure_channel(url, options=OWN_CONNECTION) as ch:
                got = admin_stub(ch).GetRouting(apb.GetRoutingRequest(model="dense"), timeout=5)
                assert got.source == source
                stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
                assert stub.ModelInfer(dense_request(), timeout=10).model_version == version

    each_front_says("none", "2")  # no table: the highest ready version
    with grpc.insecure_channel(url, options=OWN_CONNECTION) as ch:
        admin_stub(ch).SetRouting(
            apb.SetRoutingRequest(model="dense", table_json=everything_to_1), timeout=10
        )
    try:
        each_front_says("admin", "1")
    finally:
        with grpc.insecure_channel(url, options=OWN_CONNECTION) as ch:
            admin_stub(ch).ClearRouting(apb.ClearRoutingRequest(model="dense"), timeout=10)
    each_front_says("none", "2")


def test_fronts_go_when_the_supervisor_is_killed(model_repository: Path, tmp_path: Path) -> None:
    """SIGKILL of the supervisor (the OOM killer's choice, say): its fronts would otherwise hold
    the port and their arenas, answering UNAVAILABLE without a worker, and share connections
    with the next server on the port. They shut down; the worker too."""
    s = Server(model_repository, tmp_path, extra_args=("--frontends", "2"))
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while len(fronts_of(s.pid)) < 2:
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        children = children_of(s.pid)
        fronts = fronts_of(s.pid)
        s.proc.kill()
        s.proc.wait(5)
        deadline = time.monotonic() + 15
        while any(pid_alive(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [c for c in children if pid_alive(c)], s.log()[-3000:]
        assert not [p.name for f in fronts for p in SHM.glob(f"microtune-{f}-*")]
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", s.port), timeout=2).close()
        assert s.log().count("this front shuts down") == 2
    finally:
        s.stop(check=False)
        for c in children:
            if pid_alive(c):
                os.kill(c, signal.SIGKILL)


@pytest.mark.parametrize("path", ["sessions", "cpu-graphs"])
def test_a_polled_hot_swap_drops_nothing_across_fronts(tmp_path: Path, path: str) -> None:
    """`--model-control-mode poll`: each front finds a new version on its own poll, swaps to it
    and unloads the old one. The worker unloads the old version only once the last front lets
    go of it: a front that has not polled yet still serves it. The fronts poll at the same
    instants (poll_policy.next_poll_in): the worker loads the new version once, for both, and
    they take it within a fraction of the period of each other. With `--cpu-graphs` each
    front sends a version's calls on its direct channel, which the last unload closes."""
    repo = tmp_path / "models"
    model = copy_dense(repo, versions={1: 1})
    config = model / "config.pbtxt"
    config.write_text(
        config.read_text().replace("all { }", "latest { num_versions: 1 }")
    )  # fmt: skip
    assert "latest" in config.read_text()
    args = ("--frontends", "2", "--model-control-mode", "poll", "--repository-poll-s", "0.5")
    if path == "cpu-graphs":
        args += ("--cpu-graphs", "true")
    with running_server(repo, tmp_path / "server", args) as s:
        codes: collections.Counter[str] = collections.Counter()
        served: collections.Counter[str] = collections.Counter()

        def traffic(stop: threading.Event) -> None:
            channels = [grpc.insecure_channel(s.url, options=OWN_CONNECTION) for _ in range(6)]
            try:
                while not stop.is_set():
                    for ch in channels:  # long-lived connections, spread over both fronts
                        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
                        try:
                            served[stub.ModelInfer(dense_request(), timeout=10).model_version] += 1
                            codes["OK"] += 1
                        except grpc.RpcError as exc:
                            codes[f"{exc.code().name}: {exc.details()}"] += 1
            finally:
                for ch in channels:
                    ch.close()

        stop = threading.Event()
        worker = threading.Thread(target=traffic, args=(stop,))
        worker.start()
        try:
            time.sleep(1.0)
            # Copied aside, then renamed into place: a poll sees no half-copied version.
            shutil.copytree(DEMO / "dense" / "2", model / ".incoming")
            os.rename(model / ".incoming", model / "2")
            deadline = time.monotonic() + 20
            while s.log().count("unloaded dense version 1") < 2:  # both fronts swapped
                assert time.monotonic() < deadline, s.log()[-3000:]
                time.sleep(0.1)
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(30)
        assert set(codes) == {"OK"}, dict(codes)
        assert served["1"] > 0 and served["2"] > 0, dict(served)
        loaded = log_times(s, "loaded dense version 2 in ")
        found = log_times(s, "dense version 2: already loaded in the worker")
        assert len(loaded) == 1 and len(found) == 1, s.log()[-3000:]
        assert abs(loaded[0] - found[0]) < 0.25, (loaded, found)  # (the poll period is 0.5 s)


def log_times(s: Server, message: str) -> list[float]:
    """When the server logged lines containing `message` (seconds since the epoch)."""
    out = []
    for line in s.log().splitlines():
        if message in line:
            ts = json.loads(line)["ts"]
            out.append(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp())
    return out


def test_model_control_is_the_pods(model_repository: Path, tmp_path: Path) -> None:
    """RepositoryModelLoad and RepositoryModelUnload reach one front; every front has followed
    by the time the RPC answers, including a load whose model file came with the request
    (written once into the pod's directory)."""
    args = ("--frontends", "2", "--model-control-mode", "explicit", "--load-model", "simple")
    x = np.arange(12, dtype=np.float32).reshape(3, 4)

    def on_every_front(check: Callable[[grpcclient.InferenceServerClient], bool]) -> None:
        # At once: the RPC answers only once every front has done the same.
        for c in fresh(s.url):
            assert check(c), s.log()[-3000:]

    def infers(c: grpcclient.InferenceServerClient, model: str) -> bool:
        if not c.is_model_ready(model):
            return False
        inp = grpcclient.InferInput("IN", [3, 4], "FP32")
        inp.set_data_from_numpy(x)
        np.testing.assert_array_equal(c.infer(model, [inp]).as_numpy("OUT"), x)
        return True

    with running_server(model_repository, tmp_path / "server", args) as s:
        with grpcclient.InferenceServerClient(s.url, channel_args=OWN_CONNECTION) as c:
            assert not c.is_model_ready("id_fp32")
            c.load_model("id_fp32")
        on_every_front(lambda c: infers(c, "id_fp32"))
        # The worker loaded it once: the second front's load (the same revision) found it.
        assert loads(s, "id_fp32") == (1, 1), s.log()[-3000:]
        with grpcclient.InferenceServerClient(s.url, channel_args=OWN_CONNECTION) as c:
            c.unload_model("id_fp32")
        on_every_front(lambda c: not c.is_model_ready("id_fp32"))

        model_bytes = (DEMO / "dense" / "1" / "model.onnx").read_bytes()
        with grpcclient.InferenceServerClient(s.url, channel_args=OWN_CONNECTION) as c:
            c.load_model(
                "uploaded",
                config=dense_config_json("uploaded", [1]),
                files={"file:1/model.onnx": model_bytes},
            )
        plain = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
        plain.set_data_from_numpy(dense_input())
        reference = ort.InferenceSession(str(DEMO / "dense" / "1" / "model.onnx"))
        (expected,) = reference.run(["OUTPUT0"], {"INPUT0": dense_input()})

        def serves_upload(c: grpcclient.InferenceServerClient) -> bool:
            if not c.is_model_ready("uploaded"):
                return False
            got = c.infer("uploaded", [plain]).as_numpy("OUTPUT0")
            np.testing.assert_allclose(got, expected, rtol=1e-6)
            return True

        on_every_front(serves_upload)
        # The upload was written once, into the pod's directory, and both fronts loaded it.
        (pod,) = [
            d.parent
            for d in Path(tempfile.gettempdir()).glob("microtune-*/owner")
            if d.read_text() == str(s.pid)
        ]
        assert len(list(pod.glob("override-*"))) == 1
        assert loads(s, "uploaded") == (1, 1), s.log()[-3000:]
        # A RepositoryModelLoad of a loaded model reloads it (the same files): once per call.
        for n in (2, 3):
            with grpcclient.InferenceServerClient(s.url, channel_args=OWN_CONNECTION) as c:
                c.load_model("id_fp32")
            assert loads(s, "id_fp32") == (n, n), s.log()[-3000:]
        on_every_front(lambda c: infers(c, "id_fp32"))


def loads(s: Server, model: str) -> tuple[int, int]:
    """Loads of version 1 of `model` in the worker, and fronts' loads that found it loaded."""
    log = s.log()
    return (
        log.count(f"loaded {model} version 1 in "),
        log.count(f"{model} version 1: already loaded in the worker"),
    )
