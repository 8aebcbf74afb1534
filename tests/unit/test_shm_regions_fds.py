"""Client system regions hold one descriptor each in the front (to check their size before each
use). A front at its descriptor limit refuses the next registration with RESOURCE_EXHAUSTED
(Overloaded) naming the cause, not INVALID_ARGUMENT as if the client's key were wrong; once
regions are unregistered, registering works again."""

from __future__ import annotations

import os
import resource
from pathlib import Path

import pytest

from server import shm_regions
from server.errors import Overloaded
from server.shm_regions import SharedMemoryRegistry


def test_registration_at_the_descriptor_limit_is_resource_exhausted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    (tmp_path / "client").write_bytes(b"\0" * 4096)
    reg = SharedMemoryRegistry(True)
    try:
        with _limit():
            with pytest.raises(Overloaded) as caught:
                for i in range(64):
                    reg.register_system(f"r{i}", "/client", 0, 64)
            held = len(reg.system)
            assert 0 < held < 64
            reg.unregister_system("r0")
            reg.register_system("again", "/client", 0, 64)  # its descriptor was given back
        message = str(caught.value)
        assert message.startswith("unable to open shared memory region 'r")
        assert "(key '/client'): Too many open files; unregister regions no longer used" in message
    finally:
        reg.close()


class _limit:
    """RLIMIT_NOFILE a few descriptors above what the process has open, for the block."""

    def __enter__(self) -> None:
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        in_use = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 4, self.hard))

    def __exit__(self, *exc: object) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft, self.hard))
