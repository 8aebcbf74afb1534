"""GraphModel: the worker's per-version CUDA-graph serving thread, run on the CPU EP
(GraphSet(device_type="cpu") accepts graph ids and ignores them), through an arena buffer."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.engine.batcher import Batcher, Pending
from runtime.engine.buckets import BucketTable
from runtime.engine.graph_model import GraphModel, Queued, queue_call
from runtime.engine.graphs import GraphSet
from runtime.engine.session import make_session, signature_of
from runtime.ipc.pinning import CudaError
from runtime.ipc.protocol import (
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    OutputRequest,
    TensorRef,
)

DENSE = Path(__file__).resolve().parents[2] / "server" / "demo_repository" / "dense" / "1"


def _spec() -> LoadModel:
    return LoadModel(1, "dense", 1, str(DENSE / "model.onnx"), 8, ModelSignature((), ()))


def _start(delay_us: int = 2000) -> GraphModel:
    def make() -> GraphSet:
        sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
        gs = GraphSet(sess, BucketTable((1, 2, 4, 8)), signature_of(sess), device_type="cpu")
        gs.capture()
        return gs

    batcher: Batcher[Queued] = Batcher(8, max_queue_delay_ns=delay_us * 1000)
    return GraphModel.start(_spec(), make, batcher)


def _call(buf: memoryview, call_id: int, rows: int, offset: int) -> tuple[Infer, np.ndarray]:
    x = np.random.default_rng(call_id).random((rows, 256), dtype=np.float32)
    buf[offset : offset + x.nbytes] = x.tobytes()
    ref = TensorRef("INPUT0", "FP32", (rows, 256), offset, x.nbytes)
    out_at = offset + 65536
    return Infer(call_id, "dense", 1, (ref,), (OutputRequest("OUTPUT0"),), out_at, 65536), x


class _Answers(dict[int, InferDone]):
    """The answers of `expected` calls by call id: the calls' `answer`; `wait` for them all.
    `received` counts every answer, a second one to a call included."""

    def __init__(self, expected: int) -> None:
        super().__init__()
        self.expected = expected
        self.received = 0
        self._all = threading.Event()

    def __call__(self, d: InferDone) -> None:
        self.received += 1
        self[d.call_id] = d
        if len(self) == self.expected:
            self._all.set()

    def wait(self, timeout_s: float = 10) -> bool:
        return self._all.wait(timeout_s)


def test_concurrent_calls_batch_pad_and_trim() -> None:
    sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
    model = _start()
    arena = memoryview(bytearray(16 * 131072))
    calls = [_call(arena, i, rows, i * 131072) for i, rows in enumerate((1, 2, 3), start=1)]
    answers = _Answers(len(calls))

    now = time.monotonic_ns()
    for call, x in calls:
        model.submit(
            Pending(call.call_id, x.shape[0], now, payload=(answers, call, arena, now, None))
        )
    assert answers.wait()
    model.close()
    executions = 0
    for call, x in calls:
        d = answers[call.call_id]
        assert d.code == Code.OK, d.message
        out = d.outputs[0]
        got = np.frombuffer(arena, np.float32, count=out.nbytes // 4, offset=out.offset)
        want = sess.run(["OUTPUT0"], {"INPUT0": x})[0]
        np.testing.assert_allclose(got.reshape(out.shape), want, rtol=1e-5, atol=1e-5)
        assert d.timings is not None and d.timings.batch_size == 6  # one execution, 6 rows
        assert d.timings.padded_batch == 8 and d.timings.mode == "replay"
        executions += d.timings.executions
    assert executions == 1


def test_expired_call_is_never_computed() -> None:
    model = _start(delay_us=50_000)
    arena = memoryview(bytearray(262144))
    got: list[InferDone] = []
    call, _ = _call(arena, 7, 1, 0)
    now = time.monotonic_ns()
    expired = Infer(
        call.call_id,
        call.name,
        call.version,
        call.inputs,
        call.outputs,
        call.out_offset,
        call.out_capacity,
        now - 1,
    )
    model.submit(Pending(7, 1, now, now - 1, payload=(got.append, expired, arena, now, None)))
    model.close()
    assert [d.code for d in got] == [Code.DEADLINE]


def test_a_model_that_fails_to_load_raises_from_start() -> None:
    def make() -> GraphSet:
        raise FileNotFoundError("no model")

    with pytest.raises(FileNotFoundError):
        GraphModel.start(_spec(), make, Batcher(8))


def test_host_outputs_of_a_batch() -> None:
    """A replay copies to the host only the outputs some call reads there: none when every
    call places every output it asks for in a CUDA region."""
    from runtime.engine.graph_model import _host_outputs

    names = ("A", "B")

    def pending(*outputs: OutputRequest) -> Pending[Any]:
        call = Infer(1, "m", 1, (), outputs, 0, 0, bound=True)
        return Pending(1, 1, 0, payload=(None, call, None, 0, None))

    in_region = pending(OutputRequest("A", "g", 0, 8))
    assert _host_outputs([in_region], names) == set()
    assert _host_outputs([in_region, pending(OutputRequest("B"))], names) == {"B"}
    assert _host_outputs([in_region, pending()], names) == {"A", "B"}  # no list: all, arena


def test_region_calls_join_the_replay_and_their_outputs_land_in_the_region() -> None:
    """A call with its input and output in a client CUDA region (the CPU stand-in: host
    memory, memmove) is batched with an arena call into one replay; its output is copied from
    the bucket's output rows into the region, the arena call's into the arena. Every copy
    to or from a region holds the device lock (none may run during another's capture)."""
    import ctypes

    from runtime.engine.regions import RegionTable, host_copier

    sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
    device_lock = threading.RLock()
    unlocked: list[str] = []

    class CheckingCopier:
        device_type = host_copier.device_type

        def __getattr__(self, name: str) -> Any:
            def call(*args: Any) -> Any:
                if not device_lock._is_owned():  # type: ignore[attr-defined]
                    unlocked.append(name)
                return getattr(host_copier, name)(*args)

            return call

    def make() -> GraphSet:
        s = make_session(str(DENSE / "model.onnx"), "cpu", 1)
        gs = GraphSet(
            s,
            BucketTable((1, 2, 4, 8)),
            signature_of(s),
            device_type="cpu",
            copier=CheckingCopier(),  # type: ignore[arg-type]
            device_lock=device_lock,
        )
        gs.capture()
        return gs

    model = GraphModel.start(_spec(), make, Batcher(8, max_queue_delay_ns=20_000_000))
    device = np.zeros(65536, np.uint8)  # the "device allocation" behind the region

    class Memory:
        ptr, size, device_id, closed = device.ctypes.data, device.nbytes, 0, 0

        def close(self) -> None:
            Memory.closed += 1

    regions = RegionTable(lambda handle, dev, size: Memory(), host_copier)
    regions.register("g", bytes(64), 0, device.nbytes)
    x = np.random.default_rng(5).random((2, 256), dtype=np.float32)
    ctypes.memmove(device.ctypes.data + 1024, x.ctypes.data, x.nbytes)
    in_region = Infer(
        11,
        "dense",
        1,
        (TensorRef("INPUT0", "FP32", (2, 256), 1024, x.nbytes, "g"),),
        (OutputRequest("OUTPUT0", "g", 8192, 80),),
        0,
        0,
        bound=True,
    )
    arena = memoryview(bytearray(262144))
    plain, y = _call(arena, 12, 3, 0)
    answers = _Answers(2)

    now = time.monotonic_ns()
    model.submit(Pending(11, 2, now, payload=(answers, in_region, arena, now, regions)))
    model.submit(Pending(12, 3, now, payload=(answers, plain, arena, now, None)))
    assert answers.wait()
    model.close()
    d = answers[11]
    assert d.code == Code.OK, d.message
    assert d.timings is not None and (d.timings.mode, d.timings.batch_size) == ("replay", 5)
    (out,) = d.outputs
    assert (out.region, out.offset, out.nbytes, out.shape) == ("g", 8192, 80, (2, 10))
    got = np.frombuffer(device, np.float32, count=20, offset=8192).reshape(2, 10)
    want = sess.run(["OUTPUT0"], {"INPUT0": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    e = answers[12]
    assert e.code == Code.OK and e.outputs[0].region == ""
    got_plain = np.frombuffer(arena, np.float32, count=30, offset=e.outputs[0].offset)
    np.testing.assert_allclose(
        got_plain.reshape(3, 10), sess.run(["OUTPUT0"], {"INPUT0": y})[0], rtol=1e-5, atol=1e-5
    )
    regions.unregister("g")
    assert Memory.closed == 1  # released after the answer: closed by the unregister
    assert unlocked == []


class _Poisonable(GraphSet):
    """A GraphSet whose run fails on any batch holding a NaN: as onnxruntime fails a whole
    execution on one request's data (text a Cast cannot parse)."""

    def run(self, feeds: Any, *args: Any, **kwargs: Any) -> Any:
        if any(np.isnan(f["INPUT0"]).any() for f in feeds):
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : a NaN")
        return super().run(feeds, *args, **kwargs)


def _three_calls_in_one_batch(
    graphs_type: type[GraphSet] = GraphSet,
    model_type: type[GraphModel] = GraphModel,
    nan_in: int | None = None,
) -> tuple[Any, memoryview, list[tuple[Infer, np.ndarray]], dict[int, InferDone]]:
    """Calls 1-3, one row each, submitted together to a new model (the queue delay outlasts
    the three submits: one batch), call `nan_in` with a NaN; the session, the arena, the calls
    and their answers."""
    sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)

    def make() -> GraphSet:
        gs = graphs_type(sess, BucketTable((1, 2, 4, 8)), signature_of(sess), device_type="cpu")
        gs.capture()
        return gs

    model = model_type.start(_spec(), make, Batcher(8, max_queue_delay_ns=200_000_000))
    arena = memoryview(bytearray(16 * 131072))
    calls = [_call(arena, i, 1, i * 131072) for i in range(1, 4)]
    if nan_in is not None:
        poisoned = calls[nan_in - 1][0].inputs[0]
        np.frombuffer(arena, np.float32, 1, poisoned.offset)[:] = np.nan
    answers = _Answers(len(calls))

    now = time.monotonic_ns()
    for call, _x in calls:
        model.submit(Pending(call.call_id, 1, now, payload=(answers, call, arena, now, None)))
    assert answers.wait(), sorted(answers)
    model.close()
    return sess, arena, calls, answers


def _assert_answered(sess: Any, arena: memoryview, d: InferDone, x: np.ndarray, rows: int) -> None:
    """`d` holds the session's outputs for `x`, from an execution of `rows` rows."""
    assert d.code == Code.OK, d.message
    assert d.timings is not None and d.timings.batch_size == rows
    out = d.outputs[0]
    got = np.frombuffer(arena, np.float32, count=out.nbytes // 4, offset=out.offset)
    want = sess.run(["OUTPUT0"], {"INPUT0": x})[0]
    np.testing.assert_allclose(got.reshape(out.shape), want, rtol=1e-5, atol=1e-5)


def test_a_failed_batch_runs_each_call_alone_so_only_the_bad_one_fails() -> None:
    sess, arena, calls, answers = _three_calls_in_one_batch(_Poisonable, nan_in=2)
    bad = answers[2]
    assert (bad.code, bad.message) == (Code.MODEL_FAILED, "6 : RUNTIME_EXCEPTION : a NaN")
    for call, x in (calls[0], calls[2]):
        _assert_answered(sess, arena, answers[call.call_id], x, rows=1)  # ran alone


class _FailsToPlace(GraphModel):
    """Placing call 2's outputs fails, as a device-to-device copy into a client's CUDA region
    can (CudaError) after the batch itself ran."""

    failing = 2

    def _outputs(self, p: Pending[Queued], *args: Any, **kwargs: Any) -> Any:
        if p.payload[1].call_id == self.failing:
            raise CudaError("cudaMemcpyAsync failed: an illegal memory access was encountered")
        return super()._outputs(p, *args, **kwargs)


class _FirstFailsToPlace(_FailsToPlace):
    failing = 1  # the batch's first call


@pytest.mark.parametrize("model_type", [_FailsToPlace, _FirstFailsToPlace])
def test_a_call_whose_outputs_cannot_be_placed_fails_alone(model_type: type[GraphModel]) -> None:
    """The rest of its batch is answered, with their outputs (before, the error left the
    serving thread's batch and the calls after it waited for their deadlines), and one of
    them carries the batch's execution: when the failing call was the batch's first, none
    did, and the execution was counted nowhere."""
    sess, arena, calls, answers = _three_calls_in_one_batch(model_type=model_type)
    failing = model_type.failing  # type: ignore[attr-defined]
    bad = answers[failing]
    assert bad.code == Code.MODEL_FAILED
    assert bad.message == "cudaMemcpyAsync failed: an illegal memory access was encountered"
    good = [(call, x) for call, x in calls if call.call_id != failing]
    for call, x in good:
        _assert_answered(sess, arena, answers[call.call_id], x, rows=3)  # the batch ran once
    executions = [answers[call.call_id].timings.executions for call, _x in good]  # type: ignore[union-attr]
    assert sorted(executions) == [0, 1]


@pytest.mark.parametrize(
    ("capturable", "rows", "mode", "padded"),
    [
        (True, 3, "replay", 4),  # padded to its bucket
        (True, 9, "fallback", 0),  # over the largest bucket: eager on a version with graphs
        (False, 3, "eager", 0),  # a version without graphs: eager, never padded
    ],
)
def test_an_execution_says_how_it_ran_and_what_it_was_padded_to(
    capturable: bool, rows: int, mode: str, padded: int
) -> None:
    """What the front counts as graph replays and eager fallbacks, and the span's padded
    batch (before, an uncapturable version reported every run as a padded fallback, and a run
    over the largest bucket as neither)."""

    def make() -> GraphSet:
        sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
        gs = GraphSet(
            sess,
            BucketTable((1, 2, 4, 8)),
            signature_of(sess),
            device_type="cpu",
            capturable=capturable,
            reason=None if capturable else "a Loop node",
        )
        gs.capture()
        return gs

    model = GraphModel.start(_spec(), make, Batcher(16, max_queue_delay_ns=0))
    arena = memoryview(bytearray(4 * 131072))
    call, _x = _call(arena, 1, rows, 0)
    answers = _Answers(1)

    now = time.monotonic_ns()
    model.submit(Pending(1, rows, now, payload=(answers, call, arena, now, None)))
    assert answers.wait()
    model.close()
    (d,) = answers.values()
    assert answers.received == 1
    assert d.code == Code.OK, d.message
    assert d.timings is not None
    assert (d.timings.mode, d.timings.padded_batch, d.timings.batch_size) == (mode, padded, rows)


def test_call_errors_of_both_executors() -> None:
    """One mapping for plain and graph-served versions: the client's mistakes are BAD_INPUT
    with their own message, anything else is what onnxruntime said."""
    from runtime.engine.model import BadInput, call_error
    from runtime.engine.regions import RegionError

    assert call_error(1, RegionError("does not fit 'g'")).code == Code.BAD_INPUT
    bad = call_error(2, BadInput("malformed BYTES tensor 'T'"))
    assert (bad.code, bad.message) == (Code.BAD_INPUT, "malformed BYTES tensor 'T'")
    ort = call_error(3, RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : boom"))
    assert (ort.code, ort.message) == (Code.MODEL_FAILED, "6 : RUNTIME_EXCEPTION : boom")


def _streamed_model(tmp_path: Path, widths: tuple[int, ...]) -> tuple[GraphModel, Any, Any]:
    """A GraphModel on a streamed GraphSet (HostStream: the stream's copies as memmoves) of
    an MLP through `widths`; with the stream and a reference session."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from graph_models import cpu_session, gm

    from runtime.engine.copy_stream import HostStream

    path = tmp_path / "mlp.onnx"
    path.write_bytes(gm.mlp(widths).SerializeToString())
    stream = HostStream()

    def make() -> GraphSet:
        s = make_session(str(path), "cpu", 1)
        gs = GraphSet(s, BucketTable((4,)), signature_of(s), device_type="cpu", stream=stream)
        gs.capture()
        return gs

    spec = LoadModel(1, "mlp", 1, str(path), 4, ModelSignature((), ()))
    model = GraphModel.start(spec, make, Batcher(4, max_queue_delay_ns=50_000_000))
    stream.calls.clear()
    return model, stream, cpu_session(gm.mlp(widths))


@pytest.mark.parametrize(("width", "direct"), [(16384, True), (64, False)], ids=["64KiB", "256B"])
def test_large_outputs_are_copied_from_the_device_straight_into_the_arena(
    tmp_path: Path, width: int, direct: bool
) -> None:
    """Rows of 64 KiB or more come back from the device straight to each call's place in the
    arena (one copy per call, none on the host after); smaller ones through the staging."""
    model, stream, ref = _streamed_model(tmp_path, (16, width))
    arena = memoryview(bytearray(4 << 20))
    xs = {1: np.random.default_rng(1).random((1, 16), dtype=np.float32)}
    xs[2] = np.random.default_rng(2).random((2, 16), dtype=np.float32)
    answers = _Answers(2)

    now = time.monotonic_ns()
    for call_id, x in xs.items():
        at = call_id << 20
        arena[at : at + x.nbytes] = x.tobytes()
        ref_in = TensorRef("INPUT0", "FP32", x.shape, at, x.nbytes)
        wanted = (OutputRequest("OUTPUT0"),) if call_id == 2 else ()  # named or all: the same
        call = Infer(call_id, "mlp", 1, (ref_in,), wanted, at + 4096, 1 << 19)
        model.submit(Pending(call_id, x.shape[0], now, payload=(answers, call, arena, now, None)))
    assert answers.wait()
    model.close()
    assert stream.calls.count("to_host") == (2 if direct else 1)
    for call_id, x in xs.items():
        d = answers[call_id]
        assert d.code == Code.OK, d.message
        (out,) = d.outputs
        assert out.offset == (call_id << 20) + 4096 and out.nbytes == x.shape[0] * width * 4
        got = np.frombuffer(arena, np.float32, out.nbytes // 4, out.offset).reshape(out.shape)
        np.testing.assert_allclose(got, ref.run(None, {"INPUT0": x})[0], rtol=1e-4, atol=1e-5)


def test_a_call_routed_to_a_replaced_instance_goes_to_its_successor() -> None:
    """A reload swaps the version's instance, then closes the old one. A call whose lookup
    found the old one just before the swap met its closed batcher and was answered
    NOT_READY (UNAVAILABLE to the client): a hot swap that dropped a request. It now goes to
    the instance that serves the version now."""
    old, new = _start(), _start()
    old.close()
    arena = memoryview(bytearray(262144))
    call, x = _call(arena, 11, 1, 0)
    answers = _Answers(1)
    queue_call(old, call, answers, arena, None, time.monotonic_ns(), lambda: new)
    try:
        assert answers.wait()
    finally:
        new.close()
    d = answers[call.call_id]
    assert d.code == Code.OK, d.message
    sess = make_session(str(DENSE / "model.onnx"), "cpu", 1)
    out = d.outputs[0]
    got = np.frombuffer(arena, np.float32, count=out.nbytes // 4, offset=out.offset)
    want = sess.run(["OUTPUT0"], {"INPUT0": x})[0]
    np.testing.assert_allclose(got.reshape(out.shape), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("now", ["unloaded", "still listed"])
def test_a_call_to_a_version_being_unloaded_is_answered_not_ready(now: str) -> None:
    model = _start()
    model.close()
    arena = memoryview(bytearray(262144))
    call, _ = _call(arena, 12, 1, 0)
    answers = _Answers(1)
    current = (lambda: None) if now == "unloaded" else (lambda: model)
    queue_call(model, call, answers, arena, None, time.monotonic_ns(), current)
    assert answers[call.call_id].code == Code.NOT_READY
    assert answers[call.call_id].message == (
        "model 'dense' version 1 is being replaced or unloaded"
    )


class _SlowGraphs:
    """Stands in for a GraphSet whose load and captures take `load_s`."""

    def __init__(self) -> None:
        self.signature = ModelSignature((), ())
        self.closed = threading.Event()

    def close(self) -> None:
        self.closed.set()


def test_a_load_that_times_out_frees_what_it_loads_later() -> None:
    """The caller gives up (LoadDone INTERNAL: the capture took too long); the load went on
    and then served, for nobody, holding its session and graphs (device memory) for good."""
    made: list[_SlowGraphs] = []

    def make() -> Any:
        time.sleep(0.3)
        made.append(_SlowGraphs())
        return made[-1]

    batcher: Batcher[Queued] = Batcher(8)
    with pytest.raises(TimeoutError, match="capture of dense version 1 took too long"):
        GraphModel.start(_spec(), make, batcher, timeout_s=0.05)
    for _ in range(200):
        if made:
            break
        time.sleep(0.01)
    assert made and made[0].closed.wait(5)


def test_a_failed_self_test_frees_the_graphs_at_once(tmp_path: Path) -> None:
    made: list[_SlowGraphs] = []

    def make() -> Any:
        made.append(_SlowGraphs())
        return made[-1]

    spec = LoadModel(
        1,
        "dense",
        1,
        str(DENSE / "model.onnx"),
        8,
        ModelSignature((), ()),
        golden_path=str(tmp_path / "no-such-golden.npz"),
    )
    with pytest.raises(Exception):  # noqa: B017 - whatever the self-test raised
        GraphModel.start(spec, make, Batcher(8))
    assert made[0].closed.is_set()


def test_an_unexpected_failure_in_a_batch_answers_each_call_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug past the per-call handling (here: building the second call's timings) left the
    calls not yet answered waiting for ever, their leases held: the batcher only logs what
    its execute raised. They are answered INTERNAL; the one already answered is not again."""
    from runtime.engine import graph_model

    real = graph_model._padded
    seen = []

    def padded_failing_second(result: Any) -> int:
        seen.append(result)
        if len(seen) == 2:
            raise RuntimeError("a bug")
        return real(result)

    monkeypatch.setattr(graph_model, "_padded", padded_failing_second)
    model = _start(delay_us=50_000)
    arena = memoryview(bytearray(4 * 131072))
    calls = [_call(arena, i, 1, i * 131072) for i in (1, 2)]
    answers = _Answers(2)
    now = time.monotonic_ns()
    for call, _x in calls:
        model.submit(Pending(call.call_id, 1, now, payload=(answers, call, arena, now, None)))
    try:
        assert answers.wait()
        time.sleep(0.05)  # a second answer to either would come now
    finally:
        model.close()
    assert answers.received == 2
    assert answers[1].code == Code.OK
    assert answers[2].code == Code.INTERNAL
    assert answers[2].message == "the runtime worker failed the batch"
