"""runtime.engine.graph_registry: a bucket replays only with the binding it was captured with."""

from __future__ import annotations

import pytest

from runtime.engine.graph_registry import GraphMismatch, GraphRegistry, TensorBinding

X, Y = 0x7F00_0000_0000, 0x7F00_0010_0000  # device addresses of the bucket's static buffers


def sig(
    bucket: int = 8,
    *,
    x_shape: tuple[int, ...] | None = None,
    x_addr: int = X,
    dtype: str = "float32",
) -> tuple[TensorBinding, ...]:
    return (
        TensorBinding("x", x_shape or (bucket, 784), dtype, x_addr),
        TensorBinding("y", (bucket, 10), "float32", Y + bucket * 0x1000),
    )


@pytest.fixture
def reg() -> GraphRegistry:
    r = GraphRegistry()
    r.register(8, sig(8))
    return r


def test_matching_replays_are_counted(reg: GraphRegistry) -> None:
    for _ in range(3):
        reg.check(8, sig(8))
    assert reg.replays(8) == 3
    assert reg.is_captured(8) and not reg.is_captured(4)


def test_plain_tuples_lists_and_any_order_are_the_same_binding(reg: GraphRegistry) -> None:
    # OrtValue.shape() returns a list; IOBinding binds by name, so order does not matter.
    reg.check(8, [("y", [8, 10], "float32", Y + 8 * 0x1000), ("x", [8, 784], "float32", X)])
    assert reg.replays(8) == 1


def test_other_shape_is_refused(reg: GraphRegistry) -> None:
    with pytest.raises(GraphMismatch, match=r"'x' shape \[8, 784\] -> \[8, 785\]") as err:
        reg.check(8, sig(8, x_shape=(8, 785)))
    assert "refused" in str(err.value) and "bucket 8" in str(err.value)
    assert reg.replays(8) == 0


def test_other_address_is_refused(reg: GraphRegistry) -> None:
    with pytest.raises(GraphMismatch, match=r"'x' address 0x7f0000000000 -> 0x7f0000000040"):
        reg.check(8, sig(8, x_addr=X + 64))


def test_other_dtype_is_refused(reg: GraphRegistry) -> None:
    with pytest.raises(GraphMismatch, match="'x' dtype float32 -> float16"):
        reg.check(8, sig(8, dtype="float16"))


def test_missing_and_extra_tensors_are_refused(reg: GraphRegistry) -> None:
    with pytest.raises(GraphMismatch, match="'y' is not bound"):
        reg.check(8, sig(8)[:1])
    with pytest.raises(GraphMismatch, match="'z' was not captured"):
        reg.check(8, (*sig(8), TensorBinding("z", (8,), "int64", 0x1000)))


def test_uncaptured_bucket_is_refused(reg: GraphRegistry) -> None:
    with pytest.raises(GraphMismatch, match=r"bucket 4 has no captured graph \(captured: \[8\]\)"):
        reg.check(4, sig(4))


def test_refusals_are_counted(reg: GraphRegistry) -> None:
    for bad in (sig(8, x_addr=1), sig(4)):
        with pytest.raises(GraphMismatch):
            reg.check(8, bad)
    assert reg.stats().mismatches == 2


def test_a_bucket_is_captured_once(reg: GraphRegistry) -> None:
    with pytest.raises(ValueError, match="already has a captured graph"):
        reg.register(8, sig(8))


@pytest.mark.parametrize(
    ("bucket", "binding", "match"),
    [
        (4, sig(8), "has shape \\[8, 784\\]; a bucket's buffers have 4 rows"),
        (4, (TensorBinding("x", (), "float32", X),), "has shape \\[\\]"),
        (4, (TensorBinding("x", (4, 2), "float32", 0),), "null address"),
        (4, (TensorBinding("x", (4,), "f", X), TensorBinding("x", (4,), "f", Y)), "repeat"),
        (4, (), "at least one tensor"),
        (0, sig(8), "bucket must be >= 1"),
    ],
)
def test_register_validation(bucket: int, binding: tuple[TensorBinding, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        GraphRegistry().register(bucket, binding)


def test_eager_runs_are_counted_per_bucket(reg: GraphRegistry) -> None:
    reg.record_eager(None)  # above the largest bucket
    reg.record_eager(None)
    reg.record_eager(4)  # a bucket without a graph
    assert (reg.eager(None), reg.eager(4), reg.eager(8)) == (2, 1, 0)


def test_stats_is_a_snapshot(reg: GraphRegistry) -> None:
    reg.register(1, sig(1))
    reg.check(1, sig(1))
    reg.record_eager(None)
    s = reg.stats()
    assert s.captured == (1, 8)
    assert s.replays == {1: 1, 8: 0}
    assert s.eager == {None: 1}
    reg.check(1, sig(1))
    assert s.replays == {1: 1, 8: 0}  # not a live view
