"""CUDA graphs per bucket on the CUDA EP (runtime.engine.graphs): capture at load, replay
correctness against the CPU EP, padding trimmed, fixed addresses guarded by the registry, the
counted eager path, and models that cannot be captured reported as such."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from runtime.engine.buckets import BucketTable
from runtime.engine.graph_registry import GraphMismatch
from runtime.engine.graphs import GraphSet
from runtime.engine.session import GraphsUnsupported, make_graph_session

pytestmark = pytest.mark.gpu

Array = npt.NDArray[Any]
TABLE = BucketTable((1, 2, 4, 8))
# kSameAsRequested makes an allocation after the warm-up visible (ORT's own graph test does
# this); TF32 off so that the GPU's MatMuls are comparable with the CPU EP's at tight tolerance.
OPTIONS = {"arena_extend_strategy": "kSameAsRequested", "use_tf32": "0"}
MODELS: dict[str, tuple[str, dict[str, Any], tuple[int, ...]]] = {
    # name: (builder, builder kwargs, row shape); an INT64 row is token ids
    "dense": ("mlp", {}, (256,)),
    "encoder": ("encoder", {"layers": 2, "hidden": 64, "heads": 4, "seq": 16}, (16, 64)),
    "embedder": (
        "embedder",
        {"layers": 2, "hidden": 64, "heads": 4, "seq": 16, "vocab": 100},
        (16,),
    ),
}


def cpu(path: str) -> ort.InferenceSession:
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def data(n: int, row: tuple[int, ...], seed: int) -> Array:
    return np.random.RandomState(seed).standard_normal((n, *row)).astype(np.float32)


def token_ids(n: int, row: tuple[int, ...], seed: int) -> Array:
    """Ids around a vocabulary of 100, some outside it (the embedder clamps them)."""
    return np.random.RandomState(seed).randint(-20, 120, (n, *row)).astype(np.int64)


def load(path: str, table: BucketTable = TABLE, lock: Any = None) -> GraphSet:
    return GraphSet.load(path, 0, table, provider_options=OPTIONS, device_lock=lock)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_bucket_captures_and_replays_what_the_cpu_ep_computes(
    name: str, model_file: Callable[..., str]
) -> None:
    builder, kw, row = MODELS[name]
    make = token_ids if builder == "embedder" else data
    path = model_file(builder, **kw)
    gs = load(path, lock=threading.Lock())
    assert gs.capturable, gs.reason
    assert gs.captured and gs.stats().graphs.captured == TABLE.sizes
    assert gs.streamed  # copies on the session's own stream (user_compute_stream)
    ref = cpu(path)
    seed = 0
    for split in ([1], [2], [1, 2], [4], [2, 3], [8], [1, 1, 1, 1, 1], [3, 2, 2]):
        feeds = [{"INPUT0": make(n, row, seed := seed + 1)} for n in split]
        result = gs.run(feeds)
        assert result.replayed and result.bucket == TABLE.bucket_for(sum(split))
        for feed, n, (out,) in zip(feeds, split, result.outputs, strict=True):
            assert out.shape[0] == n  # padding trimmed
            np.testing.assert_allclose(out, ref.run(None, feed)[0], rtol=2e-3, atol=2e-3)
    stats = gs.stats().graphs
    assert sum(stats.replays.values()) == 8 and stats.eager == {} and stats.mismatches == 0


def test_each_replay_reads_the_inputs_copied_just_before_it(model_file: Callable[..., str]) -> None:
    """update_inplace then replay, back to back, many times in one bucket: every output must
    be that of its own input (a copy still in flight would show the previous batch's)."""
    path = model_file("mlp")
    gs = load(path)
    ref = cpu(path)
    for i in range(200):
        x = np.full((4, 256), float(i % 17) - 8.0, dtype=np.float32) + data(4, (256,), i)
        (out,) = gs.run([{"INPUT0": x}]).outputs[0]
        np.testing.assert_allclose(out, ref.run(None, {"INPUT0": x})[0], rtol=2e-3, atol=2e-3)


def test_bound_addresses_are_unchanged_after_1000_replays(model_file: Callable[..., str]) -> None:
    gs = load(model_file("mlp"))
    before = {b: gs.binding(b) for b in TABLE}
    for i in range(1000):
        gs.run([{"INPUT0": data(1 + i % 8, (256,), i)}])
    assert {b: gs.binding(b) for b in TABLE} == before
    assert all(t.shape[0] == b and t.address for b in TABLE for t in before[b])
    assert sum(gs.stats().graphs.replays.values()) == 1000


def test_a_rebind_is_refused_before_it_reaches_onnxruntime(model_file: Callable[..., str]) -> None:
    gs = load(model_file("mlp"))
    buf = gs.bucket(4)
    buf.inputs["INPUT0"] = ort.OrtValue.ortvalue_from_shape_and_type(
        [4, 256], np.float32, "cuda", 0
    )
    with pytest.raises(GraphMismatch, match="address"):
        gs.run([{"INPUT0": data(3, (256,), 0)}])
    assert gs.stats().graphs.mismatches == 1 and gs.registry.replays(4) == 0
    gs.run([{"INPUT0": data(2, (256,), 0)}])  # the other buckets still replay
    assert gs.registry.replays(2) == 1


def test_above_the_largest_bucket_is_eager_counted_and_correct(
    model_file: Callable[..., str],
) -> None:
    path = model_file("mlp")
    gs = load(path, BucketTable((1, 2, 4)))
    feeds = [{"INPUT0": data(3, (256,), 1)}, {"INPUT0": data(3, (256,), 2)}]
    result = gs.run(feeds)
    assert (result.replayed, result.bucket) == (False, None)
    for feed, (out,) in zip(feeds, result.outputs, strict=True):
        np.testing.assert_allclose(out, cpu(path).run(None, feed)[0], rtol=2e-3, atol=2e-3)
    gs.run([{"INPUT0": data(2, (256,), 3)}])  # replays still work after an eager run
    stats = gs.stats().graphs
    assert stats.eager == {None: 1} and stats.replays[2] == 1


def test_a_model_with_an_if_node_loads_without_graphs_and_says_why(
    model_file: Callable[..., str],
) -> None:
    path = model_file("with_if")
    gs = load(path)
    assert not gs.capturable and not gs.captured
    assert gs.reason is not None and "If" in gs.reason
    assert gs.session.get_providers()[0] == "CUDAExecutionProvider"
    x = np.array([[1.0, -2.0, 3.0, -4.0]], dtype=np.float32)
    result = gs.run([{"INPUT0": x}, {"INPUT0": -x}])
    assert (result.replayed, result.bucket) == (False, 2)
    np.testing.assert_array_equal(result.outputs[0][0], cpu(path).run(None, {"INPUT0": x})[0])
    assert gs.stats().graphs.eager == {2: 1}


def test_onnxruntime_refuses_control_flow_and_it_is_classified(
    model_file: Callable[..., str],
) -> None:
    """The same refusal without our onnx pre-check: onnxruntime's own error at session
    creation is recognised as 'cannot be captured', not as a load failure."""
    with pytest.raises(GraphsUnsupported, match="control-flow"):
        make_graph_session(model_file("with_if"), 0, 1)


def test_shape_arithmetic_left_on_the_cpu_still_captures(model_file: Callable[..., str]) -> None:
    """Reshape to [Shape(x)[0], -1], as exporters write it: the CUDA EP leaves the Shape ->
    Gather -> Concat nodes on the CPU, and onnxruntime (ALLOW_CPU_FOR_SHAPES, no Memcpy)
    captures such a graph; so must we, or most exported models would run without graphs."""
    path = model_file("flatten_dynamic")
    gs = load(path)
    assert gs.capturable and gs.captured, gs.reason
    ref = cpu(path)
    for seed, split in enumerate(([1], [3], [2, 2], [8], [1, 4, 2])):
        feeds = [{"INPUT0": data(n, (4, 8), 10 * seed + n)} for n in split]
        result = gs.run(feeds)
        assert result.replayed and result.bucket == TABLE.bucket_for(sum(split))
        for feed, (out,) in zip(feeds, result.outputs, strict=True):
            np.testing.assert_allclose(out, ref.run(None, feed)[0], rtol=2e-3, atol=2e-3)


def test_a_compute_node_on_the_cpu_loads_without_graphs_and_says_why(
    model_file: Callable[..., str],
) -> None:
    path = model_file("with_cpu_op")
    strict = ort.SessionOptions()
    strict.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    with pytest.raises(Exception, match="CPU"):  # the premise: Unique has no CUDA kernel
        ort.InferenceSession(path, strict, providers=[("CUDAExecutionProvider", {})])
    with pytest.raises(GraphsUnsupported, match="CPU EP"):
        make_graph_session(path, 0, 1)
    gs = load(path)
    assert not gs.capturable and not gs.captured
    assert gs.reason is not None and "CPU EP" in gs.reason
    assert gs.session.get_providers()[0] == "CUDAExecutionProvider"
    feeds = [{"INPUT0": data(n, (4,), n)} for n in (1, 3)]
    result = gs.run(feeds)
    assert (result.replayed, result.bucket) == (False, 4)
    # One eager run of 4 rows: its Unique saw both requests' rows, so the reference does too.
    joined = {"INPUT0": np.concatenate([f["INPUT0"] for f in feeds])}
    want = cpu(path).run(None, joined)[0]
    got = np.concatenate([out for (out,) in result.outputs])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_graph_and_eager_sessions_agree(model_file: Callable[..., str]) -> None:
    path = model_file("encoder", layers=2, hidden=64, heads=4, seq=16)
    graphs = load(path)
    eager = GraphSet.load(path, 0, TABLE, graphs=False)
    assert graphs.captured and eager.reason == "graphs disabled by configuration"
    feeds = [{"INPUT0": data(n, (16, 64), n)} for n in (1, 2, 2)]
    a = graphs.run(feeds)
    b = eager.run(feeds)
    assert a.replayed and not b.replayed
    for (x,), (y,) in zip(a.outputs, b.outputs, strict=True):
        # The eager session keeps the CUDA EP's default TF32 MatMuls (the graph session has
        # them off): the bench's tolerance, not the CPU comparisons' 2e-3.
        np.testing.assert_allclose(x, y, rtol=1e-2, atol=1e-2)


def test_large_requests_are_copied_each_to_their_row_and_the_padding_zeroed(
    model_file: Callable[..., str],
) -> None:
    """Requests of 64 KiB rows go to the bound buffer one copy each, on the session's stream,
    at their row offsets; the rows a fuller batch left are zeroed on the device."""
    width = 16384
    path = model_file("mlp", widths=(width, 64, 8))
    gs = load(path, BucketTable((4,)))
    assert gs.streamed
    ref = cpu(path)
    gs.run([{"INPUT0": data(4, (width,), 1)}])
    parts = [data(1, (width,), 2), data(2, (width,), 3)]
    result = gs.run([{"INPUT0": p} for p in parts])
    bound = gs.bucket(4).inputs["INPUT0"].numpy()
    np.testing.assert_array_equal(bound[:3], np.concatenate(parts))
    assert not bound[3:].any()
    for p, (out,) in zip(parts, result.outputs, strict=True):
        np.testing.assert_allclose(out, ref.run(None, {"INPUT0": p})[0], rtol=1e-2, atol=1e-2)


def test_outputs_come_back_from_the_device_straight_into_pinned_places(
    model_file: Callable[..., str],
) -> None:
    """`run(places=...)` on CUDA: each request's output rows are copied device to host into
    the page-locked array it names (as GraphModel names its answer's place in the pinned
    arena), and that array is the output; the batch's padding stays out of them."""
    from runtime.ipc.pinning import alloc_pinned

    width = 16384
    path = model_file("mlp", widths=(64, width))
    gs = load(path, BucketTable((4,)))
    assert gs.streamed
    ref = cpu(path)
    pinned = alloc_pinned(3 * width * 4 + 1024)
    try:
        memory = pinned.array
        memory[...] = 0  # cudaHostAlloc does not zero
        parts = [data(1, (64,), 4), data(2, (64,), 5)]
        places = [
            {"OUTPUT0": memory[: width * 4].view(np.float32).reshape(1, width)},
            {"OUTPUT0": memory[width * 4 : 3 * width * 4].view(np.float32).reshape(2, width)},
        ]
        result = gs.run([{"INPUT0": p} for p in parts], places=places)
        for p, place, (out,) in zip(parts, places, result.outputs, strict=True):
            assert out is place["OUTPUT0"]
            np.testing.assert_allclose(out, ref.run(None, {"INPUT0": p})[0], rtol=1e-2, atol=1e-2)
        assert not memory[3 * width * 4 :].any()  # nothing written past the last place
    finally:
        pinned.close()
