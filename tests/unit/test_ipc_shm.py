"""runtime.ipc.shm: the slot allocator (pure) and the POSIX shm arena (real files in /dev/shm)."""

from __future__ import annotations

import mmap
import os
import random
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule
from small_tmpfs import small_tmpfs

from runtime.ipc import shm
from runtime.ipc.shm import (
    ALIGN,
    PREFIX,
    Arena,
    ArenaNoSpace,
    Lease,
    SlotPool,
    align_up,
    arena_name,
    process_start,
    remove_stale_arenas,
)

PAGE = mmap.PAGESIZE
SHM = Path("/dev/shm")

# ----------------------------------------------------------------------------- helpers


@pytest.mark.parametrize(
    ("n", "a", "want"),
    [(0, ALIGN, 0), (1, ALIGN, 64), (63, ALIGN, 64), (64, ALIGN, 64), (65, ALIGN, 128),
     (1, 4096, 4096), (4097, 4096, 8192)],
)  # fmt: skip
def test_align_up(n: int, a: int, want: int) -> None:
    assert align_up(n, a) == want


def test_arena_name_format() -> None:
    assert arena_name(1234, 2) == f"/{PREFIX}1234-2" == "/microtune-1234-2"


# ----------------------------------------------------------------------------- SlotPool


@pytest.mark.parametrize("slot_bytes", [0, -PAGE, 1, 1000, PAGE - 1, PAGE + 1, 3 * PAGE // 2])
def test_slot_size_must_be_a_page_multiple(slot_bytes: int) -> None:
    with pytest.raises(ValueError, match="slot size must be a multiple of the page size"):
        SlotPool(slot_bytes, 4)


@pytest.mark.parametrize("slot_bytes", [PAGE, 2 * PAGE, 16 * PAGE])
def test_page_multiples_are_accepted(slot_bytes: int) -> None:
    pool = SlotPool(slot_bytes, 3)
    assert pool.capacity == 3 * slot_bytes
    assert pool.in_use == 0


@pytest.mark.parametrize(
    ("nbytes", "slots"),
    [(0, 1), (1, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 2), (3 * PAGE, 3), (3 * PAGE + 1, 4)],
)
def test_slots_for(nbytes: int, slots: int) -> None:
    assert SlotPool(PAGE, 8).slots_for(nbytes) == slots


def test_lease_is_a_contiguous_run_at_slot_offsets() -> None:
    pool = SlotPool(PAGE, 8)
    a = pool.try_lease(1)
    b = pool.try_lease(2 * PAGE + 1)  # 3 slots
    c = pool.try_lease(PAGE)
    assert a == Lease(first_slot=0, slots=1, offset=0, size=PAGE)
    assert b == Lease(first_slot=1, slots=3, offset=PAGE, size=3 * PAGE)
    assert c == Lease(first_slot=4, slots=1, offset=4 * PAGE, size=PAGE)
    assert pool.in_use == 5
    pool.release(b)
    assert pool.in_use == 2


def test_exhaustion_returns_none() -> None:
    pool = SlotPool(PAGE, 4)
    leases = [pool.try_lease(PAGE) for _ in range(4)]
    assert all(leases)
    assert pool.try_lease(1) is None
    assert pool.in_use == 4
    pool.release(leases[2])  # type: ignore[arg-type]
    again = pool.try_lease(1)
    assert again is not None and again.first_slot == 2


def test_larger_than_the_pool_returns_none() -> None:
    pool = SlotPool(PAGE, 4)
    assert pool.try_lease(4 * PAGE + 1) is None
    assert pool.try_lease(4 * PAGE) == Lease(0, 4, 0, 4 * PAGE)


def test_fragmentation_needs_a_contiguous_run() -> None:
    pool = SlotPool(PAGE, 4)
    a, b, c, d = (pool.try_lease(1) for _ in range(4))
    pool.release(a)  # type: ignore[arg-type]
    pool.release(c)  # type: ignore[arg-type]
    assert pool.in_use == 2
    assert pool.try_lease(2 * PAGE) is None  # two slots free, but not adjacent
    pool.release(b)  # type: ignore[arg-type]
    run = pool.try_lease(3 * PAGE)
    assert run == Lease(0, 3, 0, 3 * PAGE)
    assert d is not None


def test_hint_rotates_and_wraps_around() -> None:
    pool = SlotPool(PAGE, 4)
    a = pool.try_lease(1)
    assert a is not None and a.first_slot == 0
    pool.release(a)
    b = pool.try_lease(1)
    assert b is not None and b.first_slot == 1  # spread over the arena, not slot 0 again
    c = pool.try_lease(2 * PAGE)
    assert c is not None and c.first_slot == 2
    # hint is now 0 (wrapped); slot 0 is free
    d = pool.try_lease(1)
    assert d is not None and d.first_slot == 0
    pool.release(b)
    pool.release(d)
    # hint at 1: a run of 2 from slot 0 or 1 is free ([0, 1] free, [2, 3] leased)
    e = pool.try_lease(2 * PAGE)
    assert e is not None and e.first_slot == 0


def test_run_that_does_not_fit_after_the_hint_is_found_before_it() -> None:
    pool = SlotPool(PAGE, 6)
    x = pool.try_lease(4 * PAGE)  # slots 0-3, hint -> 4
    assert x is not None
    pool.release(x)
    y = pool.try_lease(3 * PAGE)  # only slots 4-5 after the hint: search from 0
    assert y == Lease(0, 3, 0, 3 * PAGE)


@pytest.mark.parametrize("first_release", ["same", "copy"])
def test_double_release_raises(first_release: str) -> None:
    pool = SlotPool(PAGE, 4)
    lease = pool.try_lease(2 * PAGE)
    assert lease is not None
    pool.release(lease)
    again = lease if first_release == "same" else Lease(0, 2, 0, 2 * PAGE)
    with pytest.raises(RuntimeError, match=r"double release of slots 0\+2"):
        pool.release(again)
    assert pool.in_use == 0


def test_release_of_a_partly_free_run_raises() -> None:
    pool = SlotPool(PAGE, 4)
    a = pool.try_lease(1)
    assert a is not None
    with pytest.raises(RuntimeError, match="double release"):
        pool.release(Lease(0, 2, 0, 2 * PAGE))
    assert pool.in_use == 1  # nothing was freed


def _overlap(a: Lease, b: Lease) -> bool:
    return a.first_slot < b.first_slot + b.slots and b.first_slot < a.first_slot + a.slots


def _has_free_run(free: list[bool], k: int) -> bool:
    return any(all(free[i : i + k]) for i in range(len(free) - k + 1))


def test_random_sequence_never_overlaps() -> None:
    rng = random.Random(1234)
    pool = SlotPool(PAGE, 32)
    live: list[Lease] = []
    for _ in range(3000):
        if live and rng.random() < 0.45:
            pool.release(live.pop(rng.randrange(len(live))))
        else:
            nbytes = rng.randint(0, 6 * PAGE)
            lease = pool.try_lease(nbytes)
            free = [True] * pool.slots
            for x in live:
                for s in range(x.first_slot, x.first_slot + x.slots):
                    free[s] = False
            k = pool.slots_for(nbytes)
            if lease is None:
                assert not _has_free_run(free, k)
                continue
            assert lease.slots == k and lease.size >= nbytes
            assert all(free[lease.first_slot : lease.first_slot + k])
            live.append(lease)
        assert pool.in_use == sum(x.slots for x in live)
    for x in live:
        pool.release(x)
    assert pool.in_use == 0


class SlotPoolMachine(RuleBasedStateMachine):
    """Model-based check: the pool agrees with a list of free flags."""

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.pool = SlotPool(PAGE, 16)
        self.free = [True] * 16
        self.live: list[Lease] = []

    @rule(target=leases, nbytes=st.integers(0, 17 * PAGE))
    def lease(self, nbytes: int) -> Lease | None:
        lease = self.pool.try_lease(nbytes)
        k = max(1, -(-nbytes // PAGE))
        if lease is None:
            assert not _has_free_run(self.free, k)
            return None
        assert lease.slots == k
        assert lease.offset == lease.first_slot * PAGE and lease.size == k * PAGE
        span = range(lease.first_slot, lease.first_slot + k)
        assert all(self.free[i] for i in span)
        for i in span:
            self.free[i] = False
        self.live.append(lease)
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease: Lease | None) -> None:
        if lease is None:
            return
        self.pool.release(lease)
        self.live.remove(lease)
        for i in range(lease.first_slot, lease.first_slot + lease.slots):
            self.free[i] = True

    @rule()
    def double_release_raises(self) -> None:
        gone = Lease(0, 16, 0, 16 * PAGE)
        if all(self.free):
            with pytest.raises(RuntimeError):
                self.pool.release(gone)

    @invariant()
    def no_overlap_and_accounting(self) -> None:
        for i, a in enumerate(self.live):
            assert a.first_slot >= 0 and a.first_slot + a.slots <= 16
            for b in self.live[i + 1 :]:
                assert not _overlap(a, b)
        assert self.pool.in_use == sum(x.slots for x in self.live) == self.free.count(False)


TestSlotPoolMachine = SlotPoolMachine.TestCase
TestSlotPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)


# ----------------------------------------------------------------------------- Arena


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A unique name that remove_stale_arenas never matches; the file is removed afterwards."""
    name = f"/microtune_test-{os.getpid()}-{uuid.uuid4().hex}"
    yield name
    (SHM / name[1:]).unlink(missing_ok=True)


@pytest.mark.parametrize("bad", ["no-slash", "/a/b", "", "a/b"])
def test_bad_names_are_rejected(bad: str) -> None:
    with pytest.raises(ValueError, match="bad shm name"):
        Arena(bad, PAGE, create=True)


def test_create_attach_share_and_unlink(shm_name: str) -> None:
    size = 4 * PAGE
    a = Arena(shm_name, size, create=True)
    path = SHM / shm_name[1:]
    assert path.exists()
    assert path.stat().st_size == size
    assert path.stat().st_mode & 0o077 == 0  # private to the user
    b = Arena(shm_name, size, create=False)
    try:
        assert len(a.buf) == len(b.buf) == size
        a.buf[100:105] = b"hello"
        assert bytes(b.buf[100:105]) == b"hello"
        b.buf[size - 3 :] = b"end"
        assert bytes(a.buf[size - 3 :]) == b"end"
        a.unlink()
        assert not path.exists()
        a.unlink()  # idempotent
        # mappings outlive the name
        a.buf[0:2] = b"ok"
        assert bytes(b.buf[0:2]) == b"ok"
    finally:
        a.close()
        b.close()


def test_attach_smaller_size_is_fine_larger_is_not(shm_name: str) -> None:
    a = Arena(shm_name, 2 * PAGE, create=True)
    try:
        small = Arena(shm_name, PAGE, create=False)
        assert len(small.buf) == PAGE
        small.close()
        with pytest.raises(ValueError, match=f"shm {shm_name} is smaller than {4 * PAGE} bytes"):
            Arena(shm_name, 4 * PAGE, create=False)
    finally:
        a.unlink()
        a.close()


def test_create_is_exclusive_and_attach_needs_existing(shm_name: str) -> None:
    with pytest.raises(FileNotFoundError):
        Arena(shm_name, PAGE, create=False)
    a = Arena(shm_name, PAGE, create=True)
    try:
        with pytest.raises(FileExistsError):
            Arena(shm_name, PAGE, create=True)
    finally:
        a.unlink()
        a.close()


def test_close_with_an_exported_view_does_not_raise(shm_name: str) -> None:
    a = Arena(shm_name, PAGE, create=True)
    a.unlink()
    view = a.buf[0:8]
    a.close()  # a view is still exported: close is deferred, no error
    view[0:3] = b"abc"
    assert bytes(view[0:3]) == b"abc"
    view.release()
    a.close()
    assert a._mmap.closed


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    pid = proc.pid
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_remove_stale_arenas_removes_dead_owner_keeps_live_and_foreign() -> None:
    dead = arena_name(_dead_pid(), 0)
    live = arena_name(os.getpid(), 900_000 + random.randrange(99_999))
    foreign = f"/{PREFIX}notapid-{uuid.uuid4().hex}"
    arenas = [Arena(n, PAGE, create=True) for n in (dead, live, foreign)]
    try:
        removed = remove_stale_arenas()
        assert dead[1:] in removed
        assert live[1:] not in removed and foreign[1:] not in removed
        assert not (SHM / dead[1:]).exists()
        assert (SHM / live[1:]).exists()
        assert (SHM / foreign[1:]).exists()
        assert dead[1:] not in remove_stale_arenas()
    finally:
        for arena in arenas:
            arena.unlink()
            arena.close()


def test_an_arena_older_than_its_live_owner_is_a_previous_incarnations() -> None:
    """A container restarted with its /dev/shm volume runs its processes under the same pids
    again: an arena named after a live pid but made before that process started is a
    leftover (it looked alive for ever, 64 MiB more in the volume at every restart)."""
    old = arena_name(os.getpid(), 900_000 + random.randrange(99_999))
    new = arena_name(os.getpid(), 900_000 + random.randrange(99_999))
    arenas = [Arena(n, PAGE, create=True) for n in (old, new)]
    try:
        started = process_start(os.getpid())
        assert started is not None
        before_us = started - 3600
        os.utime(SHM / old[1:], (before_us, before_us))
        removed = remove_stale_arenas()
        assert old[1:] in removed and new[1:] not in removed
        assert (SHM / new[1:]).exists()
    finally:
        for arena in arenas:
            arena.unlink()
            arena.close()


@pytest.fixture
def small_shm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An 8 MiB tmpfs standing in for /dev/shm."""
    with small_tmpfs(tmp_path / "shm", 8) as d:
        monkeypatch.setattr(shm, "_SHM_DIR", d)
        yield d


def test_an_arena_is_reserved_or_refused_at_creation(small_shm: Path) -> None:
    with pytest.raises(
        ArenaNoSpace, match=r"needs 16 MiB in .*, which has 8 MiB free: .*--shm-size"
    ):
        Arena("/microtune-test-big", 16 << 20, create=True)
    assert list(small_shm.iterdir()) == []  # nothing left of the refused one
    a = Arena("/microtune-test-fits", 6 << 20, create=True)
    try:
        st = os.stat(small_shm / "microtune-test-fits")
        assert st.st_blocks * 512 >= 6 << 20  # its pages are taken now, not at first write
        with pytest.raises(ArenaNoSpace, match=r"2 arenas \(one per front\) need 8 MiB"):
            shm.require_space(4 << 20, 2)  # 2 MiB are left
        shm.require_space(1 << 20, 2)
    finally:
        a.unlink()
        a.close()
