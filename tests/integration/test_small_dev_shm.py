"""A /dev/shm too small for the arenas (a container's default is 64 MiB, one default arena):
the server used to start, then die of SIGBUS mid-request once the slots in use reached past
the space left. It now reserves each arena's pages at start and exits with EXIT_CONFIG and a
line saying what to change; an arena that fits serves, every slot of it touched; a worker or
front that restarts in a /dev/shm with room for exactly the arenas in use gets its arena back.

Each server runs in its own mount namespace with a small tmpfs on /dev/shm (`unshare -m`, as
root); where that is not allowed the tests skip."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import Server, ServerExited, children_of, cmdline

EXIT_CONFIG = 78


def small_dev_shm(mib: int) -> tuple[str, ...]:
    mount = f'mount -t tmpfs -o size={mib}m tmpfs /dev/shm && exec "$@"'
    return ("unshare", "-m", "sh", "-c", mount, "sh")


def _can_mount() -> bool:
    try:
        probe = subprocess.run(
            [*small_dev_shm(1), "true"], capture_output=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


pytestmark = pytest.mark.skipif(
    not _can_mount(), reason="needs unshare -m and mount (root in a container that allows it)"
)


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_dev_shm_too_small_stops_the_server_at_start(
    model_repository: Path, tmp_path: Path, frontends: str
) -> None:
    # 96 MiB: one default arena (64 MiB) fits, two do not.
    with pytest.raises(ServerExited) as info:
        Server(
            model_repository,
            tmp_path,
            extra_args=("--frontends", frontends),
            prefix=small_dev_shm(96 if frontends == "2" else 32),
        )
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text
    need = (
        "the shared-memory arena needs 64 MiB"
        if frontends == "1"
        else "2 arenas (one per front) need 128 MiB"  # checked before any front starts
    )
    assert f"cannot start: {need} in /dev/shm" in text
    assert "docker run --shm-size" in text and "--shm-slots" in text


def test_an_arena_that_fits_serves_with_every_slot_used(
    model_repository: Path, tmp_path: Path
) -> None:
    # 128 slots of 64 KiB = 8 MiB in a 12 MiB /dev/shm; 256 KiB in and out per call: the
    # rotating slot hint walks the whole arena many times over.
    s = Server(
        model_repository,
        tmp_path,
        extra_args=("--shm-slots", "128"),
        prefix=small_dev_shm(12),
    )
    try:
        x = np.arange(65536, dtype=np.float32)

        def call(i: int) -> bool:
            with grpcclient.InferenceServerClient(s.url) as c:
                inp = grpcclient.InferInput("INPUT0", [65536], "FP32")
                inp.set_data_from_numpy(x + i)
                out = c.infer("identity_fp32", [inp]).as_numpy("OUTPUT0")
                return bool(np.array_equal(out, x + i))

        with ThreadPoolExecutor(4) as pool:
            assert all(pool.map(call, range(120)))
        assert s.proc.poll() is None
    finally:
        s.stop()


def test_a_worker_restart_fits_where_one_arena_does(model_repository: Path, tmp_path: Path) -> None:
    """The new worker gets a new arena: the lost worker's goes first, or two would not fit."""
    s = Server(
        model_repository,
        tmp_path,
        extra_args=("--shm-slots", "128"),  # 8 MiB in 12 MiB: one arena, not two
        prefix=small_dev_shm(12),
    )
    try:
        old = s.worker_pid()
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(LookupError):
                if s.worker_pid() != old:
                    break
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        with grpcclient.InferenceServerClient(s.url) as c:
            while not c.is_model_ready("identity_fp32"):  # reloaded on the new worker
                assert time.monotonic() < deadline, s.log()[-3000:]
                time.sleep(0.05)
            inp = grpcclient.InferInput("INPUT0", [65536], "FP32")
            x = np.ones(65536, dtype=np.float32)
            inp.set_data_from_numpy(x)
            assert np.array_equal(c.infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), x)
        assert "worker recovery failed" not in s.log()
    finally:
        s.stop()


def test_a_front_restarted_in_a_full_dev_shm_gets_its_arena_back(
    model_repository: Path, tmp_path: Path
) -> None:
    """Two fronts' arenas fill the room there is: a front killed outright cannot unlink its
    own, and the front started in its place must still get one (not exit with code 78)."""
    s = Server(
        model_repository,
        tmp_path,
        extra_args=("--frontends", "2", "--shm-slots", "128"),  # 2 x 8 MiB in 18 MiB
        prefix=small_dev_shm(18),
    )
    try:
        m = re.search(r"front\(s\) on port \d+, worker (\d+)", s.log())
        assert m, s.log()[-3000:]
        worker = int(m.group(1))

        def fronts_now() -> list[int]:
            return [
                p
                for p in children_of(s.pid)
                if p != worker and "resource_tracker" not in cmdline(p)
            ]

        fronts = fronts_now()
        assert len(fronts) == 2, fronts
        os.kill(fronts[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        # The supervisor has reaped the killed front (its listener is gone) and started another.
        while not [p for p in fronts_now() if p not in fronts]:
            assert s.proc.poll() is None, s.log()[-3000:]
            assert time.monotonic() < deadline, s.log()[-3000:]
            time.sleep(0.05)
        s.wait_health("readiness", 1, 30)  # SERVING
        x = np.ones(65536, dtype=np.float32)
        for _ in range(12):  # fresh connections: both fronts answer
            with grpcclient.InferenceServerClient(s.url) as c:
                inp = grpcclient.InferInput("INPUT0", [65536], "FP32")
                inp.set_data_from_numpy(x)
                assert np.array_equal(c.infer("identity_fp32", [inp]).as_numpy("OUTPUT0"), x)
        assert s.proc.poll() is None and "cannot start" not in s.log()
    finally:
        s.stop()
