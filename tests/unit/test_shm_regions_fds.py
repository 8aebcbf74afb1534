"""A client system region holds one descriptor in the front (its bytes are read and written
through it with pread/pwrite, and its size checked before each use). A front at its descriptor
limit refuses the next registration with RESOURCE_EXHAUSTED (Overloaded) naming the cause, not
INVALID_ARGUMENT as if the client's key were wrong; it leaks nothing, and once regions are
unregistered, registering works again."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from server import shm_regions
from server.errors import Overloaded
from server.shm_regions import SharedMemoryRegistry


# With `free` descriptors left, `free` registrations succeed and the next one is refused.
@pytest.mark.parametrize("free", [0, 4])
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
        held = free
        assert len(reg.system) == held
        assert _open_fds() == before + held  # one each; the refused one closed what it opened
        message = str(caught.value)
        assert message == (
            f"unable to open shared memory region 'r{held}' (key '/client'): Too many open "
            "files; unregister regions no longer used"
        )
        if held:
            with _limit(free):
                reg.unregister_system("r0")
                reg.register_system("again", "/client", 0, 64)  # its descriptor was given back
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
