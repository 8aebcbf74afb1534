"""A loaded model version: its onnxruntime session, signature, and one-call execution.

`execute` reads input tensors as zero-copy numpy views over the shared-memory arena, runs the
session, and writes outputs back into the arena (or inline if they do not fit the reserved
space). Time is measured per phase for Triton-style statistics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import onnxruntime as ort

from runtime.engine.batch_probe import (
    check_batches,
    follows_batch,
    made_up,
    probe_feeds,
    unsplit,
)
from runtime.engine.bound import run_bound
from runtime.engine.buckets import default_buckets
from runtime.engine.golden import GoldenMismatch, check_golden, load_golden
from runtime.engine.inline_gate import InlineGate, has_control_flow
from runtime.engine.regions import RegionError, RegionTable
from runtime.engine.run_deadlines import TERMINATED, RunWatch
from runtime.engine.session import device_index, make_session, signature_of
from runtime.engine.signature import reconcile
from runtime.ipc.dtypes import DTYPES, BytesDecodeError, decode_bytes_tensor, encode_bytes_tensor
from runtime.ipc.protocol import (
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    OutputData,
    TensorRef,
    Timings,
)
from runtime.ipc.shm import align_up

__all__ = ["ARENA", "BadInput", "LoadedModel", "arena_offsets", "execute_batch"]

log = logging.getLogger(__name__)


class BadInput(ValueError):
    pass


# The worker's one watch over runs with deadlines (runtime.engine.run_deadlines); it applies to
# models with control flow and to those slower than this on average.
RUN_WATCH: Final = RunWatch()
WATCH_ABOVE_NS: Final = 1_000_000


@dataclass(slots=True)
class LoadedModel:
    name: str
    version: int
    session: ort.InferenceSession
    signature: ModelSignature
    output_names: tuple[str, ...]
    input_types: dict[str, str]
    spec: LoadModel | None = None  # what it was loaded from (LoadModel.identity)
    # Which calls may run on a front's reader thread; without a graph to read: none.
    inline: InlineGate = field(default_factory=lambda: InlineGate(control_flow=True))
    device_memory: int | None = None  # bytes its load took on the device (None: CPU, unknown)
    device_id: int = 0  # the CUDA device its session runs on (0 on the CPU)
    # False once a batch's output did not have the batch's rows (execute_batch): from then on
    # its calls run one at a time.
    splits_batches: bool = True
    # Whether its graph has control flow (If/Loop/Scan): a call's time follows its data, up to
    # any length (runtime.engine.run_deadlines stops such runs at their deadline).
    control_flow: bool = True

    @classmethod
    def load(cls, spec: LoadModel, device: str, path: str | None = None) -> LoadedModel:
        """`path`: the file to load instead of spec.path (runtime.engine.reshape.model_file)."""
        file = path or spec.path
        session = make_session(file, device, spec.intra_op_threads)
        sig = reconcile(signature_of(session), spec.declared, spec.max_batch_size)
        control_flow = has_control_flow(file)
        model = cls(
            spec.name,
            spec.version,
            session,
            sig,
            tuple(t.name for t in sig.outputs),
            {t.name: t.datatype for t in sig.inputs},
            spec.identity(),
            InlineGate(control_flow=control_flow),
            device_id=device_index(device),
            control_flow=control_flow,
        )
        model.warm_up()
        if spec.golden_path:
            model.self_test(spec.golden_path)
        return model

    def warm_up(self) -> None:
        """Run the model at every batch size it will see (each bucket of
        `default_buckets(max_batch_size)`; once without a batch dimension), so that no request
        pays lazy initialisation. A batching version is checked there too: each output's first
        dimension must follow the batch (runtime.engine.batch_probe), or its calls run one at a
        time (`run_alone`), decided before any request is batched, where `execute_batch` would
        find it only on a batch whose rows the output does not match, after earlier batches
        that matched by chance were split wrongly. Inputs the signature leaves open (text,
        variable dimensions after the batch's) are made up for that check only: for a version
        that does not batch they would warm no shape its calls have."""
        max_batch = self.spec.max_batch_size if self.spec is not None else 0
        batching = self.spec is not None and self.spec.batching is not None
        names = list(self.output_names)
        inputs = self.signature.inputs
        if max_batch < 1:
            if not made_up(inputs):
                self.session.run(names, probe_feeds(inputs, None))
            return
        if made_up(inputs) and not (batching and max_batch > 1):
            return
        why = check_batches(
            lambda feeds: self.session.run(names, dict(feeds)),
            inputs,
            names,
            default_buckets(max_batch),
        )
        if why is not None:
            self.run_alone(why)

    def self_test(self, golden_path: str) -> None:
        """The golden request must give the golden answer (runtime/engine/golden.py);
        GoldenMismatch otherwise, which fails the load."""
        feeds, expected = load_golden(golden_path, self.signature)
        names = list(expected)
        try:
            results = self.session.run(names, feeds)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            raise GoldenMismatch(
                f"the model failed on the golden inputs: {lines[0] if lines else exc!r}"
            ) from None
        check_golden(expected, names, results)

    def stop_batching(self, output: str, shape: Sequence[int], rows: int) -> None:
        """A batch of `rows` rows gave `output` this shape: run calls one at a time now."""
        self.run_alone(unsplit(output, shape, rows))

    def run_alone(self, why: str) -> None:
        """Run calls one at a time from now on, and say `why` in the log (once)."""
        if self.splits_batches:
            self.splits_batches = False
            log.warning("model '%s' version %d: %s", self.name, self.version, why)

    def batch_of(self, call: Infer) -> int:
        """The batch size of an execution of `call` alone: its rows when the version has a
        batch dimension; 1 without one (max_batch_size 0), where a first dimension is the
        tensor's own and each request is one inference, as Triton's backends count it."""
        return call.rows if self.spec is None or self.spec.max_batch_size > 0 else 1

    def execute(
        self,
        call: Infer,
        buf: memoryview,
        received_ns: int,
        regions: RegionTable | None = None,
    ) -> InferDone:
        t0 = time.monotonic_ns()
        if call.deadline_ns and t0 > call.deadline_ns:
            return InferDone(call.call_id, Code.DEADLINE, "deadline expired before execution")
        if call.bound:
            return self._execute_bound(call, buf, received_ns, regions, t0)
        try:
            feeds = {ref.name: _input_array(ref, buf) for ref in call.inputs}
        except BadInput as exc:
            return InferDone(call.call_id, Code.BAD_INPUT, str(exc))
        names = [o.name for o in call.outputs] or list(self.output_names)
        t1 = time.monotonic_ns()
        # A run that may be long is stopped at its caller's deadline (runtime.engine
        # .run_deadlines): the front has answered DEADLINE_EXCEEDED by then, and the run
        # would hold a thread of its version's lane for as long as its data says.
        watched = call.deadline_ns and (self.control_flow or self.inline.avg_ns > WATCH_ABOVE_NS)
        try:
            if watched:
                key, options = RUN_WATCH.start(call.deadline_ns)
                try:
                    results = self.session.run(names, feeds, options)
                finally:
                    RUN_WATCH.done(key)
            else:
                results = self.session.run(names, feeds)
        except Exception as exc:
            if watched and TERMINATED in str(exc):
                return InferDone(call.call_id, Code.DEADLINE, "deadline expired as the model ran")
            return _run_error(call.call_id, exc)
        t2 = time.monotonic_ns()
        outputs = _write_outputs(names, results, self.signature, buf, call)
        t3 = time.monotonic_ns()
        self.inline.measured(t3 - t0, call)
        timings = Timings(t0 - received_ns, t1 - t0, t2 - t1, t3 - t2, self.batch_of(call))
        return InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings)

    def _execute_bound(
        self,
        call: Infer,
        buf: memoryview,
        received_ns: int,
        regions: RegionTable | None,
        t0: int,
    ) -> InferDone:
        """A call with tensors in CUDA shared memory (runtime.engine.bound)."""
        names = [o.name for o in call.outputs] or list(self.output_names)
        try:
            run = run_bound(
                self.session, call, buf, regions, names, self.signature, self.device_id, ARENA
            )
        except Exception as exc:
            return call_error(call.call_id, exc)
        timings = Timings(
            t0 - received_ns,
            run.t_bound - t0,
            run.t_ran - run.t_bound,
            run.t_done - run.t_ran,
            self.batch_of(call),
        )
        return InferDone(call.call_id, Code.OK, outputs=run.outputs, timings=timings)


def execute_batch(
    model: LoadedModel, calls: list[tuple[Infer, memoryview, int]]
) -> list[InferDone]:
    """Run several calls as one execution: their rows are concatenated along the batch
    dimension, the session runs once, and each call gets its rows back. Calls whose non-batch
    shapes or requested outputs differ cannot share an execution and run in separate groups;
    a version whose batch outputs could not be split by rows (`splits_batches`) runs each
    call alone. Answers are in the order of `calls`."""
    t0 = time.monotonic_ns()
    answers: list[InferDone | None] = [None] * len(calls)
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, (call, _buf, _recv) in enumerate(calls):
        if call.deadline_ns and t0 > call.deadline_ns:
            answers[i] = InferDone(call.call_id, Code.DEADLINE, "deadline expired in the queue")
            continue
        key = (
            (
                tuple((r.name, r.datatype, r.shape[1:]) for r in call.inputs),
                tuple(o.name for o in call.outputs),
            )
            if model.splits_batches
            else (i,)
        )
        groups.setdefault(key, []).append(i)
    for members in groups.values():
        if len(members) == 1:
            call, buf, recv = calls[members[0]]
            try:
                answers[members[0]] = model.execute(call, buf, recv)
            except Exception as exc:  # this call's alone: the batch's others are answered
                answers[members[0]] = call_error(call.call_id, exc)
            continue
        for i, done in zip(members, _run_group(model, [calls[i] for i in members]), strict=True):
            answers[i] = done
    return [a for a in answers if a is not None]


def _run_group(model: LoadedModel, calls: list[tuple[Infer, memoryview, int]]) -> list[InferDone]:
    # Its own start: a group's calls wait (queue) while the batch's earlier groups run.
    t0 = time.monotonic_ns()
    out: list[InferDone | None] = [None] * len(calls)
    feeds_each: list[dict[str, Any]] = []
    ok: list[int] = []
    for i, (call, buf, _recv) in enumerate(calls):
        try:
            feeds_each.append({ref.name: _input_array(ref, buf) for ref in call.inputs})
            ok.append(i)
        except Exception as exc:  # this call's only: the others of the group go on
            out[i] = call_error(call.call_id, exc)
    if ok:
        first = calls[ok[0]][0]
        names = [o.name for o in first.outputs] or list(model.output_names)
        feeds = {k: np.concatenate([f[k] for f in feeds_each]) for k in feeds_each[0]}
        rows = [calls[i][0].rows for i in ok]
        t1 = time.monotonic_ns()
        try:
            results = model.session.run(names, feeds)
        except Exception as exc:
            for i in ok:
                # One call's data can fail the whole execution (text a Cast cannot parse):
                # each runs again alone, so that only the calls that fail by themselves fail.
                call, buf, recv = calls[i]
                out[i] = (
                    model.execute(call, buf, recv) if len(ok) > 1 else _run_error(call.call_id, exc)
                )
            return [o for o in out if o is not None]
        t2 = time.monotonic_ns()
        total = sum(rows)
        bad = next((k for k, r in enumerate(results) if not follows_batch(r.shape, total)), None)
        if bad is not None and len(ok) > 1:
            # Not the batch dimension (a NonZero's count, a reduction over the batch): cut
            # by rows, one call would get another's results. Each runs alone and gets all
            # of its output, as without batching; the version batches no more, or a later
            # batch whose output happened to have as many rows would be cut all the same.
            model.stop_batching(names[bad], results[bad].shape, total)
            for i in ok:
                call, buf, recv = calls[i]
                out[i] = model.execute(call, buf, recv)
            return [o for o in out if o is not None]
        start = 0
        dones: list[tuple[int, tuple[OutputData, ...]]] = []
        for i, n in zip(ok, rows, strict=True):
            call, buf, _recv = calls[i]
            # One call: its outputs are all its own, whatever their first dimension.
            part = results if len(ok) == 1 else [r[start : start + n] for r in results]
            start += n
            try:
                dones.append((i, _write_outputs(names, part, model.signature, buf, call)))
            except Exception as exc:  # this call's only (outputs over its reserve, say)
                out[i] = call_error(call.call_id, exc)
        t3 = time.monotonic_ns()
        links = tuple(calls[i][0].span for i in ok if calls[i][0].span)
        for k, (i, outputs) in enumerate(dones):
            call, _buf, recv = calls[i]
            timings = Timings(
                t0 - recv,
                t1 - t0,
                t2 - t1,
                t3 - t2,
                total,
                1 if k == 0 else 0,
                links=links if k == 0 else (),
            )
            out[i] = InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings)
    return [o for o in out if o is not None]


def _input_array(ref: Any, buf: memoryview) -> np.ndarray[Any, Any]:
    count = math.prod(ref.shape)
    if ref.datatype == "BYTES":
        try:
            items = decode_bytes_tensor(buf[ref.offset : ref.offset + ref.nbytes], count)
            # onnxruntime's Python binding only takes str for string tensors.
            text = [b.decode("utf-8") for b in items]
        except BytesDecodeError as exc:
            raise BadInput(f"input '{ref.name}': malformed BYTES: {exc}") from exc
        except UnicodeDecodeError as exc:
            raise BadInput(
                f"input '{ref.name}': BYTES element is not valid UTF-8 "
                "(onnxruntime string tensors hold text)"
            ) from exc
        return np.array(text, dtype=object).reshape(ref.shape)
    dtype = np.dtype(DTYPES[ref.datatype].numpy)
    try:
        return np.frombuffer(buf, dtype=dtype, count=count, offset=ref.offset).reshape(ref.shape)
    except ValueError as exc:  # (the front refuses such shapes; a call is never trusted)
        raise BadInput(f"input '{ref.name}' with shape {list(ref.shape)}: {exc}") from None


def _write_outputs(
    names: Sequence[str],
    results: list[Any],
    sig: ModelSignature,
    buf: memoryview,
    call: Infer,
    placed: Collection[str] = (),
) -> tuple[OutputData, ...]:
    """Write the outputs into the call's reserved part of the arena where `arena_offsets` puts
    them, or inline in the answer when they do not fit. `placed`: outputs whose array already
    lies there (copied there from the device: GraphModel's `_arena_places`); their copy is
    skipped once their address is checked."""
    types = {t.name: t.datatype for t in sig.outputs}
    datas: list[tuple[str, str, tuple[int, ...], Any]] = []
    for name, arr in zip(names, results, strict=True):
        datatype = types[name]
        shape = tuple(map(int, arr.shape))
        if datatype == "BYTES":
            flat = [s.encode("utf-8") if isinstance(s, str) else bytes(s) for s in arr.ravel()]
            datas.append((name, datatype, shape, encode_bytes_tensor(flat)))
        else:
            datas.append((name, datatype, shape, np.ascontiguousarray(arr)))
    sizes = [len(d) if t == "BYTES" else d.nbytes for _, t, _, d in datas]
    out: list[OutputData] = []
    for (name, datatype, shape, data), nbytes, pos in zip(
        datas, sizes, arena_offsets(call, sizes), strict=True
    ):
        if pos is None:
            # Shapes the front could not predict (variable dims, text): carried inline.
            payload = data if isinstance(data, bytes) else data.tobytes()
            out.append(OutputData(name, datatype, shape, 0, nbytes, payload))
            continue
        if datatype == "BYTES":
            buf[pos : pos + nbytes] = data
        elif nbytes and not (name in placed and _lies_at(data, buf, pos)):
            buf[pos : pos + nbytes] = memoryview(data).cast("B")  # contiguous: one memcpy
        out.append(OutputData(name, datatype, shape, pos, nbytes))
    return tuple(out)


def arena_offsets(call: Infer, sizes: Sequence[int]) -> list[int | None]:
    """Where outputs of these byte sizes go in the call's reserved part of its lease: one after
    the other, each at an aligned offset; None for one that does not fit (carried inline in
    the answer; a later, smaller one may still fit)."""
    pos, end = call.out_offset, call.out_offset + call.out_capacity
    offsets: list[int | None] = []
    for nbytes in sizes:
        if pos + nbytes <= end:
            offsets.append(pos)
            pos += align_up(nbytes)
        else:
            offsets.append(None)
    return offsets


def _lies_at(data: np.ndarray[Any, Any], buf: memoryview, pos: int) -> bool:
    """Whether `data` starts at byte `pos` of `buf`."""
    return bool(data.ctypes.data == np.frombuffer(buf, np.uint8, 1, pos).ctypes.data)


class _Arena:
    """runtime.engine.bound.ArenaIO over this module's arena reader and writer."""

    @staticmethod
    def read(ref: TensorRef, buf: memoryview) -> np.ndarray[Any, Any]:
        return _input_array(ref, buf)

    @staticmethod
    def write(
        names: list[str], arrays: list[Any], sig: ModelSignature, buf: memoryview, call: Infer
    ) -> tuple[OutputData, ...]:
        return _write_outputs(names, arrays, sig, buf, call)


ARENA: Final = _Arena()


def call_error(call_id: int, exc: Exception) -> InferDone:
    """The answer to a call that raised: the client's mistake (a tensor that does not fit its
    CUDA region, malformed BYTES in the arena) is BAD_INPUT with its own message; anything
    else is what onnxruntime said."""
    if isinstance(exc, RegionError | BadInput):
        return InferDone(call_id, Code.BAD_INPUT, str(exc))
    return _run_error(call_id, exc)


def _run_error(call_id: int, exc: Exception) -> InferDone:
    text = str(exc).strip().splitlines()
    msg = text[0] if text else type(exc).__name__
    # onnxruntime reports problems in the caller's data (an index out of range, dims that do
    # not agree) as INVALID_ARGUMENT.
    if "INVALID_ARGUMENT" in msg or type(exc).__name__ == "InvalidArgument":
        return InferDone(call_id, Code.DATA_REJECTED, msg.replace("[ONNXRuntimeError] : 2 : ", ""))
    return InferDone(call_id, Code.MODEL_FAILED, msg.replace("[ONNXRuntimeError] : ", ""))
