"""The canary guard with injected time: sample thresholds, error and latency breaches, the
sliding window, bounded memory, the p95 estimate."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.routing import GuardConfig, GuardState, evaluate, observe
from server.routing.guard import latency_bucket, window_stats

CONFIG = GuardConfig(window_s=60, min_samples=100, max_error_rate_delta=0.05, max_p95_ratio=1.5)
STABLE, CANARY = 1, 2


def feed(
    state: GuardState,
    version: int,
    n: int,
    *,
    start: float = 0.0,
    per_s: int = 10,
    latency_s: float = 0.010,
    errors: int = 0,
) -> GuardState:
    """``n`` requests, ``per_s`` a second from ``start``, the first ``errors`` of them failed."""
    for i in range(n):
        state = observe(state, version, start + i / per_s, latency_s, ok=i >= errors)
    return state


def healthy_pair(canary_errors: int = 0, canary_latency_s: float = 0.010) -> GuardState:
    state = feed(GuardState.for_config(CONFIG), STABLE, 200, errors=2)
    return feed(state, CANARY, 200, errors=canary_errors, latency_s=canary_latency_s)


def test_no_decision_with_too_few_samples() -> None:
    state = feed(GuardState.for_config(CONFIG), STABLE, 500)
    state = feed(state, CANARY, 99, errors=99)  # every canary request failed, but only 99
    d = evaluate(state, CONFIG, STABLE, CANARY, now=10.0)
    assert not d.rollback
    assert d.reason == "waiting for samples: canary 99, stable 500, need 100 each in 60 s"
    assert d.canary.errors == 99 and d.canary.p95_s is None


def test_healthy_canary_is_left_alone() -> None:
    d = evaluate(healthy_pair(canary_errors=10), CONFIG, STABLE, CANARY, now=20.0)
    assert not d.rollback and d.reason == "canary within limits"
    assert d.stable.error_rate == pytest.approx(0.01) and d.canary.error_rate == pytest.approx(0.05)


def test_rollback_on_error_rate_breach() -> None:
    d = evaluate(healthy_pair(canary_errors=14), CONFIG, STABLE, CANARY, now=20.0)
    assert d.rollback
    assert d.reason == (
        "canary version 2 error rate 7.00% exceeds stable version 1's 1.00% by more than "
        "5.00% (200 and 200 requests in 60 s)"
    )


def test_rollback_on_latency_breach() -> None:
    d = evaluate(healthy_pair(canary_latency_s=0.030), CONFIG, STABLE, CANARY, now=20.0)
    assert d.rollback and "p95 latency" in d.reason and "x 1.5" in d.reason
    assert d.canary.p95_s is not None and d.stable.p95_s is not None
    assert d.canary.p95_s / d.stable.p95_s == pytest.approx(3.0, rel=0.2)


def test_latency_within_the_ratio_is_no_breach() -> None:
    d = evaluate(healthy_pair(canary_latency_s=0.012), CONFIG, STABLE, CANARY, now=20.0)
    assert not d.rollback


def test_latency_needs_min_samples_of_successes() -> None:
    # 100 requests each, but the canary's 40 successes are too few to compare p95 with.
    config = GuardConfig(min_samples=100, max_error_rate_delta=1.0)
    state = feed(GuardState.for_config(config), STABLE, 100)
    state = feed(state, CANARY, 100, errors=60, latency_s=1.0)
    assert not evaluate(state, config, STABLE, CANARY, now=10.0).rollback


def test_window_slides_as_injected_time_advances() -> None:
    config = GuardConfig(window_s=10, min_samples=50)
    state = feed(GuardState.for_config(config), STABLE, 100, per_s=20)  # t = 0 .. 4.95
    state = feed(state, CANARY, 100, per_s=20, errors=50)
    assert evaluate(state, config, STABLE, CANARY, now=5.0).rollback
    assert evaluate(state, config, STABLE, CANARY, now=9.9).rollback  # second 0 still inside
    later = evaluate(state, config, STABLE, CANARY, now=14.0)  # seconds 0..4 have left
    assert not later.rollback and later.canary.total < 50
    assert evaluate(state, config, STABLE, CANARY, now=15.0).canary.total == 0
    # New healthy traffic after the bad spell is judged on its own.
    state = feed(state, STABLE, 100, start=20.0, per_s=20)
    state = feed(state, CANARY, 100, start=20.0, per_s=20)
    d = evaluate(state, config, STABLE, CANARY, now=25.0)
    assert not d.rollback and d.canary.errors == 0
    assert all(sc.second >= 16 for secs in state.seconds.values() for sc in secs)


def test_memory_is_bounded_by_the_window_not_the_traffic() -> None:
    state = GuardState.for_config(GuardConfig(window_s=5))
    for i in range(5000):
        state = observe(state, STABLE, i / 10, 0.01, ok=True)
    assert len(state.seconds[STABLE]) == 5
    assert sum(sc.ok for sc in state.seconds[STABLE]) == 50


def test_states_are_immutable_snapshots() -> None:
    empty = GuardState.for_config(CONFIG)
    one = observe(empty, CANARY, 1.0, 0.01, ok=False)
    assert not empty.seconds and window_stats(one, CANARY, 1.0).errors == 1


def test_a_clock_that_steps_back_counts_in_the_newest_bucket() -> None:
    state = observe(GuardState.for_config(CONFIG), STABLE, 10.5, 0.01, ok=True)
    state = observe(state, STABLE, 9.0, 0.01, ok=True)
    assert [(sc.second, sc.ok) for sc in state.seconds[STABLE]] == [(10, 2)]


def test_same_version_on_both_sides_never_rolls_back() -> None:
    state = feed(GuardState.for_config(CONFIG), STABLE, 200, errors=200)
    d = evaluate(state, CONFIG, STABLE, STABLE, now=20.0)
    assert not d.rollback and d.reason == "canary and stable are the same version"


def test_errors_do_not_feed_the_latency_histogram() -> None:
    state = observe(GuardState.for_config(CONFIG), CANARY, 0.0, 99.0, ok=False)
    stats = window_stats(state, CANARY, 0.0)
    assert (stats.total, stats.errors, stats.error_rate, stats.p95_s) == (1, 1, 1.0, None)


@settings(deadline=None)  # pure and fast; no flaky deadline on a loaded CI machine
@given(st.floats(0, 1e4), st.floats(0, 1e4))
def test_latency_buckets_are_monotone(a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    assert 0 <= latency_bucket(lo) <= latency_bucket(hi) <= 95


def test_latency_bucket_edges() -> None:
    assert latency_bucket(0.0) == latency_bucket(-1.0) == latency_bucket(math.nan) == 0
    assert latency_bucket(1e9) == 95


@pytest.mark.parametrize("scale", [0.0002, 0.005, 0.2, 3.0])
def test_p95_estimate_is_within_ten_percent(scale: float) -> None:
    rng = random.Random(5)
    samples = [rng.lognormvariate(0, 0.5) * scale for _ in range(2000)]
    state = GuardState.for_config(CONFIG)
    for i, s in enumerate(samples):
        state = observe(state, STABLE, i / 100, s, ok=True)
    p95 = window_stats(state, STABLE, 19.99).p95_s
    exact = sorted(samples)[math.ceil(0.95 * len(samples)) - 1]
    assert p95 == pytest.approx(exact, rel=0.10)
