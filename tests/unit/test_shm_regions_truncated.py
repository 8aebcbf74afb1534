"""A client may truncate its system region at any moment, between the front's size check and
its copy too (the copy waits for arena space, under load). Through a mapping, that copy read
past the object's end: SIGBUS, and the front died with every request in it. Regions are read
and written with pread/pwrite (runtime.ipc.file_slice): a short read is the request's error."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.ipc.file_slice import SliceTruncated
from server import shm_regions
from server.errors import InvalidInput
from server.request_shm import OutputRegions
from server.shm_regions import SharedMemoryRegistry
from server.types import InferRequest, ShmRef

PAGE = 4096


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SharedMemoryRegistry:
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    (tmp_path / "client").write_bytes(bytes(range(256)) * (4 * PAGE // 256))
    reg = SharedMemoryRegistry(True)
    reg.register_system("in", "/client", PAGE, 2 * PAGE)
    return reg


def test_an_input_truncated_after_its_check_fails_the_request_not_the_front(
    registry: SharedMemoryRegistry, tmp_path: Path
) -> None:
    region = registry.view(ShmRef("in", 0, 2 * PAGE), "INPUT0")  # checked: intact
    arena = memoryview(bytearray(2 * PAGE))
    region.readinto(arena)
    assert bytes(arena[:4]) == bytes(range(4))
    os.truncate(tmp_path / "client", PAGE + 10)  # the client shrinks it now
    with pytest.raises(SliceTruncated) as caught:
        region.readinto(arena)
    assert str(caught.value) == (
        "shared memory region 'in' (key '/client') has shrunk since it was registered; "
        "unregister it and register it again"
    )


def test_an_output_written_to_a_truncated_region_does_not_kill_the_front(
    registry: SharedMemoryRegistry, tmp_path: Path
) -> None:
    region = registry.view(ShmRef("in", 16, 64), "OUTPUT0")
    os.truncate(tmp_path / "client", 0)
    region.write(b"\x07" * 64)  # (through a mapping: SIGBUS)
    with open(tmp_path / "client", "rb") as f:
        f.seek(PAGE + 16)
        assert f.read(64) == b"\x07" * 64


def test_a_region_unregistered_mid_request_keeps_its_descriptor_until_the_request_ends(
    registry: SharedMemoryRegistry,
) -> None:
    region = registry.view(ShmRef("in", 0, 8), "INPUT0")
    before = len(os.listdir("/proc/self/fd"))
    registry.unregister_system("in")
    assert region.read() == bytes(range(8))  # still the client's object, never a reused fd
    del region
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_output_regions_are_resolved_before_the_request_runs_and_held(
    registry: SharedMemoryRegistry, tmp_path: Path
) -> None:
    """A region unregistered while its request runs still takes the request's outputs (as in
    Triton: the request succeeds); one unknown before it runs fails it before it runs."""
    req = InferRequest("m", "", "", (), (), {}, output_shm={"OUT": ShmRef("in", 8, 16)})
    outs = OutputRegions(registry, req)
    registry.unregister_system("in")
    sink = outs.sink("OUT", 16)
    assert sink is not None
    sink.write(b"\x05" * 16)
    with open(tmp_path / "client", "rb") as f:
        f.seek(PAGE + 8)
        assert f.read(16) == b"\x05" * 16
    assert outs.sink("OUT", 17) is None  # too large: response_tensor gives the error
    with pytest.raises(InvalidInput, match="unregistered shared memory region 'in'"):
        OutputRegions(registry, req)
