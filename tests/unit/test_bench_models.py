"""bench/gpu_models.py's sentence embedder (the GPU benchmark's MiniLM-shaped model, built on
the GPU machine): what it takes and returns, and that rows of a batch stay independent, which
the dynamic batcher and the padded CUDA-graph buckets rely on."""

from __future__ import annotations

import numpy as np
import pytest
from graph_models import cpu_session, gm

from runtime.engine.buckets import BucketTable
from runtime.engine.graphs import GraphSet
from runtime.engine.session import signature_of

SMALL = {"layers": 2, "hidden": 32, "heads": 4, "seq": 8, "vocab": 50}


@pytest.fixture(scope="module")
def embedder() -> object:
    return cpu_session(gm.embedder(**SMALL))


def ids(n: int, seed: int, low: int = 0, high: int = 50) -> np.ndarray:
    return np.random.RandomState(seed).randint(low, high, (n, SMALL["seq"])).astype(np.int64)


def test_token_ids_in_one_pooled_vector_per_row_out(embedder: object) -> None:
    sig = signature_of(embedder)
    assert [(s.name, s.datatype, s.shape) for s in sig.inputs] == [("INPUT0", "INT64", (-1, 8))]
    assert [(s.name, s.datatype, s.shape) for s in sig.outputs] == [("OUTPUT0", "FP32", (-1, 32))]
    (out,) = embedder.run(None, {"INPUT0": ids(3, 0)})
    assert out.shape == (3, 32) and out.dtype == np.float32 and np.isfinite(out).all()


def test_ids_outside_the_vocabulary_are_clamped_not_an_error(embedder: object) -> None:
    wild = np.array([[-(2**62), -1, 0, 49, 50, 2**62, 7, 1000]], dtype=np.int64)
    (got,) = embedder.run(None, {"INPUT0": wild})
    (want,) = embedder.run(None, {"INPUT0": np.clip(wild, 0, 49)})
    np.testing.assert_array_equal(got, want)


def test_each_row_is_computed_alone_whatever_else_is_in_the_batch(embedder: object) -> None:
    batch = ids(5, 1)
    (together,) = embedder.run(None, {"INPUT0": batch})
    for i in range(5):
        (alone,) = embedder.run(None, {"INPUT0": batch[i : i + 1]})
        np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_replayed_buckets_pad_and_trim_token_ids_like_any_input(embedder: object) -> None:
    gs = GraphSet(embedder, BucketTable((1, 2, 4)), signature_of(embedder), device_type="cpu")
    gs.capture()
    feeds = [{"INPUT0": ids(1, 2)}, {"INPUT0": ids(2, 3)}]  # 3 rows: bucket 4, one padded
    result = gs.run(feeds)
    assert result.replayed and result.bucket == 4
    for feed, (out,) in zip(feeds, result.outputs, strict=True):
        np.testing.assert_allclose(out, embedder.run(None, feed)[0], rtol=1e-5, atol=1e-5)
