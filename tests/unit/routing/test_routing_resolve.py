"""Per-request resolution: precedence, labels, pinned versions, fallback, x-canary-weight."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import ErrorCode, InvalidInput, NotFound
from server.routing import (
    InvalidRoutingHeader,
    Route,
    RoutingTable,
    UnknownLabel,
    VersionNotReady,
    parse_canary_weight,
    resolve,
)
from server.routing.resolve import RouteReason

CANARY_10 = RoutingTable({1: 9000, 2: 1000}, {"stable": 1, "canary": 2})
OVERRIDABLE = RoutingTable(
    {1: 9000, 2: 1000}, {"stable": 1, "canary": 2}, allow_weight_override=True
)
BOTH = frozenset({1, 2})


def no_rng() -> float:
    raise AssertionError("the random source must not be drawn from here")


def route(
    *,
    request_version: str = "",
    header_version: str | None = None,
    routing_key: str | None = None,
    table: RoutingTable | None = CANARY_10,
    ready: frozenset[int] = BOTH,
    canary_weight: str | None = None,
    rng: random.Random | None = None,
) -> Route:
    return resolve(
        request_version=request_version,
        header_version=header_version,
        routing_key=routing_key,
        table=table,
        ready_versions=ready,
        rng=rng if rng is not None else no_rng,
        canary_weight_header=canary_weight,
        model="dense",
    )


def keys_landing_on(version: int, table: RoutingTable = CANARY_10, n: int = 1) -> list[str]:
    found = []
    for i in range(10_000):
        if route(routing_key=f"k{i}", table=table).version == version:
            found.append(f"k{i}")
            if len(found) == n:
                return found
    raise AssertionError("no key found")


# --- precedence -----------------------------------------------------------------------------


def test_explicit_request_version_wins_over_everything() -> None:
    r = route(request_version="1", header_version="canary", routing_key="k", canary_weight="x")
    assert r == Route(1, "pinned")


def test_header_version_number_is_pinned() -> None:
    assert route(header_version="2") == Route(2, "pinned")
    assert route(header_version=" 2 ") == Route(2, "pinned")


def test_header_label_resolves_through_the_table() -> None:
    assert route(header_version="canary") == Route(2, "label")
    assert route(header_version="stable", routing_key=keys_landing_on(2)[0]) == Route(1, "label")


def test_split_reason_is_canary_or_stable() -> None:
    assert route(routing_key=keys_landing_on(2)[0]) == Route(2, "canary")
    assert route(routing_key=keys_landing_on(1)[0]) == Route(1, "stable")


def test_no_table_serves_the_highest_ready_version() -> None:
    assert route(table=None, ready=frozenset({1, 3, 2})) == Route(3, "stable")
    with pytest.raises(VersionNotReady, match="model 'dense' has no ready version"):
        route(table=None, ready=frozenset())


def test_without_a_key_the_injected_random_source_decides() -> None:
    rng = random.Random(7)
    counts = Counter(route(rng=rng).reason for _ in range(20_000))
    assert abs(counts["canary"] / 20_000 - 0.10) < 0.01
    assert route(rng=random.Random(7)) == route(rng=random.Random(7))
    assert route(routing_key="", rng=random.Random(1)).version in BOTH  # empty key = no key


def test_20k_distinct_keys_split_90_10_and_stick() -> None:
    first = {f"req-{i}": route(routing_key=f"req-{i}").version for i in range(20_000)}
    share = sum(v == 2 for v in first.values()) / len(first)
    assert abs(share - 0.10) <= 0.01
    assert all(route(routing_key=k).version == v for k, v in list(first.items())[::7])


# --- pinned versions and labels: errors -----------------------------------------------------


@pytest.mark.parametrize("text", ["abc", "0", "-1", "1.5"])
def test_bad_request_version_uses_tritons_wording(text: str) -> None:
    with pytest.raises(InvalidInput, match="failed to get model version from specified version"):
        route(request_version=text)


def test_pinned_version_not_ready() -> None:
    with pytest.raises(VersionNotReady, match="model 'dense' version 2 is not ready") as exc:
        route(request_version="2", ready=frozenset({1}))
    assert exc.value.code is ErrorCode.NOT_READY
    with pytest.raises(VersionNotReady):
        route(header_version="2", ready=frozenset({1}))


def test_pinned_version_the_model_does_not_have_is_not_found_when_known_versions_given() -> None:
    with pytest.raises(NotFound, match=r"has no version 9 \(versions: 1, 2\)"):
        resolve(
            request_version="9",
            header_version=None,
            routing_key=None,
            table=None,
            ready_versions=BOTH,
            rng=no_rng,
            model="dense",
            known_versions=BOTH,
        )


def test_unknown_label_is_not_found_and_lists_the_labels() -> None:
    with pytest.raises(UnknownLabel, match=r"no label 'canry' \(labels: canary, stable\)") as e:
        route(header_version="canry")
    assert e.value.code is ErrorCode.NOT_FOUND
    with pytest.raises(UnknownLabel, match=r"labels: none"):
        route(header_version="canary", table=None)


def test_label_on_a_version_that_is_not_ready() -> None:
    with pytest.raises(VersionNotReady, match="label 'canary' points at version 2, not ready"):
        route(header_version="canary", ready=frozenset({1}))


# --- not-ready fallback ---------------------------------------------------------------------


def test_split_on_a_version_that_is_not_ready_falls_back_to_stable() -> None:
    for key in keys_landing_on(2, n=20):
        assert route(routing_key=key, ready=frozenset({1, 3})) == Route(1, "stable")


def test_fallback_to_the_highest_ready_version_when_stable_is_down_too() -> None:
    table = RoutingTable({1: 5000, 2: 5000}, {"stable": 1, "canary": 2})
    assert route(routing_key=keys_landing_on(1, table)[0], table=table, ready=frozenset({2})) == (
        Route(2, "canary")
    )
    with pytest.raises(VersionNotReady, match="no ready version"):
        route(routing_key="k", table=table, ready=frozenset())


def test_fallback_prefers_the_default_label() -> None:
    table = RoutingTable({1: 5000, 2: 5000}, {"blue": 1, "green": 2}, default_label="green")
    key = keys_landing_on(1, table)[0]
    assert route(routing_key=key, table=table, ready=frozenset({2, 3})) == Route(2, "stable")


def test_table_without_weights_serves_the_default_label() -> None:
    labelled = RoutingTable(labels={"blue": 1, "green": 2}, default_label="blue")
    assert route(table=labelled, ready=frozenset({1, 2, 3})) == Route(1, "stable")
    assert route(table=RoutingTable(labels={"x": 1}), ready=BOTH) == Route(2, "stable")
    assert route(table=labelled, header_version="green") == Route(2, "label")


@settings(deadline=None)  # pure and fast; no flaky deadline on a loaded CI machine
@given(
    st.sets(st.integers(1, 4), min_size=1),
    st.text(max_size=20),
    st.sampled_from([None, "stable", "canary", "1", "2"]),
)
def test_resolve_only_ever_serves_a_ready_version(
    ready: set[int], key: str, header: str | None
) -> None:
    table = RoutingTable({1: 6000, 2: 3000, 3: 1000}, {"stable": 1, "canary": 2})
    try:
        r = route(
            routing_key=key,
            header_version=header,
            table=table,
            ready=frozenset(ready),
            rng=random.Random(0),
        )
    except VersionNotReady:
        assert header is not None  # only an explicit choice can be refused
        return
    assert r.version in ready
    expected: set[RouteReason] = {"pinned"} if header in ("1", "2") else {"label"}
    assert r.reason in (expected if header else {"stable", "canary"})


# --- x-canary-weight ------------------------------------------------------------------------


def test_canary_weight_override_sets_the_split_for_the_request() -> None:
    key = keys_landing_on(1)[0]
    assert route(routing_key=key, table=OVERRIDABLE, canary_weight="10000") == Route(2, "canary")
    assert route(routing_key=keys_landing_on(2)[0], table=OVERRIDABLE, canary_weight="0") == (
        Route(1, "stable")
    )
    rng = random.Random(11)
    half = Counter(
        route(table=OVERRIDABLE, canary_weight="50%", rng=rng).version for _ in range(4000)
    )
    assert abs(half[2] / 4000 - 0.5) < 0.03


def test_canary_weight_is_refused_where_not_allowed() -> None:
    with pytest.raises(InvalidRoutingHeader, match="does not allow x-canary-weight") as exc:
        route(canary_weight="500")
    assert exc.value.code is ErrorCode.INVALID_INPUT
    with pytest.raises(InvalidRoutingHeader, match="has no routing table"):
        route(table=None, canary_weight="500")


def test_canary_weight_needs_the_labels() -> None:
    table = RoutingTable({1: 10000}, {"stable": 1}, allow_weight_override=True)
    with pytest.raises(InvalidRoutingHeader, match="labels 'stable' and 'canary'"):
        route(table=table, canary_weight="500", routing_key="k")


def test_canary_weight_is_ignored_by_pinned_and_labelled_requests() -> None:
    assert route(request_version="1", canary_weight="nonsense") == Route(1, "pinned")
    assert route(header_version="canary", canary_weight="nonsense") == Route(2, "label")


@pytest.mark.parametrize(
    ("text", "bp"),
    [("0", 0), ("1000", 1000), (" 10000 ", 10000), ("10%", 1000), ("12.5%", 1250),
     ("0.01%", 1), ("100%", 10000), ("7 %", 700)],
)  # fmt: skip
def test_parse_canary_weight(text: str, bp: int) -> None:
    assert parse_canary_weight(text) == bp


@pytest.mark.parametrize("text", ["", "-1", "10001", "101%", "1.234%", "ten", "1e3", "0x10"])
def test_parse_canary_weight_rejects(text: str) -> None:
    with pytest.raises(InvalidRoutingHeader, match="x-canary-weight must be basis points"):
        parse_canary_weight(text)
