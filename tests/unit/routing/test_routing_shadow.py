"""Shadow traffic: sampling and the served-vs-shadow output comparison."""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest

from server.routing import ShadowDiff, compare_outputs, route_key_point, should_shadow
from server.routing.shadow import OutputLike


def fp32(name: str, values: list[float], shape: tuple[int, ...] | None = None) -> OutputLike:
    data = np.asarray(values, dtype="<f4").tobytes()
    return (name, "FP32", shape if shape is not None else (len(values),), data)


def text(name: str, values: list[bytes]) -> OutputLike:
    data = b"".join(struct.pack("<I", len(v)) + v for v in values)
    return (name, "BYTES", (len(values),), data)


# --- sampling -------------------------------------------------------------------------------


def test_should_shadow_edges() -> None:
    assert not any(should_shadow(p, 0) for p in range(10_000))
    assert all(should_shadow(p, 10_000) for p in range(10_000))
    assert should_shadow(499, 500) and not should_shadow(500, 500)


def test_should_shadow_samples_the_configured_share() -> None:
    rng = random.Random(2)
    assert abs(sum(should_shadow(rng, 500) for _ in range(20_000)) / 20_000 - 0.05) < 0.005
    keyed = sum(should_shadow(route_key_point(f"u{i}", salt="shadow"), 500) for i in range(20_000))
    assert abs(keyed / 20_000 - 0.05) < 0.005
    assert should_shadow(lambda: 0.0, 1) and not should_shadow(lambda: 0.5, 5000)


# --- comparison -----------------------------------------------------------------------------


def test_identical_outputs() -> None:
    outs = [fp32("y", [1.0, 2.0]), text("label", [b"cat"])]
    diff = compare_outputs(outs, list(reversed(outs)))
    assert diff == ShadowDiff(0.0, ()) and diff.identical


def test_numeric_difference_is_the_largest_absolute_one() -> None:
    diff = compare_outputs(
        [fp32("a", [1.0, 2.0, 3.0]), fp32("b", [0.0])],
        [fp32("a", [1.0, 2.5, 2.75]), fp32("b", [-0.125])],
    )
    assert diff.max_abs_diff == pytest.approx(0.5) and diff.mismatched == ()
    assert not diff.identical


def test_integer_outputs() -> None:
    served = ("n", "INT64", (2,), np.array([5, -7], dtype="<i8").tobytes())
    shadow = ("n", "INT64", (2,), np.array([5, -4], dtype="<i8").tobytes())
    assert compare_outputs([served], [shadow]).max_abs_diff == 3.0


def test_structural_mismatches() -> None:
    served = [fp32("a", [1.0, 2.0]), fp32("b", [1.0]), fp32("c", [1.0]), fp32("only_served", [0])]
    shadow = [
        fp32("a", [1.0, 2.0], shape=(2, 1)),  # other shape
        ("b", "FP64", (1,), np.array([1.0]).tobytes()),  # other datatype
        ("c", "FP32", (1,), b"\x00\x00"),  # bytes do not fit the shape
        fp32("only_shadow", [0]),
    ]
    diff = compare_outputs(served, shadow)
    assert diff.mismatched == ("a", "b", "c", "only_served", "only_shadow")
    assert diff.max_abs_diff is None


def test_bytes_are_compared_for_equality() -> None:
    same = compare_outputs([text("t", [b"a", b"bc"])], [text("t", [b"a", b"bc"])])
    other = compare_outputs([text("t", [b"a", b"bc"])], [text("t", [b"a", b"bd"])])
    assert same == ShadowDiff(None, ()) and same.identical
    assert other == ShadowDiff(None, ("t",))


def test_nan_and_infinity() -> None:
    nan, inf = float("nan"), float("inf")
    assert compare_outputs([fp32("x", [nan, inf])], [fp32("x", [nan, inf])]).max_abs_diff == 0.0
    one_sided = compare_outputs([fp32("x", [nan, 1.0])], [fp32("x", [0.0, 1.0])])
    assert one_sided.mismatched == ("x",)
    assert compare_outputs([fp32("x", [inf])], [fp32("x", [1.0])]).max_abs_diff == inf


def test_scalars_and_empty_tensors() -> None:
    assert compare_outputs([fp32("s", [2.0], shape=())], [fp32("s", [1.5], shape=())]) == (
        ShadowDiff(0.5, ())
    )
    assert compare_outputs([fp32("e", [])], [fp32("e", [])]) == ShadowDiff(0.0, ())
