"""Routing tables: parsing, the dict round trip, immutability, validation errors and messages."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.errors import ErrorCode, InvalidInput
from server.routing import (
    GuardConfig,
    RoutingError,
    RoutingTable,
    RoutingTables,
    ShadowConfig,
    parse_routing_file,
    parse_routing_file_json,
    parse_table,
    parse_table_json,
    table_to_dict,
    validate,
)

EXAMPLE: dict[str, Any] = {
    "weights": {"1": 9000, "2": 1000},
    "labels": {"stable": 1, "canary": 2},
    "default_label": None,
    "allow_weight_override": True,
    "guard": {"window_s": 30, "min_samples": 50, "max_error_rate_delta": 0.02},
    "shadow": {"version": 2, "sample_bp": 500},
}


def test_parse_the_documented_example() -> None:
    t = parse_table(EXAMPLE)
    assert dict(t.weights) == {1: 9000, 2: 1000}
    assert dict(t.labels) == {"stable": 1, "canary": 2}
    assert (t.stable_version, t.canary_version, t.fallback_label) == (1, 2, "stable")
    assert t.allow_weight_override
    assert t.guard == GuardConfig(30, 50, 0.02, 1.5)  # max_p95_ratio defaulted
    assert t.shadow == ShadowConfig(2, 500)
    assert parse_table_json(json.dumps(EXAMPLE)) == t


def test_everything_is_optional() -> None:
    t = parse_table({})
    assert not t.weights and not t.labels and t.guard is None and t.shadow is None
    assert not t.allow_weight_override


def test_versions_may_be_numbers_or_digit_strings() -> None:
    assert parse_table({"weights": {1: 10000}, "labels": {"stable": "1"}}) == parse_table(
        {"weights": {"1": 10000}, "labels": {"stable": 1}}
    )


tables = st.builds(
    lambda ws, labels, allow, guard, shadow: RoutingTable(
        ws, labels, None, allow, guard if {"stable", "canary"} <= set(labels) else None, shadow
    ),
    st.sampled_from([{}, {1: 10000}, {1: 9000, 2: 1000}, {1: 0, 2: 2500, 7: 7500}]),
    st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9_.-]{0,10}", fullmatch=True),
                    st.integers(1, 9), max_size=4),
    st.booleans(),
    st.builds(GuardConfig, st.integers(1, 600), st.integers(1, 1000),
              st.floats(0, 1), st.floats(1, 100)) | st.none(),
    st.builds(ShadowConfig, st.integers(1, 9), st.integers(0, 10000)) | st.none(),
)  # fmt: skip


@settings(max_examples=50, deadline=None)  # no flaky deadline on a loaded CI machine
@given(tables)
def test_dict_form_round_trips(table: RoutingTable) -> None:
    d = table_to_dict(table)
    assert parse_table(d) == table
    assert parse_table_json(json.dumps(d)) == table


def test_a_table_is_an_immutable_snapshot() -> None:
    weights = {1: 9000, 2: 1000}
    t = RoutingTable(weights, {"stable": 1})
    weights[1] = 0  # the caller's dict is copied
    assert t.weights[1] == 9000
    with pytest.raises(TypeError):
        t.weights[1] = 5  # type: ignore[index]
    with pytest.raises(AttributeError):
        t.default_label = "stable"  # type: ignore[misc]


def test_routing_tables_returns_new_containers() -> None:
    empty = RoutingTables()
    a = empty.with_table("dense", parse_table(EXAMPLE))
    b = a.with_table("simple", RoutingTable({1: 10000}))
    assert len(empty) == 0 and set(a) == {"dense"} and set(b) == {"dense", "simple"}
    assert b.get("dense") is a["dense"] and b.get("missing") is None
    assert set(b.without("dense")) == {"simple"} and set(b) == {"dense", "simple"}
    assert a == RoutingTables({"dense": parse_table(EXAMPLE)})


def test_parse_routing_file() -> None:
    tables = parse_routing_file({"models": {"dense": EXAMPLE, "simple": {"weights": {"3": 10000}}}})
    assert set(tables) == {"dense", "simple"}
    assert dict(tables["simple"].weights) == {3: 10000}
    with pytest.raises(RoutingError, match=r"model 'simple': .*must sum to 10000"):
        parse_routing_file({"models": {"simple": {"weights": {"3": 100}}}})
    with pytest.raises(RoutingError, match='one key, "models"'):
        parse_routing_file({"dense": EXAMPLE})


# --- errors, each with a message that says what to fix --------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"weights": {"1": 9000, "2": 900}},
         "weights must sum to 10000 basis points, got 9900 (1: 9000, 2: 900)"),
        ({"weights": {"1": 11000, "2": -1000}}, "version 2 has a negative weight (-1000)"),
        ({"weights": {"0": 10000}}, "weights: version must be an integer > 0, got 0"),
        ({"weights": {"v1": 10000}}, "weights: version must be an integer > 0, got 'v1'"),
        ({"weights": {"1": 9000.0, "2": 1000}}, "weights[1] must be an integer, got 9000.0"),
        ({"weights": {"1": True}}, "weights[1] must be an integer, got True"),
        ({"weights": [9000, 1000]}, "weights must be an object, got list"),
        ({"labels": {"9lives": 1}}, "label name '9lives' is invalid: use a letter, then"),
        ({"labels": {"a b": 1}}, "label name 'a b' is invalid"),
        ({"labels": {"x" * 64: 1}}, "63 characters at most"),
        ({"labels": {"stable": 0}}, "labels[stable]: version must be an integer > 0, got 0"),
        ({"labels": {"stable": 1}, "default_label": "blue"},
         "default_label 'blue' is not a label (labels: stable)"),
        ({"default_label": 3}, "default_label must be a string or null"),
        ({"allow_weight_override": "yes"}, "allow_weight_override must be true or false"),
        ({"labels": {"stable": 1}, "guard": {}},
         "guard needs labels 'stable' and 'canary' (it compares the two)"),
        ({"labels": {"stable": 1, "canary": 2}, "guard": {"window_s": 0}},
         "guard.window_s must be within [1, 86400] s, got 0"),
        ({"labels": {"stable": 1, "canary": 2}, "guard": {"max_error_rate_delta": 5}},
         "guard.max_error_rate_delta must be a fraction within [0, 1], got 5.0"),
        ({"labels": {"stable": 1, "canary": 2}, "guard": {"max_p95_ratio": 0.5}},
         "guard.max_p95_ratio must be a finite number >= 1.0, got 0.5"),
        ({"labels": {"stable": 1, "canary": 2}, "guard": {"min_sample": 5}},
         "unknown key(s) min_sample in guard"),
        ({"shadow": {"version": 2}}, "shadow needs 'version' and 'sample_bp'"),
        ({"shadow": {"version": 2, "sample_bp": 10001}},
         "shadow.sample_bp must be within [0, 10000], got 10001"),
        ({"weight": {"1": 10000}}, "unknown key(s) weight in routing table (expected: weights,"),
    ],
)  # fmt: skip
def test_malformed_tables_are_refused_with_a_clear_message(
    data: dict[str, Any], message: str
) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_table(data)
    assert message in exc.value.message
    assert isinstance(exc.value, InvalidInput) and exc.value.code is ErrorCode.INVALID_INPUT


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(RoutingError) as exc:
        RoutingTable({1: 5000}, {"bad name": 1}, default_label="nope")
    assert exc.value.message.count(";") == 2


def test_invalid_json() -> None:
    with pytest.raises(RoutingError, match="routing table is not valid JSON"):
        parse_table_json("{weights: }")
    with pytest.raises(RoutingError, match="must be an object, got list"):
        parse_table_json("[]")


def test_validate_against_loaded_versions() -> None:
    t = parse_table(EXAMPLE | {"shadow": {"version": 3, "sample_bp": 10}})
    validate(t, frozenset({1, 2, 3}))
    with pytest.raises(RoutingError) as exc:
        validate(t, frozenset({1}))
    assert exc.value.message == (
        "invalid routing table: weights name version 2, which is not loaded (loaded: 1); "
        "label 'canary' points at version 2, which is not loaded (loaded: 1); "
        "shadow version 3 is not loaded (loaded: 1)"
    )
    with pytest.raises(RoutingError, match=r"label 'stable' points at version 5.*\(loaded: none\)"):
        validate(RoutingTable(labels={"stable": 5}), frozenset())


# --- JSON from clients and files: every problem a RoutingError (INVALID_ARGUMENT) ------------

DIGITS_5000 = "1" * 5000


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # RecursionError from json
        ("[" * 100_000, "routing table is refused: its JSON is nested too deeply"),
        ('{"weights": {"1": ' + "[" * 100_000, "its JSON is nested too deeply"),
        # ValueError from int(), with a hint about sys.set_int_max_str_digits for the client
        ('{"weights": {"1": 1' + "0" * 5000 + "}}", "number '1000000000000000"),
        ('{"labels": {"stable": ' + DIGITS_5000 + "}}", "is out of range (int64)"),
        ('{"labels": {"stable": 9223372036854775808}}',
         "number '9223372036854775808' is out of range (int64)"),
        # ValueError from int() of a version key
        ('{"weights": {"' + DIGITS_5000 + '": 10000}}',
         "weights: version '11111111111111111...111111111111111111' is out of range (int64)"),
        ('{"weights": {"9223372036854775808": 10000}}',
         "weights: version '9223372036854775808' is out of range (int64)"),
    ],
    ids=["deep", "deep-value", "huge-number", "huge-label", "int64+1", "huge-key", "key-int64+1"],
)  # fmt: skip
def test_json_beyond_limits_is_an_invalid_table(text: str, message: str) -> None:
    """Deep nesting and huge integers raised RecursionError or ValueError: SetRouting answered
    INTERNAL, and the same routing file killed the server at start-up."""
    with pytest.raises(RoutingError) as exc:
        parse_table_json(text)
    assert message in exc.value.message
    assert "set_int_max_str_digits" not in exc.value.message and len(exc.value.message) < 200
    with pytest.raises(RoutingError) as in_file:
        parse_routing_file_json('{"models": {"m": ' + text + "}}")
    assert in_file.value.message.startswith("routing file is refused: " if "[" * 99 in text else "")


def test_the_largest_int64_version_is_accepted() -> None:
    top = 2**63 - 1
    t = parse_table_json(json.dumps({"weights": {str(top): 10000}, "labels": {"stable": top}}))
    assert dict(t.weights) == {top: 10000} and t.stable_version == top


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # "01" and "1" were one version: one of the two weights silently dropped
        ('{"weights": {"1": 5000, "01": 5000}}',
         "weights: version '01' has a leading zero: write '1' (one version, one key)"),
        ('{"labels": {"stable": "007"}}', "labels[stable]: version '007' has a leading zero"),
        ('{"shadow": {"version": "02", "sample_bp": 5}}', "shadow.version: version '02' has a"),
        # JSON keeps the last of two equal keys
        ('{"weights": {"1": 5000, "1": 5000}}', "key '1' is given twice in one JSON object"),
        ('{"labels": {"stable": 1, "stable": 2}}', "key 'stable' is given twice"),
        # GetRouting answered the table back with a bare Infinity (or NaN): not JSON
        ('{"labels": {"stable": 1, "canary": 2}, "guard": {"max_p95_ratio": Infinity}}',
         "guard.max_p95_ratio must be a finite number >= 1.0, got inf"),
        ('{"labels": {"stable": 1, "canary": 2}, "guard": {"max_p95_ratio": 1e400}}',
         "guard.max_p95_ratio must be a finite number >= 1.0, got inf"),
        ('{"labels": {"stable": 1, "canary": 2}, "guard": {"max_p95_ratio": NaN}}',
         "guard.max_p95_ratio must be a finite number >= 1.0, got nan"),
        ('{"labels": {"stable": 1, "canary": 2}, "guard": {"max_error_rate_delta": NaN}}',
         "guard.max_error_rate_delta must be a fraction within [0, 1], got nan"),
        ('{"weights": {"1": Infinity}}', "weights[1] must be an integer, got inf"),
    ],
    ids=["weights-01", "label-007", "shadow-02", "dup-weight", "dup-label", "inf", "1e400", "nan",
         "nan-delta", "inf-weight"],
)  # fmt: skip
def test_keys_that_would_collapse_and_numbers_json_cannot_show_are_refused(
    text: str, message: str
) -> None:
    with pytest.raises(RoutingError) as exc:
        parse_table_json(text)
    assert message in exc.value.message
