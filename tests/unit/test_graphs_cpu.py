"""runtime.engine.graphs and .capturability without a GPU: capturability checks, and the whole
GraphSet path (static buffers, one IOBinding per bucket, staging, padding, registry check,
replay counters, the counted eager path) on onnxruntime's CPU EP, which accepts gpu_graph_id and
ignores it. Only the capture itself and device memory need tests/gpu."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from graph_models import cpu_session, gm, rows

from runtime.engine.buckets import BucketTable
from runtime.engine.capturability import (
    control_flow_nodes,
    control_flow_reason,
    signature_reason,
    specs_of,
)
from runtime.engine.graph_batch import BadBatch, HostBuffer
from runtime.engine.graph_registry import GraphMismatch
from runtime.engine.graphs import CaptureFailed, GraphSet, WrongThread
from runtime.engine.session import SessionError, make_graph_session, signature_of
from runtime.ipc.protocol import ModelSignature, TensorInfo

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

Array = npt.NDArray[Any]
ROOT = Path(__file__).resolve().parents[2]


def graph_set(model: Any, sizes: tuple[int, ...] = (1, 2, 4, 8), **kw: Any) -> GraphSet:
    sess = cpu_session(model)
    gs = GraphSet(sess, BucketTable(sizes), signature_of(sess), device_type="cpu", **kw)
    gs.capture()
    return gs


def two_in_two_out() -> Any:
    """A: FP32 [batch, 3], B: INT64 [batch, 2] -> SUM = A + 1 (FP32), TWICE = B * 2 (INT64)."""
    nodes = [
        helper.make_node("Add", ["A", "one"], ["SUM"]),
        helper.make_node("Mul", ["B", "two"], ["TWICE"]),
    ]
    inits = [
        helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]),
        helper.make_tensor("two", TensorProto.INT64, [], [2]),
    ]
    graph = helper.make_graph(
        nodes,
        "two",
        [
            helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("B", TensorProto.INT64, ["batch", 2]),
        ],
        [
            helper.make_tensor_value_info("SUM", TensorProto.FLOAT, ["batch", 3]),
            helper.make_tensor_value_info("TWICE", TensorProto.INT64, ["batch", 2]),
        ],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# ----------------------------------------------------------------------------- imports


def test_modules_import_without_cuda() -> None:
    """Both modules import on a CPU-only onnxruntime without loading cupy; pinning (an ipc
    module) does not load onnxruntime either."""
    code = (
        "import json, sys\n"
        "import runtime.ipc.pinning\n"
        "ort_after_pinning = 'onnxruntime' in sys.modules\n"
        "import runtime.engine.graphs\n"
        "print(json.dumps([ort_after_pinning, sorted(m for m in sys.modules"
        " if m.split('.')[0] in ('cupy', 'cupy_backends'))]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ort_loaded, cupy_modules = json.loads(proc.stdout)
    assert ort_loaded is False
    assert cupy_modules == []


# ----------------------------------------------------------------------------- capturability


def test_control_flow_detected_in_graph_subgraphs_and_functions() -> None:
    assert control_flow_nodes(gm.mlp()) == []
    assert control_flow_nodes(gm.encoder(1, 16, 2, 4)) == []
    assert control_flow_nodes(gm.with_if()) == ["If 'choose'"]

    # A Loop hidden inside the If's then-branch is found too.
    model = gm.with_if()
    if_node = model.graph.node[-1]
    then_branch = next(a for a in if_node.attribute if a.name == "then_branch").g
    body = helper.make_graph([], "body", [], [])
    then_branch.node.append(helper.make_node("Loop", ["", ""], [], name="inner", body=body))
    assert control_flow_nodes(model) == ["If 'choose'", "Loop 'inner'"]

    # And one in a model-local function.
    fn = helper.make_function(
        "local", "f", ["x"], ["y"], [helper.make_node("Scan", ["x"], ["y"], name="scan")], []
    )
    model.functions.append(fn)
    assert control_flow_nodes(model)[-1] == "Scan 'scan'"


def test_control_flow_reason_from_a_file(tmp_path: Path) -> None:
    assert control_flow_reason(gm.save(gm.mlp(), tmp_path / "mlp.onnx")) is None
    reason = control_flow_reason(gm.save(gm.with_if(), tmp_path / "if.onnx"))
    assert reason is not None and "If 'choose'" in reason and "cannot capture" in reason
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    assert control_flow_reason(garbage) is None  # onnxruntime reports the bad file itself


def sig(inputs: list[tuple[str, str, tuple[int, ...]]], outputs: Any = None) -> ModelSignature:
    outs = outputs or [("y", "FP32", (-1, 4))]
    return ModelSignature(
        tuple(TensorInfo(*t) for t in inputs), tuple(TensorInfo(*t) for t in outs)
    )


@pytest.mark.parametrize(
    ("signature", "expect"),
    [
        (sig([("x", "FP32", (-1, 4))]), None),
        (sig([("x", "FP32", (-1, 3, 224, 224)), ("m", "INT64", (-1, 7))]), None),
        (sig([("x", "BYTES", (-1, 1))]), "input 'x' is BYTES"),
        (sig([("x", "FP32", (-1, 4))], [("y", "BYTES", (-1,))]), "output 'y' is BYTES"),
        (sig([("x", "FP32", (-1, -1))]), "variable dimensions [-1, -1]"),
        (sig([("x", "FP32", (8, 4))]), "fixed first dimension 8"),
        (sig([("x", "FP32", ())]), "no batch dimension"),
        (sig([("x", "FP32", (-1, 4))], [("y", "FP32", (-1, -1))]), "output 'y' has variable"),
    ],
)
def test_signature_reason(signature: ModelSignature, expect: str | None) -> None:
    reason = signature_reason(signature)
    if expect is None:
        assert reason is None
    else:
        assert reason is not None and expect in reason


def test_specs_drop_the_batch_dimension() -> None:
    ins, outs = specs_of(sig([("x", "FP16", (-1, 3, 5))], [("y", "INT8", (-1, 2))]))
    assert (ins[0].name, ins[0].dtype, ins[0].row_shape, ins[0].row_nbytes) == (
        "x",
        np.dtype(np.float16),
        (3, 5),
        30,
    )
    assert (outs[0].dtype, outs[0].row_shape, outs[0].row_nbytes) == (np.dtype(np.int8), (2,), 2)


# ----------------------------------------------------------------------- GraphSet on the CPU EP


def test_every_bucket_is_captured_largest_first_with_its_own_binding() -> None:
    gs = graph_set(gm.mlp())
    assert gs.capturable and gs.captured and gs.reason is None
    assert gs.stats().graphs.captured == (1, 2, 4, 8)
    ids = {b: gs.bucket(b).graph_id for b in (1, 2, 4, 8)}
    assert ids == {1: 1, 2: 2, 4: 3, 8: 4}  # gpu_graph_id = index + 1
    for b in (1, 2, 4, 8):
        buf = gs.bucket(b)
        assert buf.run_options.get_run_config_entry("gpu_graph_id") == str(buf.graph_id)
        assert [tuple(v.shape()) for v in buf.inputs.values()] == [(b, 256)]
        assert [tuple(v.shape()) for v in buf.outputs.values()] == [(b, 10)]
    addresses = {gs.bucket(b).inputs["INPUT0"].data_ptr() for b in (1, 2, 4, 8)}
    assert len(addresses) == 4  # one static buffer per bucket


@pytest.mark.parametrize("split", [[1], [2], [3], [1, 1, 1], [2, 3], [4], [1, 2, 4, 1], [5, 3]])
def test_replay_matches_a_plain_run_and_trims_the_padding(split: list[int]) -> None:
    model = gm.mlp()
    gs = graph_set(model)
    ref = cpu_session(model)
    feeds = [{"INPUT0": rows(n, seed=i)} for i, n in enumerate(split)]
    result = gs.run(feeds)
    total = sum(split)
    assert result.rows == total
    assert result.bucket == gs.table.bucket_for(total)
    assert result.replayed
    assert len(result.outputs) == len(split)
    for feed, n, outs in zip(feeds, split, result.outputs, strict=True):
        (out,) = outs
        assert out.shape == (n, 10)  # padding rows trimmed
        want = ref.run(None, feed)[0]
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)
    assert gs.registry.replays(result.bucket or 0) == 1
    assert gs.stats().graphs.eager == {}


def test_a_one_input_model_takes_bare_arrays() -> None:
    model = gm.mlp()
    gs = graph_set(model, (4,))
    a, b = rows(1, seed=1), rows(3, seed=2)
    result = gs.run_arrays([a, b])
    assert (result.rows, result.bucket) == (4, 4)
    np.testing.assert_allclose(
        result.outputs[1][0], cpu_session(model).run(None, {"INPUT0": b})[0], rtol=1e-5, atol=1e-6
    )
    two = graph_set(two_in_two_out(), (4,))
    with pytest.raises(BadBatch, match="name them"):
        two.run_arrays([np.ones((1, 3), np.float32)])


def test_outputs_stay_valid_after_the_next_replay() -> None:
    """Outputs are host copies, not views of the bound buffers the next replay overwrites."""
    gs = graph_set(gm.mlp(), (2,))
    first = gs.run([{"INPUT0": rows(2, seed=1)}]).outputs[0][0]
    kept = first.copy()
    gs.run([{"INPUT0": rows(2, seed=2)}])
    np.testing.assert_array_equal(first, kept)


def test_multi_input_multi_output_dtypes_are_split_per_request() -> None:
    gs = graph_set(two_in_two_out(), (2, 4))
    a = [np.arange(3 * n, dtype=np.float32).reshape(n, 3) for n in (1, 2)]
    b = [np.arange(2 * n, dtype=np.int64).reshape(n, 2) + 10 for n in (1, 2)]
    result = gs.run([{"A": a[0], "B": b[0]}, {"A": a[1], "B": b[1]}])
    assert result.bucket == 4 and result.replayed
    assert gs.output_names == ("SUM", "TWICE")
    for i in range(2):
        total, twice = result.outputs[i]
        np.testing.assert_array_equal(total, a[i] + 1)
        np.testing.assert_array_equal(twice, b[i] * 2)
        assert twice.dtype == np.int64


def test_outputs_left_on_the_device_are_not_copied_to_the_host() -> None:
    """`host_outputs` names what comes back to the host; the other outputs (all placed in
    client CUDA regions, copied from `device_outputs`) come back as data-less placeholders of
    the right shape, and their bound buffers hold the answer."""
    gs = graph_set(two_in_two_out(), (2, 4))
    a = [np.arange(3 * n, dtype=np.float32).reshape(n, 3) for n in (1, 2)]
    b = [np.arange(2 * n, dtype=np.int64).reshape(n, 2) + 10 for n in (1, 2)]
    feeds = [{"A": a[0], "B": b[0]}, {"A": a[1], "B": b[1]}]
    result = gs.run(feeds, host_outputs={"SUM"})
    assert result.device_outputs is not None
    twice_buf = np.ctypeslib.as_array(
        (np.ctypeslib.ctypes.c_int64 * (4 * 2)).from_address(result.device_outputs["TWICE"])
    ).reshape(4, 2)
    np.testing.assert_array_equal(twice_buf[:3], np.concatenate(b) * 2)
    for i in range(2):
        total, twice = result.outputs[i]
        np.testing.assert_array_equal(total, a[i] + 1)
        assert total.strides[0] > 0  # a real copy
        assert (twice.shape, twice.dtype, twice.strides) == ((i + 1, 2), np.int64, (0, 0))
    nothing = gs.run(feeds, host_outputs=())
    assert all(o.strides == (0, 0) for outs in nothing.outputs for o in outs)


def test_bound_addresses_never_change_across_replays() -> None:
    gs = graph_set(gm.mlp(), (2, 4))
    before = {b: gs.binding(b) for b in (2, 4)}
    for i in range(50):
        gs.run([{"INPUT0": rows(1 + i % 4, seed=i)}])
    assert {b: gs.binding(b) for b in (2, 4)} == before
    stats = gs.stats().graphs
    assert stats.replays == {2: 26, 4: 24} and stats.mismatches == 0  # rows 1,2 | 3,4


def test_a_rebound_buffer_is_refused_before_the_replay() -> None:
    gs = graph_set(gm.mlp(), (1, 2))
    buf = gs.bucket(2)
    before = buf.outputs["OUTPUT0"].numpy().copy()
    buf.inputs["INPUT0"] = ort.OrtValue.ortvalue_from_shape_and_type([2, 256], np.float32)
    with pytest.raises(GraphMismatch, match="'INPUT0' address"):
        gs.run([{"INPUT0": rows(2)}])
    np.testing.assert_array_equal(buf.outputs["OUTPUT0"].numpy(), before)  # nothing ran
    stats = gs.stats().graphs
    assert stats.mismatches == 1 and stats.replays[2] == 0
    gs.run([{"INPUT0": rows(1)}])  # other buckets are unaffected
    assert gs.registry.replays(1) == 1


def test_a_rebound_output_is_refused_too() -> None:
    """The replay knows the captured OrtValues by identity; any replaced one, input or output,
    is read back and checked."""
    gs = graph_set(gm.mlp(), (2,))
    gs.bucket(2).outputs["OUTPUT0"] = ort.OrtValue.ortvalue_from_shape_and_type([2, 10], np.float32)
    with pytest.raises(GraphMismatch, match="'OUTPUT0' address"):
        gs.run([{"INPUT0": rows(2)}])


class CountingSession:
    """A CPU session seen through a wrapper of our own, counting its IOBinding runs."""

    def __init__(self, sess: ort.InferenceSession) -> None:
        self._inner = sess
        self.runs = 0

    def io_binding(self) -> Any:
        return self._inner.io_binding()

    def run_with_iobinding(self, binding: Any, run_options: ort.RunOptions) -> None:
        self.runs += 1
        self._inner.run_with_iobinding(binding, run_options)

    def run(self, *args: Any) -> Any:
        return self._inner.run(*args)


def test_a_replay_goes_through_the_session_object_unless_it_is_onnxruntimes_own() -> None:
    """A real InferenceSession replays through its native method (its wrapper's WebGPU
    bookkeeping skipped); any other session object keeps its own run_with_iobinding."""
    sess = cpu_session(gm.mlp())
    fake: Any = CountingSession(sess)
    gs = GraphSet(fake, BucketTable((2,)), signature_of(sess), device_type="cpu")
    gs.capture()
    captured = fake.runs
    x = rows(2, seed=3)
    (out,) = gs.run([{"INPUT0": x}]).outputs[0]
    assert fake.runs == captured + 1
    np.testing.assert_allclose(out, sess.run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6)


def test_above_the_largest_bucket_runs_eagerly_and_is_counted() -> None:
    model = gm.mlp()
    gs = graph_set(model, (1, 2))
    feeds = [{"INPUT0": rows(2, seed=1)}, {"INPUT0": rows(3, seed=2)}]
    result = gs.run(feeds)
    assert (result.bucket, result.replayed, result.rows) == (None, False, 5)
    ref = cpu_session(model)
    for feed, (out,) in zip(feeds, result.outputs, strict=True):
        np.testing.assert_allclose(out, ref.run(None, feed)[0], rtol=1e-5, atol=1e-6)
    stats = gs.stats().graphs
    assert stats.eager == {None: 1} and stats.replays == {1: 0, 2: 0}


def test_a_model_that_cannot_be_captured_runs_eagerly_counted_per_bucket() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "dyn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    sess = cpu_session(model)
    gs = GraphSet(sess, BucketTable((1, 2, 4)), signature_of(sess), device_type="cpu")
    assert not gs.capturable
    assert gs.reason is not None and "variable dimensions" in gs.reason
    gs.capture()  # a no-op, not an error
    assert not gs.captured
    x = np.array([[-1.0, 2.0, -3.0]], dtype=np.float32)
    result = gs.run([{"x": x}, {"x": x}])
    assert (result.bucket, result.replayed) == (2, False)
    np.testing.assert_array_equal(result.outputs[1][0], np.maximum(x, 0))
    gs.run([{"x": np.ones((9, 5), np.float32)}])
    stats = gs.stats()
    assert (stats.capturable, stats.graphs.eager) == (False, {2: 1, None: 1})
    assert stats.graphs.captured == ()


def test_graphs_off_by_choice_reports_its_reason() -> None:
    sess = cpu_session(gm.mlp())
    gs = GraphSet(
        sess, BucketTable((1, 2)), signature_of(sess), device_type="cpu", capturable=False
    )
    assert (gs.capturable, gs.reason) == (False, "graphs disabled")
    gs = GraphSet(sess, BucketTable(()), signature_of(sess), device_type="cpu")
    assert gs.reason == "the bucket table is empty"
    assert gs.run([{"INPUT0": rows(3)}]).replayed is False
    assert gs.stats().graphs.eager == {None: 1}


def test_a_request_filling_its_bucket_skips_the_staging_copy_when_pinned() -> None:
    model = gm.mlp()
    gs = graph_set(model, (4,))
    x = rows(4, seed=7)
    direct = gs.run([{"INPUT0": x}], inputs_pinned=True)
    staged = gs.run([{"INPUT0": x}])
    np.testing.assert_array_equal(direct.outputs[0][0], staged.outputs[0][0])
    np.testing.assert_allclose(
        direct.outputs[0][0], cpu_session(model).run(None, {"INPUT0": x})[0], rtol=1e-5, atol=1e-6
    )


def test_staging_comes_from_the_host_allocator_once_per_input() -> None:
    sizes: list[int] = []

    class Buf:
        def __init__(self, n: int) -> None:
            self.array = np.zeros(n, np.uint8)
            self.pinned = False
            self.closed = False

        def close(self) -> None:
            self.closed = True

    made: list[Buf] = []

    def alloc(n: int) -> HostBuffer:
        sizes.append(n)
        made.append(Buf(n))
        return made[-1]

    gs = graph_set(two_in_two_out(), (2, 4), host_alloc=alloc)
    assert sorted(sizes) == sorted([4 * 3 * 4, 4 * 2 * 8])  # largest bucket x row bytes
    gs.run([{"A": np.ones((3, 3), np.float32), "B": np.ones((3, 2), np.int64)}])
    assert len(made) == 2
    gs.close()
    assert all(b.closed for b in made)
    with pytest.raises(RuntimeError, match="closed"):
        gs.run([{"A": np.ones((1, 3), np.float32), "B": np.ones((1, 2), np.int64)}])


def test_every_gpu_step_takes_the_device_lock_once() -> None:
    """A plain (non-reentrant) lock: a nested acquisition would deadlock, so count them."""

    class CountingLock:
        def __init__(self) -> None:
            self.lock = threading.Lock()
            self.entries = 0

        def __enter__(self) -> None:
            assert self.lock.acquire(timeout=5), "nested acquisition of the device lock"
            self.entries += 1

        def __exit__(self, *exc: object) -> None:
            self.lock.release()

    lock = CountingLock()
    gs = graph_set(gm.mlp(), (1, 2), device_lock=lock)
    assert lock.entries == 1  # the whole capture, once
    gs.run([{"INPUT0": rows(2)}])  # replay
    gs.run([{"INPUT0": rows(3)}])  # eager, above the largest bucket
    gs.close()
    assert lock.entries == 4


def test_close_frees_the_session_inside_the_device_lock() -> None:
    """The session (its cudaFree, its graphs) goes at close, under the lock; not wherever the
    last reference to the GraphSet happens to be dropped."""
    freed_in_lock: list[bool] = []

    class WatchingLock:
        held = False

        def __enter__(self) -> None:
            self.held = True

        def __exit__(self, *exc: object) -> None:
            self.held = False

    lock = WatchingLock()
    sess = cpu_session(gm.mlp())
    gs = GraphSet(
        sess, BucketTable((1, 2)), signature_of(sess), device_type="cpu", device_lock=lock
    )
    gs.capture()
    # The wrapper and onnxruntime's native session, which the replays call directly.
    weakref.finalize(sess, lambda: freed_in_lock.append(lock.held))
    weakref.finalize(sess._sess, lambda: freed_in_lock.append(lock.held))
    del sess
    gs.run([{"INPUT0": rows(2)}])
    assert freed_in_lock == []
    gs.close()
    assert freed_in_lock == [True, True]
    with pytest.raises(RuntimeError, match="closed"):
        _ = gs.session


def test_replays_stay_on_the_capturing_thread() -> None:
    gs = graph_set(gm.mlp(), (1, 2))
    errors: list[BaseException] = []

    def other() -> None:
        try:
            gs.run([{"INPUT0": rows(1)}])
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], WrongThread)
    assert gs.registry.replays(1) == 0


def test_run_before_capture_and_capture_twice_are_refused() -> None:
    sess = cpu_session(gm.mlp())
    gs = GraphSet(sess, BucketTable((1, 2)), signature_of(sess), device_type="cpu")
    with pytest.raises(RuntimeError, match="capture"):
        gs.run([{"INPUT0": rows(1)}])
    gs.capture()
    with pytest.raises(RuntimeError, match="already captured"):
        gs.capture()


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        ([], "at least one request"),
        ([{"WRONG": rows(1)}], "has inputs"),
        ([{"INPUT0": rows(1).astype(np.float64)}], "is float64"),
        ([{"INPUT0": rows(1, width=255)}], "has shape"),
        ([{"INPUT0": np.zeros(256, np.float32)}], "has shape"),
        ([{"INPUT0": np.zeros((0, 256), np.float32)}], "no rows"),
    ],
)
def test_bad_batches_are_refused_with_a_reason(feeds: list[dict[str, Array]], match: str) -> None:
    gs = graph_set(gm.mlp(), (1, 2))
    with pytest.raises(BadBatch, match=match):
        gs.run(feeds)
    assert gs.stats().graphs.replays == {1: 0, 2: 0}


def test_inputs_of_one_request_must_agree_on_rows() -> None:
    gs = graph_set(two_in_two_out(), (4,))
    with pytest.raises(BadBatch, match="disagree"):
        gs.run([{"A": np.ones((2, 3), np.float32), "B": np.ones((3, 2), np.int64)}])


class FailingCapture:
    """A CPU session whose capturing run for one gpu_graph_id fails, as a CUDA capture can."""

    def __init__(self, sess: ort.InferenceSession, fail_id: str) -> None:
        self._sess = sess
        self._fail_id = fail_id

    def io_binding(self) -> Any:
        return self._sess.io_binding()

    def run_with_iobinding(self, binding: Any, run_options: ort.RunOptions) -> None:
        if run_options.get_run_config_entry("gpu_graph_id") == self._fail_id:
            raise RuntimeError("CUDA failure 900: operation not permitted when stream is capturing")
        self._sess.run_with_iobinding(binding, run_options)

    def run(self, *args: Any) -> Any:
        return self._sess.run(*args)


def test_a_failed_capture_names_the_bucket() -> None:
    sess = cpu_session(gm.mlp())
    fake: Any = FailingCapture(sess, fail_id="2")
    gs = GraphSet(fake, BucketTable((1, 4, 8)), signature_of(sess), device_type="cpu")
    with pytest.raises(CaptureFailed, match=r"bucket 4 \(gpu_graph_id 2\).*900"):
        gs.capture()
    assert gs.stats().graphs.captured == (8,)  # largest first: 8 was done, 4 failed
    assert not gs.captured


def test_timings_add_up() -> None:
    gs = graph_set(gm.mlp(), (4,))
    t = gs.run([{"INPUT0": rows(3)}]).timings
    assert min(t.gather_ns, t.h2d_ns, t.run_ns, t.d2h_ns) >= 0
    assert t.total_ns == t.gather_ns + t.h2d_ns + t.run_ns + t.d2h_ns > 0


# ----------------------------------------------------------------------- loading on a CPU build


needs_cpu_build = pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(),
    reason="checks the behaviour of a CPU-only onnxruntime build",
)


@needs_cpu_build
def test_make_graph_session_on_a_cpu_build_is_a_clear_session_error(tmp_path: Path) -> None:
    path = str(gm.save(gm.mlp(), tmp_path / "m.onnx"))
    with pytest.raises(SessionError, match="CUDA graphs need onnxruntime-gpu"):
        make_graph_session(path, 0, 1)


@needs_cpu_build
@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider'")
@pytest.mark.parametrize("model", ["mlp", "with_if"])
def test_load_on_a_cpu_build_fails_as_a_load_error_not_a_crash(tmp_path: Path, model: str) -> None:
    path = str(gm.save(getattr(gm, model)(), tmp_path / "m.onnx"))
    with pytest.raises(SessionError):
        GraphSet.load(path, 0, BucketTable((1, 2)))


def test_rows_in_device_memory_share_a_replay_with_host_rows() -> None:
    """Rows held in a client CUDA region (DeviceRows; host memory with the CPU copier here) are
    copied into the bucket's bound buffer beside host rows, the padding is zeroed even after a
    fuller batch left data there, and each request's output rows sit at its row offset of the
    bound output buffer (where region outputs are copied from)."""
    from runtime.engine.device_rows import DeviceRows
    from runtime.engine.regions import host_copier

    model = gm.mlp()
    gs = graph_set(model, (4, 8), copier=host_copier)
    ref = cpu_session(model)
    gs.run([{"INPUT0": rows(8, seed=9)}])  # leaves non-zero rows 5..7 in bucket 8's buffer
    a, b, c = rows(2, seed=1), rows(1, seed=2), rows(2, seed=3)
    region = np.ascontiguousarray(np.concatenate([c, a]))  # the "device" allocation
    feeds = [
        {"INPUT0": DeviceRows(region.ctypes.data + c.nbytes, a.shape, a.dtype)},
        {"INPUT0": b},
        {"INPUT0": DeviceRows(region.ctypes.data, c.shape, c.dtype)},
    ]
    result = gs.run(feeds)
    assert (result.rows, result.bucket, result.replayed) == (5, 8, True)
    bound = gs.bucket(8).inputs["INPUT0"].numpy()
    np.testing.assert_array_equal(bound[:5], np.concatenate([a, b, c]))
    assert not bound[5:].any()  # padding zeroed
    assert result.device_outputs is not None
    out_buf = np.ctypeslib.as_array(
        (np.ctypeslib.ctypes.c_float * (8 * 10)).from_address(result.device_outputs["OUTPUT0"])
    ).reshape(8, 10)
    row0 = 0
    for x, outs in zip((a, b, c), result.outputs, strict=True):
        want = ref.run(None, {"INPUT0": x})[0]
        np.testing.assert_allclose(outs[0], want, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out_buf[row0 : row0 + len(x)], want, rtol=1e-5, atol=1e-6)
        row0 += len(x)
    assert gs.output_row_nbytes == {"OUTPUT0": 40}
    assert gs.replays(5) and gs.replays(8) and not gs.replays(9)
    with pytest.raises(BadBatch, match="never eagerly"):  # above the largest bucket
        gs.run([{"INPUT0": DeviceRows(region.ctypes.data, (9, 256), a.dtype)}])
    no_copier = graph_set(model, (4,))
    with pytest.raises(BadBatch, match="no copier"):
        no_copier.run([feeds[0]])
