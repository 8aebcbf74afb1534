"""The sticky weighted split: hash, layout, accuracy, stickiness, monotone moves, edge weights."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Mapping
from functools import cache
from itertools import pairwise

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.routing import (
    BP_TOTAL,
    RoutingError,
    RoutingTable,
    layout,
    override_canary,
    pick_weighted,
    route_key_point,
    with_canary_weight,
)
from server.routing.split import random_point

N_KEYS = 100_000


@cache
def key_points() -> tuple[int, ...]:
    return tuple(route_key_point(f"user-{i}") for i in range(N_KEYS))


def assign(weights: Mapping[int, int]) -> list[int]:
    return [pick_weighted(weights, p) for p in key_points()]


def line(weights: Mapping[int, int]) -> npt.NDArray[np.int64]:
    """The version of every point of [0, 10000), from the layout's spans."""
    out = np.zeros(BP_TOTAL, dtype=np.int64)
    for span in layout(weights):
        out[span.lo : span.hi] = span.version
    return out


# --- the hash -------------------------------------------------------------------------------


def test_route_key_point_is_a_fixed_function_of_the_key() -> None:
    # Golden values: a change here reshuffles every sticky key in production.
    assert route_key_point("user-42") == 4360
    assert route_key_point("") == 8931
    assert route_key_point("ключ") == 3001
    assert route_key_point("user-42", salt="shadow") == 6524


@settings(deadline=None)  # pure and fast; no flaky deadline on a loaded CI machine
@given(st.text())
def test_route_key_point_is_on_the_line(key: str) -> None:
    assert 0 <= route_key_point(key) < BP_TOTAL
    assert route_key_point(key) == route_key_point(key)


def test_salted_points_are_independent_of_the_routing_point() -> None:
    keys = [f"k{i}" for i in range(20_000)]
    in_canary = [k for k in keys if route_key_point(k) >= 9000]
    shadowed = sum(route_key_point(k, salt="shadow") < 1000 for k in in_canary)
    assert abs(shadowed / len(in_canary) - 0.10) < 0.02


def test_random_point_covers_the_line_and_never_leaves_it() -> None:
    assert random_point(lambda: 0.0) == 0
    assert random_point(lambda: 0.99999999999) == BP_TOTAL - 1
    assert random_point(lambda: 1.0) == BP_TOTAL - 1  # a sloppy source cannot fall off
    assert 0 <= random_point(random.Random(3)) < BP_TOTAL


# --- accuracy and stickiness ----------------------------------------------------------------


@pytest.mark.parametrize(
    "weights",
    [
        {1: 9000, 2: 1000},
        {1: 5000, 2: 3000, 3: 2000},
        {1: 3334, 2: 3333, 3: 3333},
        {4: 100, 7: 9900},
        {1: 7000, 2: 0, 3: 3000},
    ],
)
def test_split_over_100k_keys_is_within_half_a_percent(weights: dict[int, int]) -> None:
    counts = Counter(assign(weights))
    for version, weight in weights.items():
        assert abs(counts[version] / N_KEYS - weight / BP_TOTAL) <= 0.005, (version, counts)
    assert set(counts) == {v for v, w in weights.items() if w}


def test_a_key_always_lands_on_the_same_version() -> None:
    weights = {1: 9000, 2: 1000}
    first = {f"user-{i}": pick_weighted(weights, route_key_point(f"user-{i}")) for i in range(500)}
    for key in reversed(list(first)):
        assert pick_weighted(weights, route_key_point(key)) == first[key]


def test_the_layout_does_not_depend_on_insertion_order() -> None:
    a, b = {1: 6000, 2: 3000, 3: 1000}, {3: 1000, 1: 6000, 2: 3000}
    assert assign(a) == assign(b)


# --- monotone moves -------------------------------------------------------------------------


def test_raising_the_canary_10_20_50_only_moves_keys_into_it() -> None:
    steps = [assign({1: BP_TOTAL - c, 2: c}) for c in (1000, 2000, 5000)]
    for before, after in pairwise(steps):
        left_canary = sum(b == 2 and a != 2 for b, a in zip(before, after, strict=True))
        joined_stable = sum(b != 1 and a == 1 for b, a in zip(before, after, strict=True))
        assert left_canary == 0
        assert joined_stable == 0
    shares = [s.count(2) / N_KEYS for s in steps]
    assert shares == pytest.approx([0.1, 0.2, 0.5], abs=0.005)


def test_a_canary_below_stable_in_version_order_is_monotone_too() -> None:
    # Rolling "forward" to an older build: canary 1, stable 3, another version 2 in between.
    low = line({1: 1000, 2: 2000, 3: 7000})
    high = line({1: 2000, 2: 2000, 3: 6000})
    assert np.all(high[low == 1] == 1)
    assert np.all(low[high == 3] == 3)


@st.composite
def transfers(draw: st.DrawFn) -> tuple[dict[int, int], int, int, int]:
    versions = draw(st.lists(st.integers(1, 50), min_size=2, max_size=6, unique=True))
    n = len(versions) - 1
    cuts = sorted(draw(st.lists(st.integers(0, BP_TOTAL), min_size=n, max_size=n)))
    bounds = [0, *cuts, BP_TOTAL]
    weights = {v: bounds[i + 1] - bounds[i] for i, v in enumerate(versions)}
    donor, gainer = draw(st.permutations(versions))[:2]
    amount = draw(st.integers(0, weights[donor]))
    return weights, donor, gainer, amount


@settings(max_examples=100, deadline=None)
@given(transfers())
def test_any_transfer_between_two_versions_moves_keys_only_from_donor_to_gainer(
    case: tuple[dict[int, int], int, int, int],
) -> None:
    weights, donor, gainer, amount = case
    after_w = {**weights, donor: weights[donor] - amount, gainer: weights[gainer] + amount}
    before, after = line(weights), line(after_w)
    assert np.all(after[before == gainer] == gainer)  # no point leaves the gainer
    assert np.all(before[after == donor] == donor)  # no point joins the donor
    lo, hi = sorted((donor, gainer))
    for v in weights:  # versions outside [lo, hi] keep exactly their points
        if not lo <= v <= hi:
            assert np.array_equal(before == v, after == v), v
    for w in (weights, after_w):
        assert np.bincount(line(w), minlength=max(w) + 1)[list(w)].tolist() == list(w.values())


@settings(max_examples=50, deadline=None)
@given(transfers(), st.lists(st.integers(0, BP_TOTAL - 1), min_size=1, max_size=200))
def test_pick_weighted_agrees_with_the_layout(
    case: tuple[dict[int, int], int, int, int], points: list[int]
) -> None:
    weights = case[0]
    expected = line(weights)
    for p in [*points, 0, BP_TOTAL - 1, *(s.lo for s in layout(weights) if s.lo < BP_TOTAL)]:
        assert pick_weighted(weights, p) == expected[p]


# --- edge weights and bad input -------------------------------------------------------------


def test_edge_weights_0_and_10000() -> None:
    assert set(line({1: BP_TOTAL, 2: 0})) == {1}
    assert set(line({1: 0, 2: BP_TOTAL})) == {2}
    assert set(line({5: BP_TOTAL})) == {5}
    assert {pick_weighted({1: 0, 2: BP_TOTAL, 3: 0}, p) for p in range(BP_TOTAL)} == {2}
    assert {pick_weighted({1: BP_TOTAL, 2: 0}, p) for p in range(BP_TOTAL)} == {1}


@pytest.mark.parametrize(
    ("weights", "point"),
    [({1: 9000, 2: 1000}, -1), ({1: 9000, 2: 1000}, BP_TOTAL), ({1: 9000}, 5), ({}, 0)],
)
def test_pick_weighted_rejects_what_validation_would(weights: dict[int, int], point: int) -> None:
    with pytest.raises(ValueError):
        pick_weighted(weights, point)


# --- canary weight arithmetic ---------------------------------------------------------------

LABELS = {"stable": 1, "canary": 2}


def test_override_canary_two_way() -> None:
    assert dict(override_canary({1: 9000, 2: 1000}, LABELS, 2500)) == {1: 7500, 2: 2500}
    assert dict(override_canary({1: 9000, 2: 1000}, LABELS, 0)) == {1: 10000, 2: 0}
    assert dict(override_canary({1: 9000, 2: 1000}, LABELS, 10000)) == {1: 0, 2: 10000}
    assert dict(override_canary({}, LABELS, 1000)) == {1: 9000, 2: 1000}


def test_override_canary_leaves_other_versions_alone() -> None:
    out = override_canary({1: 8000, 2: 1000, 3: 1000}, LABELS, 3000)
    assert dict(out) == {1: 6000, 2: 3000, 3: 1000}
    with pytest.raises(ValueError, match="more than the 9000 bp"):
        override_canary({1: 8000, 2: 1000, 3: 1000}, LABELS, 9500)


@pytest.mark.parametrize(
    ("labels", "bp", "match"),
    [
        ({"stable": 1}, 100, "labels 'stable' and 'canary'"),
        ({"canary": 2}, 100, "labels 'stable' and 'canary'"),
        (LABELS, -1, r"within \[0, 10000\]"),
        (LABELS, 10001, r"within \[0, 10000\]"),
    ],
)
def test_override_canary_errors(labels: dict[str, int], bp: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        override_canary({1: 9000, 2: 1000}, labels, bp)


def test_with_canary_weight_rolls_back_and_keeps_everything_else() -> None:
    table = RoutingTable({1: 8000, 2: 2000}, LABELS, allow_weight_override=True)
    rolled = with_canary_weight(table, 0)
    assert dict(rolled.weights) == {1: 10000, 2: 0}
    assert rolled.labels == table.labels and rolled.allow_weight_override
    assert dict(table.weights) == {1: 8000, 2: 2000}  # the old snapshot is untouched
    with pytest.raises(RoutingError, match="labels 'stable' and 'canary'"):
        with_canary_weight(RoutingTable({1: 10000}), 0)
