"""The private directory of a front (its worker's socket) or of the supervisor (the worker's
socket and, for its fronts, the pod's shared records: server.shm_directory,
server.admin_sync, server.control_sync, server.stats_peers; written by
server.pod_records), in the temp directory.

It holds an `owner` file with the owner's pid, so that a start removes the directories of
owners that died without cleaning up (SIGKILL, OOM kill), as runtime.ipc.shm's
remove_stale_arenas does for their arenas. (Not in the name: Unix socket paths are short, and
a long TMPDIR already leaves little room.)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from runtime.ipc.shm import owner_alive, remove_stale_arenas

__all__ = ["make_rundir", "remove_leftovers", "remove_rundir", "remove_stale_rundirs"]

log = logging.getLogger(__name__)

_PREFIX = "microtune-"
_OWNER = "owner"


def make_rundir() -> Path:
    path = Path(tempfile.mkdtemp(prefix=_PREFIX))
    (path / _OWNER).write_text(str(os.getpid()))
    return path


def remove_rundir(path: Path) -> None:
    """Remove the directory and all it holds (the pod's model overrides are directories)."""
    shutil.rmtree(path, ignore_errors=True)


def remove_stale_rundirs(tmp: Path | None = None) -> list[str]:
    """Remove the run directories of dead owners; their names."""
    removed: list[str] = []
    for d in Path(tmp or tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        owner = d / _OWNER
        try:
            pid, made = owner.read_text(), owner.stat().st_mtime
        except OSError:
            continue  # another kind of directory (microtune-override-...), or not ours to judge
        if not pid.isdigit() or owner_alive(int(pid), made):
            continue
        remove_rundir(d)
        if not d.exists():
            removed.append(d.name)
    return removed


def remove_leftovers() -> None:
    """What dead microtune processes left in /dev/shm and the temp directory: done by whoever
    starts the worker (a lone front, or the supervisor)."""
    removed = remove_stale_arenas()
    if removed:
        log.info("removed stale shared-memory arenas: %s", ", ".join(removed))
    removed = remove_stale_rundirs()
    if removed:
        log.info("removed run directories of dead processes: %s", ", ".join(removed))
