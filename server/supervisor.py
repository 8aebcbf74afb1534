"""`--frontends N`: one supervisor process, one runtime worker, N gRPC front processes.

The fronts share the gRPC port through SO_REUSEPORT (the kernel spreads connections over
them), so protobuf decoding and the Python gRPC stack are not bound to one core, while every
request still batches in the one worker. The supervisor owns the worker (and restarts it; the
fronts reconnect and reload), restarts a front that dies, and stops everything on SIGTERM.
Fronts are started with `spawn` and receive their settings as JSON.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

from prometheus_client import CollectorRegistry

from runtime.ipc.shm import ArenaNoSpace, remove_stale_arenas, require_space
from runtime.process import WorkerProcess, WorkerStartFailed
from server.cli import EXIT_CONFIG
from server.restarts import EXIT_GAVE_UP, RestartHistory, RestartPolicy, after_death
from server.rundir import make_rundir, remove_leftovers, remove_rundir
from server.settings import Settings
from server.telemetry import GpuSampler, PodMetrics, setup_logging
from server.worker_link import worker_log_setup, worker_settings_for

__all__ = ["frontends_for", "run_supervisor", "usable_cpus"]

log = logging.getLogger("microtune.supervisor")


def frontends_for(settings: Settings, cpus: int | None = None) -> int:
    """`--frontends`, or when 0 one per two CPUs this process may use, at most 4."""
    if settings.frontends:
        return settings.frontends
    return max(1, min(4, (usable_cpus() if cpus is None else cpus) // 2))


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may run on (its affinity), capped by its cgroup's CPU quota: a
    Kubernetes CPU limit is a CFS quota, invisible to os.cpu_count()."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:  # cgroup v2: "<quota> <period>" or "max <period>"
        quota, period = (cgroup / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:  # cgroup v1: -1 = no quota
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return cpus
    if quota in ("max", "-1"):
        return cpus
    try:
        limit = -(-int(quota) // int(period))  # a limit of 1.5 CPUs can keep 2 busy
    except (ValueError, ZeroDivisionError):
        return cpus
    return max(1, min(cpus, limit))


def _front_main(settings_json: str) -> None:
    from server.cli import serve_front

    settings = Settings.model_validate_json(settings_json)
    setup_logging(settings.log_level, settings.log_format)
    code = serve_front(settings)
    if code:
        sys.exit(code)


def _reserve_port(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """Bind (not listen) with SO_REUSEPORT to learn the port that every front will share, and
    take the port's lock. OSError when the port is not ours to take.

    SO_REUSEPORT lets any process of the same user bind the port too: a second supervisor
    started on it (a new release beside the old one, on a host) would silently share the
    connections with the first. So the supervisor also binds an abstract Unix socket named
    after the port, which, like the port, belongs to the network namespace: only one
    supervisor can hold it. (A lone front binds without SO_REUSEPORT: the kernel refuses it.)
    """
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host.strip("[]"), port))
        try:
            lock.bind(f"\0microtune-grpc-port-{sock.getsockname()[1]}")
        except OSError:
            raise OSError(errno.EADDRINUSE, "another microtune server serves it") from None
    except BaseException:
        sock.close()
        lock.close()
        raise
    return sock, lock


def _pod_metrics(settings: Settings, tmp: Path) -> tuple[PodMetrics | None, GpuSampler | None]:
    """The pod's one /metrics: every front's registry merged, plus the GPU gauges."""
    if settings.metrics_port < 0:
        return None, None

    def sources() -> dict[str, str]:
        found: dict[str, str] = {}
        for f in tmp.glob("metrics-*"):
            with contextlib.suppress(OSError, ValueError):
                pid, url = f.read_text().split()
                found[f"{f.name}:{pid}"] = url  # a restarted front gets a new key
        return found

    local = CollectorRegistry(auto_describe=False)
    pod = PodMetrics(sources, local=local)
    # OSError when the port is taken: raised before anything here needs stopping.
    server = pod.start_http_server(settings.metrics_port, settings.grpc_host.strip("[]"))
    log.info("pod metrics on %s", server.url)
    gpu: GpuSampler | None = GpuSampler(local)
    assert gpu is not None
    if gpu.open():
        gpu.start()
    else:
        gpu = None
    return pod, gpu


class _Restarts:
    """One supervised process's deaths and the instant it is due to start again."""

    def __init__(self, what: str, policy: RestartPolicy) -> None:
        self.what = what
        self.policy = policy
        self.history = RestartHistory()
        self.due: float | None = None

    def died(self, now: float, exitcode: int | None) -> bool:
        """Record a death; False when the server should give up."""
        self.history, decision = after_death(self.policy, self.history, now)
        if decision.give_up:
            log.error(
                "%s died %d times within %g s (last exit code %s); giving up: the server "
                "exits (code %d) so that its container is restarted",
                self.what,
                decision.recent,
                self.policy.window_s,
                exitcode,
                EXIT_GAVE_UP,
            )
            return False
        log.error(
            "%s died (exit code %s); restarting in %.1f s", self.what, exitcode, decision.delay_s
        )
        self.due = now + decision.delay_s
        return True

    def is_due(self, now: float) -> bool:
        if self.due is None or now < self.due:
            return False
        self.due = None
        return True


def run_supervisor(settings: Settings) -> int:
    n = frontends_for(settings)
    remove_leftovers()
    try:  # before any front starts: none would serve briefly, then go with the others
        require_space(settings.shm_slot_bytes * settings.shm_slots, n)
    except ArenaNoSpace as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    try:  # before anything starts, as for the metrics port
        reserved, port_lock = _reserve_port(settings.grpc_host, settings.grpc_port)
    except OSError as exc:
        log.error(
            "cannot listen on %s:%s: %s", settings.grpc_host, settings.grpc_port, exc.strerror
        )
        return EXIT_CONFIG
    port = reserved.getsockname()[1]
    tmp = make_rundir()
    worker = WorkerProcess(
        worker_settings_for(settings, str(tmp / "worker.sock")), worker_log_setup(settings)
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ctx = multiprocessing.get_context("spawn")

    def front(i: int) -> BaseProcess:
        s = settings.model_copy(
            update={
                "grpc_port": port,
                "worker_socket": worker.settings.socket_path,
                "frontend_index": i,
                "frontends": n,
                # Only the first front reports the port, once it really listens.
                "port_file": settings.port_file if i == 0 else None,
            }
        )
        p = ctx.Process(
            target=_front_main, args=(s.model_dump_json(),), name=f"microtune-front-{i}"
        )
        p.start()
        return p

    fronts: list[BaseProcess] = []
    pod: PodMetrics | None = None
    gpu: GpuSampler | None = None
    code = 0
    # Everything from here is undone in `finally`, whatever fails: a supervisor that left
    # its fronts running would wait for them at exit for ever (SIGTERM no longer heard).
    try:
        try:  # first: a port in use stops the server before any process starts
            pod, gpu = _pod_metrics(settings, tmp)
        except OSError as exc:
            log.error("cannot serve metrics on port %s: %s", settings.metrics_port, exc)
            return EXIT_CONFIG
        worker.start()
        try:
            worker.wait_listening(settings.worker_start_timeout_s)
        except WorkerStartFailed as exc:  # as configured, it would fail again: one line
            log.error("cannot start: %s", exc)
            return EXIT_CONFIG
        fronts.extend(front(i) for i in range(n))
        log.info(
            "supervisor %d: %d front(s) on port %d, worker %s", os.getpid(), n, port, worker.pid
        )
        policy = RestartPolicy(limit=settings.restart_limit, window_s=settings.restart_window_s)
        worker_restarts = _Restarts("runtime worker", policy)
        front_restarts = [_Restarts(f"front {i}", policy) for i in range(n)]
        # Nothing in this loop blocks for long: a worker that takes its time to start again,
        # or a front waiting for its restart, must not keep the others unwatched or SIGTERM
        # unheard. (The fronts find a restarted worker on their own: they poll its socket.)
        while not stop.wait(0.2):
            now = time.monotonic()
            dead = worker_restarts.due is None and not worker.is_alive()
            if dead and not worker_restarts.died(now, worker.exitcode):
                code = EXIT_GAVE_UP
                break
            if worker_restarts.is_due(now):
                worker.stop(1.0)  # (reaps the dead one)
                worker.start()
            for i, p in enumerate(fronts):
                r = front_restarts[i]
                if r.is_due(now):
                    remove_stale_arenas()  # the dead front's arena: the new one needs the room
                    fronts[i] = front(i)
                    continue
                if r.due is not None or p.is_alive():
                    continue
                if p.exitcode == EXIT_CONFIG:  # would fail the same way again: the pod stops
                    log.error("front %d cannot start (see its error); stopping the server", i)
                    code = EXIT_CONFIG
                    break
                if not r.died(now, p.exitcode):
                    code = EXIT_GAVE_UP
                    break
            if code:
                break
    finally:
        for p in fronts:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signal.SIGTERM)
        # Each front serves on --shutdown-delay-s, drains for up to --shutdown-grace-s, then
        # stops its parts (seconds).
        deadline = time.monotonic() + settings.shutdown_delay_s + settings.shutdown_grace_s + 10
        for p in fronts:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
        worker.stop(5.0)
        reserved.close()
        port_lock.close()
        if pod is not None:
            pod.close()
        if gpu is not None:
            gpu.stop()
        remove_rundir(tmp)
    return code
