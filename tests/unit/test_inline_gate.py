"""Which calls run on a front connection's reader thread (runtime.engine.inline_gate).

While the reader runs a call, nothing else of that front is read. A model that was fast on
average ran every call there, its slow ones too: one Loop call whose trip count was large held
every other call of the front (other models' included) for its whole run, and theirs ran out
of deadline. These tests drive a real worker Connection over a socket pair with real models:
a call runs on the reader only when its time is known to be short.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from worker_frames import read_frame

from runtime.engine.inline_gate import (
    INLINE_BELOW_NS,
    LONG_CPU_NS,
    MAX_PARSED_BYTES,
    InlineGate,
    has_control_flow,
)
from runtime.ipc.protocol import (
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    Shutdown,
    TensorRef,
    encode,
)
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from runtime.worker_connection import Connection

F, I64 = TensorProto.FLOAT, TensorProto.INT64
ARENA = 64 << 20
OUT_AT, OUT_CAP = 32 << 20, 32 << 20  # inputs below, outputs above


def _save(graph: onnx.GraphProto, path: Path) -> str:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return str(path)


def loop_model(path: Path) -> str:
    """Y = X after N rounds of X*1+1: its time is set by the value of N."""
    one = helper.make_tensor("one", F, [], [1.0])
    body = helper.make_graph(
        [
            helper.make_node("Mul", ["x_in", "one"], ["x_mul"]),
            helper.make_node("Add", ["x_mul", "one"], ["x_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("iter", I64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_in", F, [4]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("x_out", F, [4]),
        ],
        initializer=[one],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["N", "", "X"], ["Y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("N", I64, []), helper.make_tensor_value_info("X", F, [4])],
        [helper.make_tensor_value_info("Y", F, [4])],
    )
    return _save(graph, path)


def identity_model(path: Path) -> str:
    """Y = X, any number of rows: its time is set by the size of X."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["X"], ["Y"])],
        "identity",
        [helper.make_tensor_value_info("X", F, ["n", 4])],
        [helper.make_tensor_value_info("Y", F, ["n", 4])],
    )
    return _save(graph, path)


def range_model(path: Path) -> str:
    """Y = sum(range(N)), no control flow: its time is set by the value of N."""
    graph = helper.make_graph(
        [
            helper.make_node("Range", ["zero", "N", "one"], ["r"]),
            helper.make_node("ReduceSum", ["r"], ["Y"], keepdims=0),
        ],
        "ranged",
        [helper.make_tensor_value_info("N", F, [])],
        [helper.make_tensor_value_info("Y", F, [])],
        initializer=[
            helper.make_tensor("zero", F, [], [0.0]),
            helper.make_tensor("one", F, [], [1.0]),
        ],
    )
    return _save(graph, path)


class Front:
    """The test's end of a worker Connection: calls written into the arena and sent, answers
    read back, and the thread each call ran on."""

    def __init__(self, worker: Worker) -> None:
        ours, self.sock = socket.socketpair()
        self.sock.settimeout(60)
        self.conn = Connection(worker, ours)
        self.buf = memoryview(bytearray(ARENA))
        # The arena's stand-in: process memory, nothing in /dev/shm to unlink.
        self.conn.arena = SimpleNamespace(buf=self.buf, unlink=lambda: None)  # type: ignore[assignment]
        self.ran_on: dict[int, str] = {}
        execute = self.conn._execute

        def recording(call: Infer, received_ns: int, *accepted: Any) -> InferDone:
            self.ran_on[call.call_id] = threading.current_thread().name
            return execute(call, received_ns, *accepted)

        self.conn._execute = recording  # type: ignore[method-assign]
        self.reader = threading.Thread(target=self.conn.run, name="reader", daemon=True)
        self.worker = worker
        self._ids = iter(range(1, 1 << 30))
        self._free = 0  # where the next call's inputs go

    def load(self, name: str, path: str) -> None:
        spec = LoadModel(1, name, 1, path, 0, ModelSignature((), ()))
        done = self.worker.load(spec, self.conn)
        assert done.code == Code.OK, done.message

    def call(self, name: str, inputs: dict[str, np.ndarray[Any, Any]]) -> Infer:
        """A call whose inputs lie in the arena after the previous call's (inputs are read in
        place: a call still queued or running must keep its own)."""
        nbytes = sum((x.nbytes + 63) // 64 * 64 for x in inputs.values())
        at = self._free if self._free + nbytes <= OUT_AT else 0
        self._free = at + nbytes
        refs = []
        for input_name, x in inputs.items():
            self.buf[at : at + x.nbytes] = x.tobytes()
            refs.append(
                TensorRef(
                    input_name, "FP32" if x.dtype == np.float32 else "INT64", x.shape, at, x.nbytes
                )
            )
            at += (x.nbytes + 63) // 64 * 64
        return Infer(next(self._ids), name, 1, tuple(refs), (), OUT_AT, OUT_CAP)

    def send(self, call: Infer) -> None:
        self.sock.sendall(encode(call))

    def answer(self) -> InferDone:
        done = read_frame(self.sock)
        assert isinstance(done, InferDone)
        assert done.code == Code.OK, done.message
        return done

    def run(self, call: Infer) -> str:
        """Send `call`, wait for its answer; the thread it ran on."""
        self.send(call)
        assert self.answer().call_id == call.call_id
        return self.ran_on[call.call_id]

    def warm(self, make: Callable[[], Infer]) -> None:
        """Run calls from `make` until the next one may run on the reader (a fast model's
        average falls under the budget within a few dozen calls)."""
        call = make()
        gate = self.worker.models[(call.name, call.version)].inline
        for _ in range(1000):
            if gate.admits(call):
                return
            self.run(call)
            call = make()
        raise AssertionError(f"{call.name} never became fast enough to run on the reader")


@pytest.fixture
def front(tmp_path: Path) -> Iterator[Front]:
    worker = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    f = Front(worker)
    f.reader.start()
    yield f
    f.sock.sendall(encode(Shutdown()))
    f.reader.join(30)
    f.sock.close()
    worker.close_lanes()


def loop_call(front: Front, n: int) -> Infer:
    return front.call("loop", {"N": np.array(n, np.int64), "X": np.zeros(4, np.float32)})


def test_a_long_loop_call_does_not_hold_another_models_call(front: Front, tmp_path: Path) -> None:
    """The reproducer of the review: a Loop model fast on average, one call with a large trip
    count, and meanwhile a call of another model of the same front. That call is answered
    while the Loop call still runs (it waited for the whole run)."""
    front.load("loop", loop_model(tmp_path / "loop" / "model.onnx"))
    front.load("identity", identity_model(tmp_path / "identity" / "model.onnx"))
    for _ in range(40):  # an average of a few µs: this model ran every call on the reader
        front.run(loop_call(front, 1))
    small = {"X": np.ones((1, 4), np.float32)}
    front.warm(lambda: front.call("identity", small))
    slow = loop_call(front, 2_000_000)  # about a second or more
    other = front.call("identity", small)
    front.send(slow)
    front.send(other)
    first, second = front.answer(), front.answer()
    assert (first.call_id, second.call_id) == (other.call_id, slow.call_id)
    assert front.ran_on[slow.call_id].startswith("lane-")  # on its lane: it has control flow


def test_a_call_larger_than_any_seen_fast_runs_on_the_pool(front: Front, tmp_path: Path) -> None:
    front.load("identity", identity_model(tmp_path / "identity" / "model.onnx"))
    small = {"X": np.ones((1, 4), np.float32)}
    assert front.run(front.call("identity", small)).startswith("lane-")  # not measured yet
    front.warm(lambda: front.call("identity", small))
    assert front.run(front.call("identity", small)) == "reader"
    large = {"X": np.ones((1 << 18, 4), np.float32)}  # 4 MiB
    assert front.run(front.call("identity", large)).startswith("lane-")


def test_after_one_long_call_on_the_reader_a_model_runs_on_the_pool(
    front: Front, tmp_path: Path
) -> None:
    """A model without control flow whose time follows an input's value (not its size): the
    first long call runs on the reader, and none after it, however fast they are again."""
    front.load("ranged", range_model(tmp_path / "ranged" / "model.onnx"))

    def call(n: float) -> Infer:
        return front.call("ranged", {"N": np.array(n, np.float32)})

    front.warm(lambda: call(1))
    assert front.run(call(2e7)) == "reader"  # 80 MB of range: tens of ms
    gate = front.worker.models[("ranged", 1)].inline
    assert gate.closed
    for _ in range(1000):  # until the average is back under the budget (it decided alone)
        if gate.avg_ns < INLINE_BELOW_NS:
            break
        front.run(call(1))
    assert gate.avg_ns < INLINE_BELOW_NS
    assert front.run(call(1)).startswith("lane-")


def _call(nbytes: int) -> Infer:
    return Infer(1, "m", 1, (TensorRef("X", "FP32", (nbytes // 4,), 0, nbytes),), (), 0, 0)


def test_the_gate_admits_sizes_seen_fast_while_the_average_is_low() -> None:
    gate = InlineGate(control_flow=False)
    assert not gate.admits(_call(16))  # nothing measured
    gate.measured(INLINE_BELOW_NS // 10, _call(16))
    assert gate.admits(_call(16))
    assert gate.admits(_call(8))
    assert not gate.admits(_call(32))
    gate.measured(INLINE_BELOW_NS, _call(32))  # over the budget: 32 bytes not known fast
    assert not gate.admits(_call(32))
    gate.measured(0, _call(32))
    assert gate.admits(_call(32))
    for _ in range(100):
        gate.measured(10 * INLINE_BELOW_NS, _call(16))
    assert not gate.admits(_call(16))  # the average is over the budget


def test_the_gate_closes_for_good_on_one_long_call() -> None:
    gate = InlineGate(control_flow=False)
    gate.measured(0, _call(16))
    gate.ran_inline(LONG_CPU_NS - 1, _call(16))
    assert gate.admits(_call(16))
    gate.ran_inline(LONG_CPU_NS, _call(16))
    for _ in range(100):
        gate.measured(0, _call(16))
    assert not gate.admits(_call(16))


def test_a_model_with_control_flow_never_runs_inline() -> None:
    gate = InlineGate(control_flow=True)
    gate.measured(0, _call(16))
    assert not gate.admits(_call(16))


def test_control_flow_is_read_from_the_graph(tmp_path: Path) -> None:
    assert has_control_flow(loop_model(tmp_path / "loop.onnx"))
    assert not has_control_flow(identity_model(tmp_path / "identity.onnx"))
    assert not has_control_flow(range_model(tmp_path / "ranged.onnx"))
    # An If inside a function counts too.
    graph = helper.make_graph(
        [helper.make_node("Wrapped", ["X"], ["Y"], domain="local")],
        "wrapped",
        [helper.make_tensor_value_info("X", F, [4])],
        [helper.make_tensor_value_info("Y", F, [4])],
    )
    branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y", F, [4])],
    )
    fn = helper.make_function(
        "local",
        "Wrapped",
        ["x"],
        ["y"],
        [
            helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
            helper.make_node("Cast", ["s"], ["c"], to=TensorProto.BOOL),
            helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=branch),
        ],
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
        functions=[fn],
    )
    onnx.save(model, str(tmp_path / "wrapped.onnx"))
    assert has_control_flow(str(tmp_path / "wrapped.onnx"))


def test_a_graph_that_cannot_be_read_cheaply_counts_as_control_flow(tmp_path: Path) -> None:
    big = tmp_path / "big.onnx"
    with big.open("wb") as f:
        f.truncate(MAX_PARSED_BYTES + 1)  # sparse: not parsed at all
    assert has_control_flow(str(big))
    assert has_control_flow(str(tmp_path / "missing.onnx"))
