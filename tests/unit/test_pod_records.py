"""Record identities of the pod (server.pod_records) on a kernel whose file clock is coarse.

A front tells a record's writes apart by (inode, mtime). Before Linux 6.13 the kernel stamps
files from a clock that moves once per jiffy, and ext4 or xfs give a new file the inode number
the last removed one had: without more, two writes of one name in one tick look alike, and a
front keeps what it took from the first. `coarse_clock` makes every stat here report mtimes on
such a clock (ticks of an hour, so every write of a test falls in one); the tests then show
that the writer's own stamp tells the writes apart. (Where the filesystem of the temp directory
never reuses inode numbers, tmpfs for one, the case cannot arise and these pass either way.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.pod_records import Watch, replace_file
from server.shm_directory import RegionDirectory
from server.shm_regions import SharedMemoryRegistry
from server.types import ShmRef

TICK_NS = 3600 * 1_000_000_000
_HIDDEN = ("st_atime", "st_mtime", "st_ctime", "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
           "st_blksize", "st_blocks", "st_rdev")  # fmt: skip


def _coarse(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
    def stat(*args: Any, **kwargs: Any) -> os.stat_result:
        st = real(*args, **kwargs)
        hidden = {f: getattr(st, f) for f in _HIDDEN}
        hidden["st_mtime_ns"] = st.st_mtime_ns // TICK_NS * TICK_NS
        return os.stat_result(tuple(st), hidden)

    return stat


@pytest.fixture
def coarse_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "stat", _coarse(os.stat))
    monkeypatch.setattr(os, "fstat", _coarse(os.fstat))


@pytest.mark.usefixtures("coarse_clock")
def test_a_replaced_record_is_seen_however_coarse_the_clock(tmp_path: Path) -> None:
    """Written, taken, replaced twice: the third write's file may get the first one's inode
    number back (the second write's rename freed it); it is still a change."""
    watch = Watch(tmp_path, "t-")
    path = watch.path("k")
    first = replace_file(path, b"1")
    watch.take(path, first)
    replace_file(path, b"2")
    third = replace_file(path, b"3")
    assert watch.changed() == [(path, third)]
    assert third != first


@pytest.mark.usefixtures("coarse_clock")
def test_a_region_registered_again_within_one_tick_is_followed(tmp_path: Path) -> None:
    """perf_analyzer and restarted clients unregister and register a name at once: a front
    that mapped the old registration must map the new one, not read the client's old object."""
    keys = []
    for tag, data in (("old", b"old!"), ("new", b"new!")):
        keys.append(f"/mt-test-{os.getpid()}-records-{tag}")
        Path("/dev/shm", keys[-1][1:]).write_bytes(data)
    a = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    b = SharedMemoryRegistry(True, RegionDirectory(tmp_path))
    try:
        a.register_system("in", keys[0], 0, 4)
        assert bytes(b.view(ShmRef("in", 0, 4), "INPUT0")) == b"old!"
        a.unregister_system("in")
        a.register_system("in", keys[1], 0, 4)
        assert bytes(b.view(ShmRef("in", 0, 4), "INPUT0")) == b"new!"
    finally:
        a.close()
        b.close()
        for key in keys:
            Path("/dev/shm", key[1:]).unlink(missing_ok=True)


def test_an_idle_directory_is_not_scanned_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each front globbed and stated every file of the pod's directory four times a second,
    changed or not: idle CPU and latency grew with the files. While the directory's mtime
    stays (and the last scan began well after it), what was listed stands; a write is seen."""
    watch = Watch(tmp_path, "t-")
    replace_file(watch.path("a"), b"1")
    for name in range(50):
        replace_file(tmp_path / f"other-{name}", b"x")
    old = 1_000_000_000_000_000_000  # long before this scan: settled
    os.utime(tmp_path, ns=(old, old))
    assert [p for p, _ in watch.changed()] == [watch.path("a")]  # not taken: listed again
    globs = []
    real_glob = Path.glob
    monkeypatch.setattr(
        Path, "glob", lambda self, pattern: globs.append(pattern) or real_glob(self, pattern)
    )
    assert [p for p, _ in watch.changed()] == [watch.path("a")]
    assert globs == []
    b = replace_file(watch.path("b"), b"2")
    assert (watch.path("b"), b) in watch.changed()
    assert globs == ["t-*"]


def test_a_write_in_the_tick_of_the_last_scan_is_seen(tmp_path: Path) -> None:
    """The kernel may stamp the directory from a clock that ticks once per jiffy: a write just
    after a scan can leave the mtime that scan saw."""
    watch = Watch(tmp_path, "t-")
    replace_file(watch.path("a"), b"1")
    mtime = os.stat(tmp_path).st_mtime_ns
    watch.changed()
    b = replace_file(watch.path("b"), b"2")
    os.utime(tmp_path, ns=(mtime, mtime))  # the same tick
    assert (watch.path("b"), b) in watch.changed()
