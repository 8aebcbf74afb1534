"""SIGKILL the runtime worker under inference traffic: requests fail fast with UNAVAILABLE (never
hang, never INTERNAL), readiness drops and comes back, models reload, and the dead worker
generation leaves nothing in /dev/shm. Uses its own server: the shared one must stay intact."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import Server, pid_alive, running_server, shm_arenas
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

CLIENTS = 4
TRAFFIC_S = 6.0  # the traffic loop's own bound
SLOW_CALL_S = 5.0  # "fail fast": well under the 10 s client timeout a hang would hit


@pytest.fixture(scope="module", params=["sessions", "cpu-graphs"])
def own_server(
    request: pytest.FixtureRequest,
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    """Plain sessions, and the GPU worker's path on the CPU EP (`--cpu-graphs`), where calls
    travel on direct channels: a dying worker ends those before its link."""
    extra = ("--cpu-graphs", "true") if request.param == "cpu-graphs" else ()
    with running_server(model_repository, tmp_path_factory.mktemp("kill"), extra) as s:
        yield s


def simple_request() -> pb.ModelInferRequest:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(a.tobytes())
    return req


def ready_versions(url: str) -> set[tuple[str, str]]:
    with grpc.insecure_channel(url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=5).models
    return {(m.name, m.version) for m in index}


async def traffic(
    url: str,
    stop: asyncio.Event,
    codes: collections.Counter[str],
    slowest: list[float],
    details: dict[str, set[str]],
) -> None:
    async with grpc.aio.insecure_channel(url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        req = simple_request()
        deadline = time.monotonic() + TRAFFIC_S
        while not stop.is_set() and time.monotonic() < deadline:
            t0 = time.monotonic()
            try:
                await stub.ModelInfer(req, timeout=10)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                details.setdefault(exc.code().name, set()).add(exc.details() or "")
                await asyncio.sleep(0.005)
            slowest[0] = max(slowest[0], time.monotonic() - t0)


def test_worker_sigkill_under_traffic(own_server: Server) -> None:
    s = own_server
    old_worker = s.worker_pid()
    old_arenas = shm_arenas(s.pid)
    assert old_arenas, "the front has no shared-memory arena"
    ready_before = ready_versions(s.url)

    codes: collections.Counter[str] = collections.Counter()
    slowest = [0.0]
    details: dict[str, set[str]] = {}
    seen_health: list[int] = []

    async def scenario() -> float:
        stop = asyncio.Event()
        tasks = [
            asyncio.create_task(traffic(s.url, stop, codes, slowest, details))
            for _ in range(CLIENTS)
        ]
        await asyncio.sleep(0.5)  # traffic flowing
        assert codes["OK"] > 0, dict(codes)
        killed_at = time.monotonic()
        os.kill(old_worker, signal.SIGKILL)
        # Readiness must drop, then come back.
        async with grpc.aio.insecure_channel(s.url) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="readiness")
            back_after = -1.0
            while time.monotonic() - killed_at < 30:
                status = (await health.Check(req, timeout=2)).status
                if not seen_health or seen_health[-1] != status:
                    seen_health.append(status)
                if NOT_SERVING in seen_health and status == SERVING:
                    back_after = time.monotonic() - killed_at
                    break
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # traffic after recovery
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 15)
        return back_after

    back_after = asyncio.run(asyncio.wait_for(scenario(), 60))

    assert NOT_SERVING in seen_health, f"readiness never dropped: {seen_health}"
    assert 0 < back_after < 20, (back_after, seen_health, s.log()[-3000:])
    # Every failure was UNAVAILABLE (retryable), and none hung.
    assert set(codes) <= {"OK", "UNAVAILABLE"}, (dict(codes), details)
    assert codes["UNAVAILABLE"] > 0, dict(codes)
    for text in details["UNAVAILABLE"]:
        assert any(w in text for w in ("worker", "loading", "restart")), details
    assert slowest[0] < SLOW_CALL_S, slowest
    # The log names how it died (it said "exit code None": not reaped yet).
    assert "runtime worker link lost (worker exit code -9)" in s.log(), s.log()[-3000:]

    # A new worker serves the reloaded models.
    new_worker = s.worker_pid()
    assert new_worker != old_worker
    ch = grpc.insecure_channel(s.url)
    try:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        resp = stub.ModelInfer(simple_request(), timeout=10)
        out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
        np.testing.assert_array_equal(out, np.arange(16, dtype=np.int32) * 2)
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
    finally:
        ch.close()

    assert ready_versions(s.url) == ready_before  # every model version was reloaded

    # The dead generation's arena is gone; only the new worker's remains.
    now = shm_arenas(s.pid)
    assert not set(old_arenas) & set(now), (old_arenas, now)
    assert len(now) == 1, now


def test_a_worker_that_dies_again_while_the_models_reload_is_recovered(
    own_server: Server,
) -> None:
    """The second death comes while the first recovery reloads the models (as a model whose
    load kills the worker makes it happen): the front recovers again. Before, the recovery
    task ignored it, and no worker was ever started again: readiness NOT_SERVING for good,
    liveness SERVING, so Kubernetes never restarted the pod."""
    s = own_server
    ready_before = ready_versions(s.url)
    first = s.worker_pid()
    connected = s.log().count("connected on")
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while s.log().count("connected on") <= connected:  # the replacement is connected ...
        assert time.monotonic() < deadline, s.log()[-3000:]
        time.sleep(0.005)
    second = s.worker_pid()
    assert second != first
    os.kill(second, signal.SIGKILL)  # ... and dies while the models load again
    with grpc.insecure_channel(s.url) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        req = health_pb2.HealthCheckRequest(service="readiness")
        # every version READY again, and readiness says so (it follows within 0.1 s)
        while (
            ready_versions(s.url) != ready_before or health.Check(req, timeout=2).status != SERVING
        ):
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.1)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        resp = stub.ModelInfer(simple_request(), timeout=10)
    out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(out, np.arange(16, dtype=np.int32) * 2)
    assert s.worker_pid() not in (first, second)


def test_front_sigkill_leaves_no_worker_or_shm(
    model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A SIGKILLed front cannot clean up: its worker notices, exits and unlinks the arena."""
    s = Server(model_repository, tmp_path_factory.mktemp("front-kill"))
    worker = 0
    try:
        worker = s.worker_pid()
        assert shm_arenas(s.pid)
        s.proc.kill()
        s.proc.wait(5)
        deadline = time.monotonic() + 10
        while (pid_alive(worker) or shm_arenas(s.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_alive(worker), "the worker outlived its front"
        assert not shm_arenas(s.pid), shm_arenas(s.pid)
    finally:
        s.stop(check=False)
        if worker and pid_alive(worker):
            os.kill(worker, signal.SIGKILL)
