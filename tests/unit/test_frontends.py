"""How many front processes `--frontends 0` starts (server.supervisor): one per two CPUs the
process may use, cgroup CPU quota (a Kubernetes CPU limit) included, at most 4."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server.settings import Settings
from server.supervisor import frontends_for, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    (root / "cpu.max").write_text(cpu_max + "\n")
    return root


def cgroup_v1(root: Path, quota: str, period: str = "100000") -> Path:
    (root / "cpu").mkdir()
    (root / "cpu" / "cpu.cfs_quota_us").write_text(quota + "\n")
    (root / "cpu" / "cpu.cfs_period_us").write_text(period + "\n")
    return root


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000", AFFINITY),
        ("100000 100000", 1),
        ("150000 100000", min(2, AFFINITY)),  # 1.5 CPUs keep two threads busy
        ("50000 100000", 1),  # never below one
        ("800000 100000", min(8, AFFINITY)),  # never above the affinity
    ],
)
def test_cgroup_v2_quota(tmp_path: Path, cpu_max: str, expected: int) -> None:
    assert usable_cpus(cgroup_v2(tmp_path, cpu_max)) == expected


@pytest.mark.parametrize(
    ("quota", "expected"), [("-1", AFFINITY), ("200000", min(2, AFFINITY)), ("0", 1)]
)
def test_cgroup_v1_quota(tmp_path: Path, quota: str, expected: int) -> None:
    assert usable_cpus(cgroup_v1(tmp_path, quota)) == expected


@pytest.mark.parametrize("content", ["", "garbage", "100000 0"])
def test_an_unreadable_quota_leaves_the_affinity(tmp_path: Path, content: str) -> None:
    assert usable_cpus(cgroup_v2(tmp_path, content)) == AFFINITY


def test_no_cgroup_files_leaves_the_affinity(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path) == AFFINITY


@pytest.mark.parametrize(("cpus", "fronts"), [(1, 1), (2, 1), (3, 1), (4, 2), (8, 4), (64, 4)])
def test_one_front_per_two_cpus_at_most_four(cpus: int, fronts: int) -> None:
    assert frontends_for(Settings(), cpus) == fronts


def test_an_explicit_count_wins() -> None:
    assert frontends_for(Settings(frontends=3), 64) == 3
