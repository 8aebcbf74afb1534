"""runtime.engine.buckets: the default table, the size -> bucket lookup, padding and trimming."""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runtime.engine.buckets import BucketTable, default_buckets, pad_batch, split_outputs

Array = npt.NDArray[Any]


def vllm_default(max_size: int) -> list[int]:
    """vLLM's default capture sizes (vllm/config/vllm.py), for sizes up to max_size."""
    return [1, 2, 4, *range(8, 256, 8), *range(256, max_size + 1, 16)]


# ----------------------------------------------------------------------------- default table


@pytest.mark.parametrize(
    ("max_batch_size", "want"),
    [
        (1, (1,)),
        (2, (1, 2)),
        (3, (1, 2, 3)),
        (4, (1, 2, 3, 4)),
        (8, (1, 2, 3, 4, 5, 6, 7, 8)),
        (10, (1, 2, 3, 4, 5, 6, 7, 8, 10)),
        (32, (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32)),
        (33, (1, 2, 3, 4, 5, 6, 7, 8, 16, 24, 32, 33)),
    ],
)
def test_default_buckets_small(max_batch_size: int, want: tuple[int, ...]) -> None:
    assert default_buckets(max_batch_size) == want


@pytest.mark.parametrize("max_batch_size", [8, 64, 248, 256, 272, 512])
def test_default_buckets_are_every_size_to_8_then_vllms(max_batch_size: int) -> None:
    """Where max_batch_size is one of vLLM's sizes, the table is 1..8 then vLLM's own."""
    want = sorted({*range(1, 9), *vllm_default(max_batch_size)})
    assert list(default_buckets(max_batch_size)) == [s for s in want if s <= max_batch_size]


def test_default_buckets_above_256_step_16_and_end_at_max() -> None:
    assert default_buckets(300)[-6:] == (240, 248, 256, 272, 288, 300)


@given(st.integers(1, 4096))
def test_default_buckets_shape(max_batch_size: int) -> None:
    sizes = default_buckets(max_batch_size)
    BucketTable(sizes)  # positive, strictly ascending
    assert sizes[0] == 1
    assert sizes[-1] == max_batch_size
    # no padding up to 8 rows: a small batch runs exactly its rows
    assert sizes[: min(8, max_batch_size)] == tuple(range(1, min(8, max_batch_size) + 1))
    for a, b in itertools.pairwise(sizes):
        # dense to 8, then gaps of at most 8 below 256 and at most 16 above
        assert b - a <= (1 if b <= 8 else 8 if b <= 256 else 16)


@pytest.mark.parametrize("bad", [0, -1])
def test_default_buckets_need_a_batch_dimension(bad: int) -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        default_buckets(bad)


# ----------------------------------------------------------------------------- table


@pytest.mark.parametrize("sizes", [(2, 1), (1, 1), (0, 1), (-4,), (1, 2.0), (True, 2)], ids=str)
def test_table_validation(sizes: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError, match="bucket sizes"):
        BucketTable(sizes)


sizes_st = st.lists(st.integers(1, 600), min_size=1, max_size=40, unique=True).map(sorted)


@given(sizes_st)
def test_bucket_for_every_n(sizes: list[int]) -> None:
    table = BucketTable(sizes)
    for n in range(1, sizes[-1] + 1):
        bucket = table.bucket_for(n)
        assert bucket == min(s for s in sizes if s >= n)
    assert table.bucket_for(sizes[-1] + 1) is None
    assert table.bucket_for(10**9) is None


@given(st.integers(1, 1024))
def test_default_table_has_a_bucket_for_every_batch(max_batch_size: int) -> None:
    table = BucketTable.default(max_batch_size)
    for n in range(1, max_batch_size + 1):
        bucket = table.bucket_for(n)
        assert bucket is not None and n <= bucket <= max_batch_size
    assert table.bucket_for(max_batch_size + 1) is None


def test_empty_table_is_all_eager() -> None:
    table = BucketTable(())
    assert table.bucket_for(1) is None
    assert table.largest is None
    assert len(table) == 0


def test_bucket_for_needs_a_row() -> None:
    with pytest.raises(ValueError, match="at least one row"):
        BucketTable((1, 2)).bucket_for(0)


def test_graph_ids_and_capture_order() -> None:
    table = BucketTable((1, 2, 4, 8))
    assert [table.graph_id(b) for b in table] == [1, 2, 3, 4]  # 0 is ORT's default graph
    assert table.capture_order() == (8, 4, 2, 1)  # largest first
    assert table.largest == 8
    with pytest.raises(KeyError):
        table.graph_id(3)
    with pytest.raises(KeyError):
        table.graph_id(16)


def test_table_value_semantics() -> None:
    assert BucketTable([1, 2]) == BucketTable((1, 2))
    assert hash(BucketTable([1, 2])) == hash(BucketTable((1, 2)))
    assert BucketTable((1, 2)) != BucketTable((1, 4))
    assert repr(BucketTable((1, 2))) == "BucketTable([1, 2])"


# ----------------------------------------------------------------------------- padding


def rowwise(x: Array) -> Array:
    """A row-wise 'model' with exact arithmetic: each output row depends on its row only."""
    flat = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
    return np.stack([flat * 3 + 1, flat[:, ::-1] - flat], axis=1)


@given(
    rows=st.lists(st.integers(1, 9), min_size=1, max_size=6),
    row_shape=st.lists(st.integers(1, 4), max_size=2).map(tuple),
    extra=st.integers(0, 5),
    dtype=st.sampled_from([np.float32, np.int64, np.float64]),
)
def test_pad_split_round_trip(
    rows: list[int], row_shape: tuple[int, ...], extra: int, dtype: type[np.generic]
) -> None:
    rng = np.random.default_rng(sum(rows))
    reqs = [rng.integers(-50, 50, size=(n, *row_shape)).astype(dtype) for n in rows]
    bucket = sum(rows) + extra
    padded = pad_batch(reqs, bucket)
    assert padded.shape == (bucket, *row_shape)
    assert not padded[sum(rows) :].any()  # padding is zeros
    pieces = split_outputs(rowwise(padded), rows)
    assert len(pieces) == len(reqs)
    for req, piece in zip(reqs, pieces, strict=True):
        np.testing.assert_array_equal(piece, rowwise(req))  # as if computed unpadded


def test_pad_split_round_trip_through_a_matmul() -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 5)).astype(np.float32)
    reqs = [rng.standard_normal((n, 16)).astype(np.float32) for n in (1, 3, 2)]
    pieces = split_outputs(pad_batch(reqs, 8) @ w, [1, 3, 2])
    for req, piece in zip(reqs, pieces, strict=True):
        np.testing.assert_allclose(piece, req @ w, rtol=1e-5, atol=1e-5)


def test_pad_into_a_static_buffer_keeps_its_address_and_clears_stale_rows() -> None:
    static = np.full((4, 2), 7.0, dtype=np.float32)  # stale data from an earlier batch
    address = static.ctypes.data
    out = pad_batch([np.ones((1, 2), np.float32), np.full((2, 2), 2, np.float32)], 4, out=static)
    assert out is static and out.ctypes.data == address
    np.testing.assert_array_equal(out, [[1, 1], [2, 2], [2, 2], [0, 0]])


@pytest.mark.parametrize(
    ("arrays", "to", "match"),
    [
        ([], 4, "at least one array"),
        ([np.zeros((1, 2), np.float32), np.zeros((1, 3), np.float32)], 4, "row shape"),
        ([np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float64)], 4, "same dtype"),
        ([np.zeros((), np.float32)], 4, "row shape"),
        ([np.zeros((3, 2), np.float32), np.zeros((2, 2), np.float32)], 4, "5 rows do not fit"),
    ],
)
def test_pad_batch_refuses(arrays: list[Array], to: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        pad_batch(arrays, to)


@pytest.mark.parametrize("out_shape", [(4, 3), (8, 2)])
def test_pad_batch_refuses_a_wrong_static_buffer(out_shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="out is"):
        pad_batch([np.zeros((1, 2), np.float32)], 4, out=np.zeros(out_shape, np.float32))


def test_split_outputs_are_views_without_padding() -> None:
    out = np.arange(12).reshape(6, 2)
    a, b = split_outputs(out, [1, 3])
    assert np.shares_memory(a, out) and np.shares_memory(b, out)
    np.testing.assert_array_equal(a, [[0, 1]])
    np.testing.assert_array_equal(b, [[2, 3], [4, 5], [6, 7]])
    assert split_outputs(out, [0, 1])[0].shape == (0, 2)


@pytest.mark.parametrize("sizes", [[4, 3], [-1, 2]])
def test_split_outputs_refuses(sizes: list[int]) -> None:
    with pytest.raises(ValueError):
        split_outputs(np.zeros((6, 2)), sizes)
