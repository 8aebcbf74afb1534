"""Client system shared memory in a full /dev/shm. A client's object is usually sparse (shm_open
and ftruncate): writing an output into a hole of a full /dev/shm would kill the front with
SIGBUS. Registration allocates the region's pages, and refuses a region without room with
RESOURCE_EXHAUSTED (Overloaded); nothing is registered then."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from small_tmpfs import small_tmpfs

from server import shm_regions
from server.errors import Overloaded
from server.shm_regions import SharedMemoryRegistry

MIB = 1 << 20


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "shm", 8) as d:
        monkeypatch.setattr(shm_regions, "_SHM_DIR", d)
        yield d


def sparse(path: Path, size: int) -> None:
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def test_a_region_without_room_is_refused_and_one_with_room_is_reserved(shm_dir: Path) -> None:
    sparse(shm_dir / "client", 16 * MIB)  # twice what the 8 MiB /dev/shm can hold
    reg = SharedMemoryRegistry(True)
    with pytest.raises(
        Overloaded,
        match=r"^shared memory region 'out' \(key '/client'\): /dev/shm has no room for its "
        r"16777216 bytes$",
    ):
        reg.register_system("out", "/client", 0, 16 * MIB)
    assert reg.system_status("") == []
    reg.register_system("part", "/client", 4 * MIB, 4 * MIB)  # fits: taken now
    assert os.stat(shm_dir / "client").st_blocks * 512 >= 4 * MIB
    reg.system["part"].slice(0, 4 * MIB).write(b"\x01" * (4 * MIB))  # an output, written whole
    reg.close()
