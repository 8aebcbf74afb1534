"""A runtime worker that keeps dying: the server restarts it with growing pauses, then gives up
and exits with code 70 (server.restarts), so that its container is restarted and shows as
crash-looping, instead of respawning it for ever while Kubernetes sees a live pod. Lone front
and supervisor alike; either way nothing is left behind (processes, /dev/shm)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from grpc_health.v1 import health_pb2
from harness import SHM, Server, children_of, cmdline, pid_alive

SERVING = health_pb2.HealthCheckResponse.SERVING
LIMIT = ("--restart-limit", "3", "--restart-window-s", "600")
GAVE_UP = 70


def supervised_worker(supervisor: int) -> int:
    """The supervisor's worker: its spawned child without an arena of its own (the fronts own
    theirs) that is not multiprocessing's resource tracker."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        found = [
            p
            for p in children_of(supervisor)
            if "spawn_main" in (line := cmdline(p))
            and "resource_tracker" not in line
            and not list(SHM.glob(f"microtune-{p}-*"))
        ]
        fronts = [p for p in children_of(supervisor) if list(SHM.glob(f"microtune-{p}-*"))]
        if len(found) == 1 and len(fronts) == 2:
            return found[0]
        time.sleep(0.05)
    raise LookupError(children_of(supervisor))


def kill_and_wait(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while pid_alive(pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)


def wait_restarted(s: Server, dead: int, worker_of: Callable[[], int]) -> None:
    """Until a new worker runs and the server is ready again (models reloaded)."""
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(LookupError):
            if worker_of() != dead:
                break
        assert time.monotonic() < deadline, s.log()[-3000:]
        time.sleep(0.05)
    s.wait_health("readiness", SERVING, 30)


def assert_gave_up(s: Server, children: list[int], fronts: list[int]) -> None:
    try:
        s.proc.wait(30)
    finally:
        s.stop(check=False)
    log = s.log()
    assert s.proc.returncode == GAVE_UP, (s.proc.returncode, log[-4000:])
    assert "died 3 times within 600 s" in log and "giving up" in log, log[-4000:]
    deadline = time.monotonic() + 5
    while any(pid_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [c for c in children if pid_alive(c)], log[-3000:]
    assert not [p.name for f in fronts for p in SHM.glob(f"microtune-{f}-*")]


def test_a_lone_front_gives_up_on_a_worker_that_keeps_dying(
    model_repository: Path, tmp_path: Path
) -> None:
    s = Server(model_repository, tmp_path, extra_args=LIMIT)
    children: set[int] = set(children_of(s.pid))
    try:
        for _ in range(2):
            dead = s.worker_pid()
            kill_and_wait(dead)
            wait_restarted(s, dead, s.worker_pid)
            children.update(children_of(s.pid))
        assert "restarting the runtime worker in 0.5 s" in s.log()  # the second death waited
        kill_and_wait(s.worker_pid())
    except BaseException:
        s.stop(check=False)
        raise
    assert_gave_up(s, sorted(children), [s.pid])


def test_the_supervisor_gives_up_on_a_worker_that_keeps_dying(
    model_repository: Path, tmp_path: Path
) -> None:
    s = Server(model_repository, tmp_path, extra_args=(*LIMIT, "--frontends", "2"))
    children: set[int] = set()
    try:
        supervised_worker(s.pid)  # every process is up
        children.update(children_of(s.pid))
        fronts = [p for p in children if list(SHM.glob(f"microtune-{p}-*"))]
        for _ in range(2):
            dead = supervised_worker(s.pid)
            kill_and_wait(dead)
            wait_restarted(s, dead, lambda: supervised_worker(s.pid))
            children.update(children_of(s.pid))
        assert "runtime worker died (exit code -9); restarting in 0.5 s" in s.log()
        kill_and_wait(supervised_worker(s.pid))
    except BaseException:
        s.stop(check=False)
        for c in children:
            if pid_alive(c):
                os.kill(c, signal.SIGKILL)
        raise
    assert_gave_up(s, sorted(children), fronts)
