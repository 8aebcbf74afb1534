"""Client system regions hold descriptors in the front (one to check their size before each use,
one that mmap dups). A front at its descriptor limit refuses the next registration with
RESOURCE_EXHAUSTED (Overloaded) naming the cause, not INVALID_ARGUMENT as if the client's key
were wrong, whichever of the two calls hits the limit; it leaks nothing, and once regions are
unregistered, registering works again."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from server import shm_regions
from server.errors import Overloaded
from server.shm_regions import SharedMemoryRegistry


@pytest.mark.parametrize("free", [4, 5], ids=["open-fails", "mmap-dup-fails"])
def test_registration_at_the_descriptor_limit_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int
) -> None:
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    (tmp_path / "client").write_bytes(b"\0" * 4096)
    reg = SharedMemoryRegistry(True)
    try:
        before = _open_fds()
        with _limit(free), pytest.raises(Overloaded) as caught:
            for i in range(64):
                reg.register_system(f"r{i}", "/client", 0, 64)
        assert len(reg.system) == 2  # two descriptors each: the third found fewer than two
        assert _open_fds() == before + 4  # the failed registration closed what it opened
        with _limit(free):
            reg.unregister_system("r0")
            reg.register_system("again", "/client", 0, 64)  # its descriptors were given back
        message = str(caught.value)
        assert message == (
            "unable to open shared memory region 'r2' (key '/client'): Too many open files; "
            "unregister regions no longer used"
        )
    finally:
        reg.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # (less listdir's own)


class _limit:
    """RLIMIT_NOFILE such that exactly `free` more descriptors can be opened in the block: the
    limit bounds descriptor numbers, so the holes below the highest open one are filled first."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.fillers: list[int] = []

    def __enter__(self) -> None:
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        top = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        while (fd := os.open(os.devnull, os.O_RDONLY)) < top:
            self.fillers.append(fd)
        os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd + self.free, self.hard))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft, self.hard))
        for fd in self.fillers:
            os.close(fd)
        self.fillers.clear()
