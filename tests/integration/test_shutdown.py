"""Stopping the server drains what it accepted: on SIGTERM the requests in flight are answered
for up to --shutdown-grace-s (30 s by default, as Triton's --exit-timeout-secs; it was a fixed
5 s, while the Helm chart gives a pod 60), with one front or several, and also when the signal
goes to the whole process group (systemd, Ctrl-C, `kill -- -PGID`): the runtime worker got it
too and died at once, failing every request still running.

`spin` (spin_model.py) takes as long as the test asks: about SLOW_S seconds."""

from __future__ import annotations

import concurrent.futures as cf
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from harness import DEMO, Server
from spin_model import spin_repository, spin_request
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

SLOW_S = 7.0  # longer than the old fixed 5 s


@pytest.fixture(scope="module")
def spin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The repository, and the N that takes about SLOW_S seconds here."""
    repo = tmp_path_factory.mktemp("repo")
    return repo, spin_repository(repo, SLOW_S)


def drain(server: Server, n: int, stop: object) -> None:
    """Two slow requests in flight, then `stop()`: both answered, and a clean exit."""
    with grpc.insecure_channel(server.url) as ch, cf.ThreadPoolExecutor(2) as pool:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        calls = [pool.submit(stub.ModelInfer, spin_request(n), timeout=120) for _ in range(2)]
        time.sleep(1.0)  # both running
        assert not any(c.done() for c in calls), [c.exception() for c in calls if c.done()]
        start = time.monotonic()
        stop()  # type: ignore[operator]
        for c in calls:
            assert c.result().model_name == "spin"  # answered, not cancelled
        assert time.monotonic() - start > 2.0  # (they were still running at the signal)
    assert server.proc.wait(60) == 0, server.log()[-3000:]


@pytest.mark.parametrize("frontends", [1, 2])
def test_sigterm_answers_the_requests_in_flight(
    spin: tuple[Path, int], tmp_path: Path, frontends: int
) -> None:
    repo, n = spin
    args = ("--shutdown-grace-s", "60", "--frontends", str(frontends))
    server = Server(repo, tmp_path, extra_args=args, kill_after=90)
    try:
        drain(server, n, lambda: server.proc.send_signal(signal.SIGTERM))
    finally:
        server.stop(check=False)


def test_a_signal_to_the_whole_process_group_drains_too(
    spin: tuple[Path, int], tmp_path: Path
) -> None:
    """Ctrl-C in a terminal: SIGINT to the group (the worker also printed a traceback)."""
    repo, n = spin
    args = ("--shutdown-grace-s", "60", "--frontends", "1")
    server = Server(repo, tmp_path, extra_args=args, kill_after=90, new_session=True)
    try:
        drain(server, n, lambda: os.killpg(server.proc.pid, signal.SIGINT))
        assert "Traceback" not in server.log(), server.log()[-3000:]
    finally:
        server.stop(check=False)


def test_shutdown_delay_serves_on_not_ready_before_the_drain(
    spin: tuple[Path, int], tmp_path: Path
) -> None:
    """--shutdown-delay-s: after SIGTERM, readiness is NOT_SERVING (and ServerReady false)
    while calls are still served, so that a health-checking load balancer moves traffic away
    before the listener closes (it refused new calls at once: checkers never saw
    NOT_SERVING)."""
    repo, _n = spin
    args = ("--shutdown-delay-s", "4", "--frontends", "1")
    server = Server(repo, tmp_path, extra_args=args, kill_after=60)
    try:
        server.proc.send_signal(signal.SIGTERM)
        server.wait_health("readiness", health_pb2.HealthCheckResponse.NOT_SERVING, 3)
        with grpc.insecure_channel(server.url) as ch:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            assert not stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
            assert stub.ModelInfer(spin_request(1), timeout=5).model_name == "spin"
        assert server.proc.wait(30) == 0, server.log()[-3000:]
        assert "not ready; serving 4.0 s more before the drain" in server.log()
    finally:
        server.stop(check=False)


def test_a_model_load_in_flight_is_answered_and_the_fronts_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--frontends 2, SIGTERM while a RepositoryModelLoad runs (model "slow" takes 3 s to load:
    slow_load/). The front that got it waited, once it was done, for the other front to
    acknowledge doing the same; but the shutdown had cancelled that front's poll, so the wait
    held the shutdown for the whole grace period, and the load, done, was answered
    UNAVAILABLE. It is answered once done here now, and the pod exits then."""
    repo = tmp_path / "repo"
    shutil.copytree(DEMO / "identity_fp32", repo / "slow")
    config = repo / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace('"identity_fp32"', '"slow"'))
    slow_load = Path(__file__).parent / "slow_load"
    path = os.pathsep.join((str(slow_load), os.environ.get("PYTHONPATH", "")))
    monkeypatch.setenv("PYTHONPATH", path)
    monkeypatch.setenv("SLOW_LOAD_TEST_S", "3")
    args = ("--frontends", "2", "--model-control-mode", "explicit", "--shutdown-grace-s", "15")
    server = Server(repo, tmp_path, extra_args=args, kill_after=60)
    try:
        with grpc.insecure_channel(server.url) as ch, cf.ThreadPoolExecutor(1) as pool:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            request = pb.RepositoryModelLoadRequest(model_name="slow")
            load = pool.submit(stub.RepositoryModelLoad, request, timeout=60)
            time.sleep(1.0)  # loading in the worker
            assert not load.done(), load.exception()
            start = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            load.result()  # answered OK
            assert server.proc.wait(60) == 0, server.log()[-3000:]
        assert time.monotonic() - start < 8, server.log()[-3000:]
    finally:
        server.stop(check=False)
