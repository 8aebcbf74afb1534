"""Client shared-memory registrations shared by several fronts (server.shm_directory).

Two SharedMemoryRegistry objects over one directory stand for two front processes: what one
registers the other uses, lists and unregisters; a name is claimed once in the pod; a front
that mapped a region lets go of it once another front unregistered it, and follows a new
registration under the same name. The regions are real POSIX shm objects.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.errors import AlreadyExists, InvalidInput, NotFound
from server.shm_directory import RegionDirectory, RegionRecord
from server.shm_regions import CudaRegion, SharedMemoryRegistry
from server.types import ShmRef

SHM = Path("/dev/shm")


class Client:
    """A client's POSIX shm objects, removed at the end."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    def region(self, tag: str, data: bytes) -> str:
        key = f"/mt-test-{os.getpid()}-{tag}"
        (SHM / key[1:]).write_bytes(data)
        self.keys.append(key)
        return key

    def close(self) -> None:
        for key in self.keys:
            (SHM / key[1:]).unlink(missing_ok=True)


@pytest.fixture
def client() -> Iterator[Client]:
    c = Client()
    yield c
    c.close()


@pytest.fixture
def fronts(tmp_path: Path) -> Iterator[tuple[SharedMemoryRegistry, SharedMemoryRegistry]]:
    a = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    b = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    yield a, b
    a.close()
    b.close()


def read(reg: SharedMemoryRegistry, name: str, n: int) -> bytes:
    return bytes(reg.view(ShmRef(name, 0, n), "INPUT0"))


def test_a_region_registered_on_one_front_is_used_on_the_other(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    a, b = fronts
    key = client.region("in", b"0123456789abcdef")
    a.register_system("in", key, 4, 8)
    assert read(b, "in", 8) == b"456789ab"
    b.view(ShmRef("in", 0, 8), "OUT").write(b"ABCDEFGH")  # outputs are written the same way
    assert read(a, "in", 8) == b"ABCDEFGH"
    assert [(r.name, r.key, r.offset, r.byte_size) for r in b.system_status("")] == [
        ("in", key, 4, 8)
    ]
    with pytest.raises(InvalidInput, match="outside shared memory region 'in'"):
        b.view(ShmRef("in", 4, 8), "INPUT0")


def test_a_name_is_claimed_once_in_the_pod(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    a, b = fronts
    key = client.region("in", bytes(64))
    a.register_system("r", key, 0, 64)
    with pytest.raises(AlreadyExists, match="shared memory region 'r' already in manager"):
        b.register_system("r", key, 0, 64)
    with pytest.raises(AlreadyExists, match="shared memory region 'r' already in manager"):
        b.check_cuda("r", 0)
    assert "r" not in b.system  # the loser keeps no mapping


def test_concurrent_registrations_of_one_name_have_one_winner(
    tmp_path: Path, client: Client
) -> None:
    key = client.region("race", bytes(64))
    regs = [SharedMemoryRegistry(True, RegionDirectory(tmp_path)) for _ in range(8)]
    won: list[int] = []
    lost: list[BaseException] = []
    start = threading.Barrier(len(regs))

    def register(i: int) -> None:
        start.wait()
        try:
            regs[i].register_system("same", key, 0, 64)
            won.append(i)
        except BaseException as exc:
            lost.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(len(regs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    assert len(lost) == len(regs) - 1 and all(isinstance(e, AlreadyExists) for e in lost), lost
    for r in regs:
        r.close()


def test_unregister_on_one_front_reaches_the_other(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    a, b = fronts
    key = client.region("in", b"x" * 16)
    a.register_system("in", key, 0, 16)
    assert read(b, "in", 16) == b"x" * 16  # b maps it
    b.unregister_system("in")
    with pytest.raises(
        InvalidInput, match="tensor 'INPUT0' refers to unregistered shared memory region 'in'"
    ):
        read(a, "in", 16)
    with pytest.raises(NotFound, match="Unable to find system shared memory region: 'in'"):
        a.system_status("in")
    # The name is free again, and a new registration under it is followed, not the old mapping.
    key2 = client.region("in2", b"y" * 16)
    a.register_system("in", key2, 0, 16)
    assert read(b, "in", 16) == b"y" * 16


def test_a_front_lets_go_of_what_the_pod_unregistered(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    a, b = fronts
    key = client.region("in", bytes(16))
    a.register_system("in", key, 0, 16)
    read(b, "in", 16)
    a.unregister_system("")  # all of the pod's system regions
    assert "in" in b.system  # b has not looked since
    b.sweep()
    assert b.system == {}
    assert a.system_status("") == [] and b.system_status("") == []


def test_what_a_front_remembers_of_the_pod_stays_bounded(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    """A client that registers a new name per session: neither front keeps anything of the
    names once they are unregistered (whichever front unregistered them)."""
    a, b = fronts
    for i in range(50):
        key = client.region(f"s{i}", bytes(16))
        a.register_system(f"s{i}", key, 0, 16)
        read(b, f"s{i}", 16)
        (a if i % 2 else b).unregister_system(f"s{i}")
        a.add_cuda(CudaRegion(f"c{i}", 0, 64, b"h" * 64))
        assert b.cuda_to_adopt({f"c{i}"})
        b.adopt_cuda(*b.cuda_to_adopt({f"c{i}"})[0])
        assert (b if i % 2 else a).remove_cuda(f"c{i}") == [f"c{i}"]
    a.sweep()
    b.sweep()
    assert b.take_stale_cuda() == [f"c{i}" for i in range(0, 50, 2)]
    for reg in fronts:
        assert reg.system == {} and reg.cuda == {}
        assert reg._taken == {}  # what each local region was taken from: nothing left


def test_cuda_regions_are_adopted_and_released_per_front(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry],
) -> None:
    """The front keeps the pod's CUDA records; each front has the worker open a region for its
    own connection on first use (`cuda_to_adopt`), and close it once the pod dropped it."""
    a, b = fronts
    handle = b"h" * 64
    a.check_cuda("dev", 0)
    a.add_cuda(CudaRegion("dev", 0, 4096, handle))  # after the worker opened it for a
    assert a.cuda_to_adopt({"dev"}) == []  # a has it
    ((region, identity),) = b.cuda_to_adopt({"dev", "unknown"})
    assert region == CudaRegion("dev", 0, 4096, handle)
    b.adopt_cuda(region, identity)
    assert b.cuda_ref(ShmRef("dev", 0, 4096), "INPUT0") == region
    assert [(r.name, r.device_id, r.byte_size) for r in b.cuda_status("")] == [("dev", 0, 4096)]
    assert a.remove_cuda("dev") == ["dev"]  # a closes its own; b's is now stale
    assert b.cuda_ref(ShmRef("dev", 0, 16), "INPUT0") is None
    assert b.take_stale_cuda() == ["dev"]  # for b's worker connection to close
    assert b.take_stale_cuda() == []


def test_a_front_that_mapped_a_region_can_register_its_name_again(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    """b maps "in", a unregisters it; before b sweeps, a client re-registers "in" through b."""
    a, b = fronts
    key = client.region("in", b"1" * 8)
    a.register_system("in", key, 0, 8)
    read(b, "in", 8)
    a.unregister_system("in")
    key2 = client.region("in2", b"2" * 8)
    b.register_system("in", key2, 0, 8)
    assert read(a, "in", 8) == b"2" * 8


def test_unregister_of_one_kind_leaves_the_other_kind(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    """As in Triton, unregistering a system region by a CUDA region's name (or all system
    regions) leaves the CUDA region, and the other way round."""
    a, b = fronts
    a.register_system("sys", client.region("s", bytes(8)), 0, 8)
    a.check_cuda("dev", 0)
    a.add_cuda(CudaRegion("dev", 0, 64, b"h" * 64))
    b.unregister_system("dev")
    b.unregister_system("")
    assert [r.name for r in b.cuda_status("")] == ["dev"] and b.system_status("") == []
    a.register_system("sys", client.region("s2", bytes(8)), 0, 8)
    assert b.remove_cuda("sys") == [] and b.remove_cuda("") == []  # b opened none itself
    assert [r.name for r in a.system_status("")] == ["sys"] and a.cuda_status("") == []


def test_records_are_written_whole(tmp_path: Path) -> None:
    d = RegionDirectory(tmp_path)
    record = RegionRecord("a/b c", "system", 8, key="/k", offset=3)
    identity = d.claim(record)
    assert d.lookup("a/b c") == (record, identity)
    assert d.lookup("other") is None
    assert d.current("a/b c", identity)
    d.remove("a/b c")
    assert not d.current("a/b c", identity)
    assert list(tmp_path.iterdir()) == []  # no temporary file left either


def test_a_lone_front_keeps_its_regions_to_itself(client: Client) -> None:
    """Without a directory (one front) nothing is shared: the registry works as before."""
    key = client.region("in", bytes(8))
    a, b = SharedMemoryRegistry(True), SharedMemoryRegistry(True)
    a.register_system("in", key, 0, 8)
    with pytest.raises(InvalidInput, match="unregistered shared memory region 'in'"):
        b.view(ShmRef("in", 0, 8), "INPUT0")
    assert a.system["in"].fd is not None
    a.close()


def test_the_other_front_serves_the_object_registered_even_once_its_key_is_replaced(
    fronts: tuple[SharedMemoryRegistry, SharedMemoryRegistry], client: Client
) -> None:
    """The client unlinked the object it registered on front a and made a new one under the
    same key: front a read the object it opened, front b opened the key on first use and
    read the new one (the same request had two answers, depending on the connection), or
    failed once the key was only unlinked. Front b now opens the object through front a's
    descriptor (/proc/<pid>/fd/<n>), as Triton, which maps it at registration, serves it."""
    a, b = fronts
    key = client.region("swap", b"A" * 16)
    a.register_system("swap", key, 0, 16)
    (SHM / key[1:]).unlink()
    (SHM / key[1:]).write_bytes(b"B" * 16)
    assert read(a, "swap", 16) == b"A" * 16
    assert read(b, "swap", 16) == b"A" * 16


def test_without_the_registering_fronts_descriptor_a_replaced_key_is_refused(
    tmp_path: Path, client: Client
) -> None:
    """Front a gone (its descriptors with it): front b opens the key, finds another object
    there than the one registered, and refuses it rather than serve it."""
    a = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    b = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    try:
        key = client.region("gone", b"A" * 16)
        a.register_system("gone", key, 0, 16)
        a.close()  # (its records stay in the pod's directory, as a killed front's do)
        (SHM / key[1:]).unlink()
        (SHM / key[1:]).write_bytes(b"B" * 16)
        with pytest.raises(InvalidInput) as info:
            read(b, "gone", 16)
        assert str(info.value) == (
            f"shared memory region 'gone' (key '{key}') no longer names the object it was "
            "registered with (unlinked or replaced since); unregister it and register it again"
        )
    finally:
        b.close()
