"""Run directories (server.rundir): they name their owner's pid; a start removes those of dead
owners (their sockets and records included) and leaves live owners' and other kinds'."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from server.rundir import make_rundir, remove_rundir, remove_stale_rundirs


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_start_removes_what_dead_owners_left(tmp_path: Path) -> None:
    dead = tmp_path / "microtune-abc"
    dead.mkdir()
    (dead / "owner").write_text(str(dead_pid()))
    (dead / "admin-1").write_text("{}")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(dead / "worker.sock"))
    sock.close()
    live = tmp_path / "microtune-def"
    live.mkdir()
    (live / "owner").write_text(str(os.getpid()))
    other = tmp_path / "microtune-override-xyz"  # the lifecycle's, not a run directory
    other.mkdir()
    assert remove_stale_rundirs(tmp_path) == [dead.name]
    assert not dead.exists() and live.exists() and other.exists()


def test_make_and_remove(tmp_path: Path) -> None:
    d = make_rundir()
    try:
        assert d.name.startswith("microtune-")
        assert (d / "owner").read_text() == str(os.getpid())
        (d / "x").write_text("1")
    finally:
        remove_rundir(d)
    assert not d.exists()


def test_a_run_directory_older_than_its_live_owner_is_removed(tmp_path: Path) -> None:
    """Same pid, earlier process (a container restarted with its /tmp volume)."""
    old = tmp_path / "microtune-old"
    old.mkdir()
    (old / "owner").write_text(str(os.getpid()))
    before_us = time.time() - 3600 * 24 * 365
    os.utime(old / "owner", (before_us, before_us))
    mine = tmp_path / "microtune-mine"
    mine.mkdir()
    (mine / "owner").write_text(str(os.getpid()))
    assert remove_stale_rundirs(tmp_path) == [old.name]
    assert mine.exists()
