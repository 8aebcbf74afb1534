"""POSIX shared-memory arena and the slot allocator that hands out pieces of it.

One arena per front process, created (and unlinked) by the front; the worker attaches to it by
name when the front says Hello, and unlinks it too if the front vanishes, so a crash on either
side leaves nothing in /dev/shm. Slots are fixed-size and page-aligned; a request that needs more
than one slot takes a contiguous run. The allocator is single-threaded (the front's event loop).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import time
from pathlib import Path
from typing import Final, NamedTuple

__all__ = [
    "ALIGN",
    "Arena",
    "ArenaNoSpace",
    "Lease",
    "SlotPool",
    "align_up",
    "pid_alive",
    "remove_stale_arenas",
    "require_space",
    "reserve_pages",
]

ALIGN: Final = 64  # tensor offsets inside a lease are 64-byte aligned (SIMD loads, cudaMemcpy)
_SHM_DIR: Final = Path("/dev/shm")
PREFIX: Final = "microtune-"


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


class Arena:
    """A named POSIX shm object mapped into this process. Close with `close()`; the creator
    (or whoever sees the creator die) calls `unlink()`."""

    def __init__(self, name: str, size: int, *, create: bool) -> None:
        if not name.startswith("/") or "/" in name[1:]:
            raise ValueError(f"bad shm name {name!r}")
        self.name = name
        self.size = size
        path = _SHM_DIR / name[1:]
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
                _reserve(fd, path, size)
            elif os.fstat(fd).st_size < size:
                raise ValueError(f"shm {name} is smaller than {size} bytes")
            self._mmap = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.buf = memoryview(self._mmap)

    def close(self) -> None:
        # Views handed out must be released first; an exported buffer keeps the mmap open.
        with contextlib.suppress(BufferError):
            self.buf.release()
            self._mmap.close()

    def unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (_SHM_DIR / self.name[1:]).unlink()


class ArenaNoSpace(RuntimeError):
    """/dev/shm cannot hold the arena (a container's default /dev/shm is 64 MiB)."""


def reserve_pages(fd: int, offset: int, size: int) -> bool:
    """Allocate the pages of [offset, offset + size) of a shm object now; False when /dev/shm
    has no room for them. A sparse object in a full /dev/shm maps fine, then kills whoever
    writes into one of its holes with SIGBUS, in the middle of serving. (A filesystem without
    fallocate leaves the object as it is: True.)"""
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            return False
    return True


def _reserve(fd: int, path: Path, size: int) -> None:
    """The arena's pages, or ArenaNoSpace at start, with what to change."""
    if not reserve_pages(fd, 0, size):
        path.unlink(missing_ok=True)
        raise _no_space(size, 1)


def require_space(arena_size: int, arenas: int) -> None:
    """ArenaNoSpace unless /dev/shm has room for `arenas` arenas of `arena_size` bytes: what a
    supervisor checks before it starts one front (and arena) per process."""
    if arenas * arena_size > _free_bytes():
        raise _no_space(arena_size, arenas)


def _free_bytes() -> int:
    st = os.statvfs(_SHM_DIR)
    return st.f_bavail * st.f_frsize


def _no_space(arena_size: int, arenas: int) -> ArenaNoSpace:
    need = arena_size * arenas / 2**20
    what = (
        "the shared-memory arena needs" if arenas == 1 else f"{arenas} arenas (one per front) need"
    )
    return ArenaNoSpace(
        f"{what} {need:.0f} MiB in {_SHM_DIR}, which has {_free_bytes() / 2**20:.0f} MiB "
        "free: give the container a larger /dev/shm (docker run --shm-size; the Helm chart's "
        "shm.sizeLimit) or lower --shm-slots or --shm-slot-bytes (each front process has its "
        "own arena)"
    )


def arena_name(owner_pid: int, index: int) -> str:
    return f"/{PREFIX}{owner_pid}-{index}"


def remove_stale_arenas() -> list[str]:
    """Unlink arenas whose owning process no longer exists (left by a crash or SIGKILL)."""
    removed: list[str] = []
    for path in _SHM_DIR.glob(f"{PREFIX}*"):
        try:
            pid = int(path.name[len(PREFIX) :].split("-")[0])
        except ValueError:
            continue
        try:
            made = path.stat().st_mtime
        except FileNotFoundError:
            continue
        if not owner_alive(pid, made):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path.name)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_alive(pid: int, made_at: float) -> bool:
    """Whether the process that made a file at `made_at` (wall clock, its mtime) as `pid` is
    still running: `pid` is alive and started before the file was made. A container restarted
    with its /dev/shm or /tmp volume (a Kubernetes emptyDir) runs its processes under the
    same pids again, and the previous incarnation's leftovers looked alive for ever."""
    if not pid_alive(pid):
        return False
    started = process_start(pid)
    return started is None or started <= made_at + _START_SLACK_S


_START_SLACK_S = 0.5  # /proc's clock ticks and uptime are in hundredths of a second


def process_start(pid: int) -> float | None:
    """When `pid` started (wall clock), from /proc; None where /proc cannot tell."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    try:  # the fields after the command name, which may hold spaces and parentheses
        ticks = int(stat.rsplit(")", 1)[1].split()[19])
    except (IndexError, ValueError):
        return None
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Lease(NamedTuple):
    """Ownership of arena bytes [offset, offset + size) until `SlotPool.release`. (A tuple:
    one is made per call, and a frozen dataclass costs a __setattr__ per field.)"""

    first_slot: int
    slots: int
    offset: int
    size: int


class SlotPool:
    """First-fit allocator of contiguous runs of fixed-size slots.

    The free map is a bytearray (0 = free) so that finding a run of k free slots is one
    `bytearray.find` in C. A rotating hint spreads leases over the arena.
    """

    def __init__(self, slot_bytes: int, slots: int) -> None:
        if slot_bytes <= 0 or slot_bytes % mmap.PAGESIZE:
            raise ValueError("slot size must be a multiple of the page size")
        self.slot_bytes = slot_bytes
        self.slots = slots
        self._map = bytearray(slots)
        self._hint = 0
        self.in_use = 0

    @property
    def capacity(self) -> int:
        return self.slot_bytes * self.slots

    def slots_for(self, nbytes: int) -> int:
        return max(1, -(-nbytes // self.slot_bytes))

    def try_lease(self, nbytes: int) -> Lease | None:
        k = self.slots_for(nbytes)
        if k > self.slots:
            return None
        m = self._map
        if k == 1:  # most calls: one byte to find and set, no run objects to build
            i = m.find(0, self._hint)
            if i < 0:
                i = m.find(0)
                if i < 0:
                    return None
            m[i] = 1
        else:
            run = bytes(k)
            i = m.find(run, self._hint)
            if i < 0 or i + k > self.slots:
                i = m.find(run, 0)
                if i < 0:
                    return None
            m[i : i + k] = b"\x01" * k
        self._hint = (i + k) % self.slots
        self.in_use += k
        return Lease(i, k, i * self.slot_bytes, k * self.slot_bytes)

    def release(self, lease: Lease) -> None:
        i, k = lease.first_slot, lease.slots
        m = self._map
        if k == 1:
            if m[i] != 1:
                raise RuntimeError(f"double release of slots {i}+1")
            m[i] = 0
        else:
            if m.count(1, i, i + k) != k:
                raise RuntimeError(f"double release of slots {i}+{k}")
            m[i : i + k] = bytes(k)
        self.in_use -= k
