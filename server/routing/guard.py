"""The canary guard: a sliding window of per-second counters per version, and the rollback
decision over it. Pure; time is injected (``now`` in seconds, monotonic). May import:
routing.table.

Memory is bounded by the window, not by traffic: each version keeps at most ``window_s``
one-second buckets, each holding ok and error counts and a latency histogram. The histogram
has fixed log buckets, four per octave from 50 us (bucket ``i`` covers
``[50us * 2**(i/4), 50us * 2**((i+1)/4))``, the first also everything below, the last
everything above ~14 min); p95 is the geometric middle of the bucket holding the 95th
percentile sample, so it is within ~9% of the true value, and a ratio between two versions'
p95 carries at most one bucket (19%) of error. Latency is recorded for successful requests only
(a fast failure must not make a version look quick); errors count in the error rate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server.routing.table import GuardConfig

__all__ = [
    "Decision",
    "GuardState",
    "SecondCounts",
    "WindowStats",
    "evaluate",
    "latency_bucket",
    "observe",
    "window_stats",
]

HIST_MIN_S = 50e-6
HIST_STEPS_PER_OCTAVE = 4
HIST_BUCKETS = 96
_ZERO_HIST = (0,) * HIST_BUCKETS


def latency_bucket(latency_s: float) -> int:
    """The histogram bucket of one latency (see the module docstring)."""
    if not latency_s > HIST_MIN_S:  # also NaN
        return 0
    i = int(math.log2(latency_s / HIST_MIN_S) * HIST_STEPS_PER_OCTAVE)
    return min(i, HIST_BUCKETS - 1)


def _bucket_value(i: int) -> float:
    return HIST_MIN_S * math.pow(2.0, (i + 0.5) / HIST_STEPS_PER_OCTAVE)


@dataclass(frozen=True, slots=True)
class SecondCounts:
    """What one version did in one second: ``latency`` is the histogram of its ok requests."""

    second: int
    ok: int
    errors: int
    latency: tuple[int, ...]

    def add(self, latency_s: float, ok: bool) -> SecondCounts:
        if not ok:
            return SecondCounts(self.second, self.ok, self.errors + 1, self.latency)
        i = latency_bucket(latency_s)
        hist = (*self.latency[:i], self.latency[i] + 1, *self.latency[i + 1 :])
        return SecondCounts(self.second, self.ok + 1, self.errors, hist)


@dataclass(frozen=True, slots=True)
class GuardState:
    """Per version, the seconds with samples in the last ``window_s`` seconds, oldest first.
    Start one with ``GuardState.for_config(config)``, and start a fresh one after a rollback
    or when the table's stable or canary version changes."""

    window_s: int
    seconds: Mapping[int, tuple[SecondCounts, ...]] = field(
        default_factory=lambda: MappingProxyType({})
    )

    @classmethod
    def for_config(cls, config: GuardConfig) -> GuardState:
        return cls(config.window_s)


@dataclass(frozen=True, slots=True)
class WindowStats:
    total: int
    errors: int
    error_rate: float  # errors / total; 0.0 when total == 0
    p95_s: float | None  # None without successful requests


@dataclass(frozen=True, slots=True)
class Decision:
    rollback: bool
    reason: str
    canary: WindowStats
    stable: WindowStats


def observe(state: GuardState, version: int, now: float, latency_s: float, ok: bool) -> GuardState:
    """``state`` with one finished request of ``version`` counted at time ``now``. Buckets
    that left the window are dropped (for every version). A ``now`` earlier than the newest
    bucket (a clock that stepped back) counts in the newest bucket."""
    second = math.floor(now)
    cutoff = second - state.window_s  # buckets at or before it have left the window
    secs = state.seconds.get(version, ())
    if secs and secs[-1].second >= second:
        secs = (*secs[:-1], secs[-1].add(latency_s, ok))
    else:
        secs = (*secs, SecondCounts(second, 0, 0, _ZERO_HIST).add(latency_s, ok))
    updated = {v: s for v, s in state.seconds.items() if v != version}
    updated[version] = secs
    kept = {v: _trim(s, cutoff) for v, s in updated.items()}
    return GuardState(state.window_s, MappingProxyType({v: s for v, s in kept.items() if s}))


def window_stats(
    state: GuardState, version: int, now: float, window_s: int | None = None
) -> WindowStats:
    """Counts of ``version`` over the ``window_s`` seconds (default: the state's) ending at
    ``now``: the second ``floor(now)`` and the ``window_s - 1`` before it."""
    cutoff = math.floor(now) - (state.window_s if window_s is None else window_s)
    ok = errors = 0
    hist = [0] * HIST_BUCKETS
    for sc in state.seconds.get(version, ()):
        if sc.second <= cutoff:
            continue
        ok += sc.ok
        errors += sc.errors
        for i, n in enumerate(sc.latency):
            hist[i] += n
    total = ok + errors
    return WindowStats(total, errors, errors / total if total else 0.0, _p95(hist, ok))


def evaluate(
    state: GuardState,
    config: GuardConfig,
    stable_version: int,
    canary_version: int,
    now: float,
) -> Decision:
    """Roll back when, with at least ``min_samples`` requests on both versions, the canary's
    error rate exceeds stable's by more than ``max_error_rate_delta``, or (with at least
    ``min_samples`` successful requests on both) its p95 latency exceeds stable's times
    ``max_p95_ratio``. The reason says which, with the numbers, for the log and the index."""
    w = config.window_s
    c = window_stats(state, canary_version, now, w)
    s = window_stats(state, stable_version, now, w)
    if canary_version == stable_version:
        return Decision(False, "canary and stable are the same version", c, s)
    need = config.min_samples
    if c.total < need or s.total < need:
        return Decision(
            False,
            f"waiting for samples: canary {c.total}, stable {s.total}, need {need} each in {w} s",
            c,
            s,
        )
    if c.error_rate - s.error_rate > config.max_error_rate_delta:
        return Decision(
            True,
            f"canary version {canary_version} error rate {c.error_rate:.2%} exceeds stable "
            f"version {stable_version}'s {s.error_rate:.2%} by more than "
            f"{config.max_error_rate_delta:.2%} ({c.total} and {s.total} requests in {w} s)",
            c,
            s,
        )
    enough_ok = c.total - c.errors >= need and s.total - s.errors >= need
    if (
        enough_ok
        and c.p95_s is not None
        and s.p95_s is not None
        and c.p95_s > s.p95_s * config.max_p95_ratio
    ):
        return Decision(
            True,
            f"canary version {canary_version} p95 latency {c.p95_s * 1e3:.3g} ms exceeds "
            f"stable version {stable_version}'s {s.p95_s * 1e3:.3g} ms x "
            f"{config.max_p95_ratio:g} ({c.total} and {s.total} requests in {w} s)",
            c,
            s,
        )
    return Decision(False, "canary within limits", c, s)


def _trim(secs: tuple[SecondCounts, ...], cutoff: int) -> tuple[SecondCounts, ...]:
    start = 0
    while start < len(secs) and secs[start].second <= cutoff:
        start += 1
    return secs[start:] if start else secs


def _p95(hist: list[int], count: int) -> float | None:
    if count == 0:
        return None
    rank = math.ceil(0.95 * count)  # the 95th percentile is the rank-th smallest sample
    seen = 0
    for i, n in enumerate(hist):
        seen += n
        if seen >= rank:
            return _bucket_value(i)
    raise AssertionError("unreachable: the histogram holds count samples")  # pragma: no cover
