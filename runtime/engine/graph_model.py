"""A model version served from CUDA graphs: its GraphSet, its batcher, and its one thread.

onnxruntime keeps captured graphs in the capturing thread's context, so one thread per version
does everything: load and capture every bucket (before the version is READY), then run the
batching loop; each batch is padded to its bucket and replayed, or runs on the counted eager
path. Calls are answered from that thread into each caller's arena. With `GraphSet(device_type=
"cpu")` the same code runs on the CPU EP (graph ids accepted and ignored), which is how the CPU
test suite exercises it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection
from typing import Any

import numpy as np

from runtime.engine.batch_probe import RUNS_ALONE, check_batches, unchecked
from runtime.engine.batcher import Batcher, BatcherClosed, Idle, Pending, QueueFull
from runtime.engine.bound import hold_outputs, place_outputs, region_input, run_bound
from runtime.engine.buckets import default_buckets
from runtime.engine.device_rows import DeviceRows
from runtime.engine.golden import check_golden, load_golden
from runtime.engine.graph_batch import BadBatch, BatchResult, UnsplitOutput
from runtime.engine.graphs import DIRECT_MIN_BYTES, GraphSet
from runtime.engine.model import (
    ARENA,
    _input_array,
    _run_error,
    _write_outputs,
    arena_offsets,
    call_error,
)
from runtime.engine.regions import Held, RegionTable, hold
from runtime.ipc.protocol import (
    Code,
    Infer,
    InferDone,
    LoadModel,
    ModelSignature,
    OutputData,
    Timings,
)

__all__ = ["GraphModel", "Queued", "queue_call"]

log = logging.getLogger(__name__)

# What a queued call carries: (answer callback, the call, the arena, when it arrived, the
# CUDA shared-memory regions of its front).
Queued = tuple[Callable[[InferDone], None], Infer, memoryview, int, RegionTable | None]


class GraphModel:
    """Start with `GraphModel.start(...)`: returns once every bucket is captured (or raises
    what the load raised); then `submit` calls and `close()` to drain and free."""

    def __init__(self, spec: LoadModel, batcher: Batcher[Queued]) -> None:
        self.name = spec.name
        self.version = spec.version
        self.spec = spec
        self.batcher = batcher
        self.graphs: GraphSet | None = None
        self.signature: ModelSignature | None = None
        self.device_memory: int | None = None  # bytes its load took on the device (None: unknown)
        self._thread: threading.Thread | None = None
        self.idle: Idle | None = None
        # False once a batch's output did not have the batch's rows: calls run one at a time.
        self.splits_batches = True

    @classmethod
    def start(
        cls,
        spec: LoadModel,
        make_graphs: Callable[[], GraphSet],
        batcher: Batcher[Queued],
        timeout_s: float = 600.0,
        idle: Callable[[GraphModel], Idle] | None = None,
    ) -> GraphModel:
        """`idle(model)`: where the serving thread waits between batches (the batcher's
        condition if None; runtime.channels.Waker for a version with direct channels)."""
        model = cls(spec, batcher)
        model.idle = None if idle is None else idle(model)
        loaded = threading.Event()
        failure: list[BaseException] = []
        # Set (under `decided`) by a caller that stopped waiting: the load, when it ends,
        # frees what it made instead of serving a version nobody will route to (on a GPU, its
        # session and captured graphs would hold device memory for the process's life).
        abandoned = False
        decided = threading.Lock()

        def serve() -> None:
            try:
                try:
                    model.graphs = make_graphs()  # loads and captures on this thread
                    model.signature = model.graphs.signature
                    model._check_batches()
                    if spec.golden_path:
                        model._self_test(spec.golden_path)
                except BaseException as exc:
                    if model.graphs is not None:  # the self-test failed: free its graphs now
                        model.graphs.close()
                    failure.append(exc)
                    loaded.set()
                    return
                with decided:
                    if abandoned:
                        log.warning(
                            "%s version %d: loaded after its load timed out; freed",
                            spec.name,
                            spec.version,
                        )
                        model.graphs.close()
                        return
                    loaded.set()
                try:
                    batcher.run(model._run_batch, model._expire, model.idle)
                finally:
                    model.graphs.close()
            finally:
                if model.idle is not None:
                    model.idle.close()

        model._thread = threading.Thread(
            target=serve, daemon=True, name=f"graphs-{spec.name}-{spec.version}"
        )
        model._thread.start()
        if not loaded.wait(timeout_s):
            with decided:
                if not loaded.is_set():
                    abandoned = True
            if abandoned:
                raise TimeoutError(f"capture of {spec.name} version {spec.version} took too long")
        if failure:
            raise failure[0]
        return model

    @property
    def reason(self) -> str | None:
        """Why this version runs without graphs (None: every bucket is captured)."""
        return None if self.graphs is None else self.graphs.reason

    def submit(self, item: Pending[Queued]) -> None:
        self.batcher.submit(item)

    def close(self) -> None:
        """Drain the queue (calls already routed here finish), then free the graphs."""
        self.batcher.close()
        if self._thread is not None:
            self._thread.join(30)

    # ------------------------------------------------------------------ on the serving thread

    def _self_test(self, path: str) -> None:
        assert self.graphs is not None and self.signature is not None
        feeds, expected = load_golden(path, self.signature)
        result = self.graphs.run([feeds])
        names = list(self.graphs.output_names)
        wanted = [n for n in names if n in expected]
        outs = result.outputs[0]
        check_golden(expected, wanted, [outs[names.index(n)] for n in wanted])

    def _expire(self, p: Pending[Queued]) -> None:
        answer, call, _buf, _recv, _regions = p.payload
        answer(InferDone(call.call_id, Code.DEADLINE, "deadline expired while queued"))

    def _run_batch(self, batch: list[Pending[Queued]]) -> None:
        """Run one batch; every call gets exactly one answer. The known failures (a call's
        input, its region, its outputs; a batch that fails) are answered per call where they
        happen. Anything else, a bug, would leave the batch's unanswered calls waiting for
        ever (the batcher only logs what its execute raised) with their arena leases held:
        those are answered INTERNAL here. Each answer goes through a once-only wrapper, so
        none is answered twice (a second answer would return its lease twice)."""
        answered: set[int] = set()
        tracked = [_answer_once(p, answered) for p in batch]
        try:
            self._run_tracked(tracked)
        except Exception:
            log.exception(
                "model '%s' version %d: a batch of %d call(s) failed unexpectedly",
                self.name,
                self.version,
                len(batch),
            )
            for p in tracked:
                p.payload[0](
                    InferDone(p.call_id, Code.INTERNAL, "the runtime worker failed the batch")
                )

    def _run_tracked(self, batch: list[Pending[Queued]]) -> None:
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        t0 = time.monotonic_ns()
        live: list[Pending[Queued]] = []
        in_regions: list[Pending[Queued]] = []
        feeds: list[dict[str, Any]] = []
        for p in batch:
            answer, call, buf, _recv, _regions = p.payload
            if call.deadline_ns and t0 > call.deadline_ns:
                answer(InferDone(call.call_id, Code.DEADLINE, "deadline expired in the queue"))
                continue
            if call.bound:
                in_regions.append(p)
                continue
            try:
                feeds.append({ref.name: _input_array(ref, buf) for ref in call.inputs})
            except Exception as exc:  # this call's only: the others of the batch go on
                answer(call_error(call.call_id, exc))
                continue
            live.append(p)
        holds: dict[int, Held] = {}  # by id(pending): call ids repeat across fronts
        try:
            if in_regions:
                rows = sum(p.batch_size for p in live) + sum(p.batch_size for p in in_regions)
                if graphs.replays(rows) and graphs.copier is not None:
                    # Rows in device memory join the batch: copied into the bucket's buffers.
                    for p in in_regions:
                        try:
                            held, feed = _device_feed(p.payload)
                        except Exception as exc:  # answered here: nothing may leave the batch
                            p.payload[0](call_error(p.payload[1].call_id, exc))
                            continue
                        holds[id(p)] = held
                        live.append(p)
                        feeds.append(feed)
                else:  # the batch would run eagerly: each runs alone, bound in place
                    for p in in_regions:
                        self._run_bound(p)
            if live:
                self._replay_batch(live, feeds, holds, t0)
        finally:
            for held in holds.values():
                held.release()

    def _replay_batch(
        self,
        live: list[Pending[Queued]],
        feeds: list[dict[str, Any]],
        holds: dict[int, Held],
        t0: int,
    ) -> None:
        graphs = self.graphs
        assert graphs is not None
        if not self.splits_batches and len(live) > 1:
            for p, f in zip(live, feeds, strict=True):
                self._run_one(p, f, holds.get(id(p)))
            return
        places = self._arena_places(live) if graphs.streamed and not holds else None
        try:
            # Arena inputs are page-locked when the worker pinned the arena.
            result = graphs.run(
                feeds,
                inputs_pinned=graphs.device_type == "cuda",
                host_outputs=_host_outputs(live, graphs.output_names) if holds else None,
                places=places,
            )
        except Exception as exc:
            if not isinstance(exc, BadBatch) and len(live) == 1:
                live[0].payload[0](_run_error(live[0].payload[1].call_id, exc))
                return
            # Requests whose shapes cannot share a batch (BadBatch), or a batch that failed
            # (one call's data can fail it): each runs alone, and fails only by itself.
            if isinstance(exc, UnsplitOutput):
                self._stop_batching(exc)
            for p, f in zip(live, feeds, strict=True):
                self._run_one(p, f, holds.get(id(p)))
            return
        t = result.timings
        links = tuple(p.payload[1].span for p in live if p.payload[1].span)
        row0 = 0
        counted = False  # the execution goes on the first call answered OK (counted once)
        for k, (p, outs) in enumerate(zip(live, result.outputs, strict=True)):
            answer, call, _buf, recv, _regions = p.payload
            w0 = time.monotonic_ns()
            try:
                placed = _placed(outs, graphs.output_names, places[k]) if places else ()
                outputs = self._outputs(p, outs, result, row0, holds.get(id(p)), placed)
            except Exception as exc:  # a region that does not fit, a CUDA copy that failed:
                answer(call_error(call.call_id, exc))  # this call's, and the rest go on
                continue
            finally:
                row0 += p.batch_size
            timings = Timings(
                queue_ns=t0 - recv,
                input_ns=t.gather_ns + t.h2d_ns,
                infer_ns=t.run_ns,
                output_ns=t.d2h_ns + time.monotonic_ns() - w0,
                batch_size=result.rows,
                executions=0 if counted else 1,
                padded_batch=_padded(result),
                mode=self._mode(result.replayed),
                links=() if counted else links,
            )
            counted = True
            answer(InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings))

    def _stop_batching(self, exc: UnsplitOutput) -> None:
        """A batch's output could not be cut per request (runtime.engine.graph_batch.
        per_request): each call gets all of its own output, run alone, as without batching;
        the version batches no more, or a later batch whose output happened to have as many
        rows would be cut all the same."""
        self._run_alone(f"{exc}{RUNS_ALONE}")

    def _run_alone(self, why: str) -> None:
        if self.splits_batches:
            self.splits_batches = False
            log.warning("model '%s' version %d: %s", self.name, self.version, why)

    def _check_batches(self) -> None:
        """At load, on the serving thread: a version whose batches run eagerly (no captured
        graph) is checked as a plain version's warm-up checks it (runtime.engine.batch_probe).
        A captured one needs no check: each bucket was captured with its outputs bound at the
        bucket's rows, which onnxruntime refuses for an output that does not have them. Here
        nothing fails the load: without the check the version used to load, so a model that
        refuses even zeros runs its calls alone."""
        graphs = self.graphs
        assert graphs is not None
        if graphs.captured or self.spec.max_batch_size < 2:
            return
        try:
            why = check_batches(
                graphs.run_unrecorded,
                graphs.signature.inputs,
                graphs.output_names,
                default_buckets(self.spec.max_batch_size),
            )
        except Exception as exc:
            why = unchecked(exc)
        if why is not None:
            self._run_alone(why)

    def _outputs(
        self,
        p: Pending[Queued],
        outs: list[Any],
        result: BatchResult,
        row0: int,
        held: Held | None,
        placed: Collection[str] = (),
    ) -> tuple[OutputData, ...]:
        """Write request `p`'s outputs: into the arena (`placed`: those already copied there
        from the device), or, for those the client placed in a CUDA region, device to device
        from the bucket's output buffer at its rows."""
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        _answer, call, buf, _recv, _regions = p.payload
        if _all_to_arena(call, graphs.output_names):  # most calls
            return _write_outputs(graphs.output_names, outs, self.signature, buf, call, placed)
        names = list(graphs.output_names)
        index = {n: i for i, n in enumerate(names)}

        def on_device(name: str) -> tuple[int, tuple[int, ...]]:
            assert result.device_outputs is not None  # region calls join replays only
            src = result.device_outputs[name] + row0 * graphs.output_row_nbytes[name]
            return src, tuple(int(d) for d in outs[index[name]].shape)

        # Device-to-device copies and a stream sync: never during another version's capture.
        to_regions = any(o.region for o in call.outputs)
        lock = graphs.device_lock if to_regions else contextlib.nullcontext()
        with lock:
            return place_outputs(
                [o.name for o in call.outputs] or names,
                call,
                self.signature,
                buf,
                ARENA,
                held,
                graphs.copier,
                graphs.device_id,
                host=lambda n: outs[index[n]],
                on_device=on_device,
            )

    def _arena_places(self, live: list[Pending[Queued]]) -> list[dict[str, Any]] | None:
        """Per call, its large outputs' places in its arena lease, where `_write_outputs` will
        lay them out: the replay copies them there from the device (pinned arena: DMA), and
        the host copy from staging is skipped. Outputs under DIRECT_MIN_BYTES a call go through
        staging (a copy call each costs more than they do). None when nothing qualifies or
        some call cannot take places (CUDA regions, a subset of the outputs, no room)."""
        graphs = self.graphs
        assert graphs is not None
        specs = graphs.output_specs
        widest = max((spec.row_nbytes for spec in specs), default=0)
        if max(p.batch_size for p in live) * widest < DIRECT_MIN_BYTES:
            return None  # no call has an output that large (small models: the common case)
        places: list[dict[str, Any]] = []
        any_place = False
        for p in live:
            _answer, call, buf, _recv, _regions = p.payload
            if not _all_to_arena(call, graphs.output_names):
                return None
            sizes = [p.batch_size * spec.row_nbytes for spec in specs]
            offsets = arena_offsets(call, sizes)
            mine: dict[str, Any] = {}
            for spec, nbytes, pos in zip(specs, sizes, offsets, strict=True):
                if pos is None:
                    return None  # inline in the answer: no place for it
                if nbytes >= DIRECT_MIN_BYTES:
                    rows = np.frombuffer(buf, spec.dtype, nbytes // spec.dtype.itemsize, pos)
                    mine[spec.name] = rows.reshape(p.batch_size, *spec.row_shape)
                    any_place = True
            places.append(mine)
        return places if any_place else None

    def _run_one(self, p: Pending[Queued], feed: dict[str, Any], held: Held | None) -> None:
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        answer, call, _buf, recv, _regions = p.payload
        try:
            result = graphs.run([feed])
            outputs = self._outputs(p, result.outputs[0], result, 0, held)
        except Exception as exc:
            answer(call_error(call.call_id, exc))
            return
        t = result.timings
        timings = Timings(
            time.monotonic_ns() - recv - t.total_ns,
            t.gather_ns + t.h2d_ns,
            t.run_ns,
            t.d2h_ns,
            result.rows,
            1,
            _padded(result),
            self._mode(result.replayed),
        )
        answer(InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings))

    def _mode(self, replayed: bool) -> str:
        """Timings.mode of an execution: a replay, an eager run of a version that has captured
        graphs (a fallback: no bucket fits, or tensors bound in CUDA shared memory), or an
        eager run of one that has none (not capturable)."""
        if replayed:
            return "replay"
        return "fallback" if self.graphs is not None and self.graphs.captured else "eager"

    def _run_bound(self, p: Pending[Queued]) -> None:
        """A call with tensors in CUDA shared memory: one counted eager run with an IOBinding
        at the regions' addresses (runtime.engine.bound)."""
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        answer, call, buf, recv, regions = p.payload
        names = [o.name for o in call.outputs] or list(graphs.output_names)
        sig = self.signature
        t0 = time.monotonic_ns()
        try:
            run = graphs.run_eager_with(
                p.batch_size,
                lambda session, options: run_bound(
                    session, call, buf, regions, names, sig, graphs.device_id, ARENA, options
                ),
            )
        except Exception as exc:
            answer(call_error(call.call_id, exc))
            return
        timings = Timings(
            t0 - recv,
            run.t_bound - t0,
            run.t_ran - run.t_bound,
            run.t_done - run.t_ran,
            p.batch_size,
            mode=self._mode(False),
            links=(call.span,) if call.span else (),
        )
        answer(InferDone(call.call_id, Code.OK, outputs=run.outputs, timings=timings))


def _answer_once(p: Pending[Queued], answered: set[int]) -> Pending[Queued]:
    """`p` with an answer callback that answers only the first time. `answered` collects the
    batch's answered calls by the id of their original Pending (call ids repeat across
    fronts; the batch list keeps the Pendings, and so their ids, alive)."""
    answer, call, buf, recv, regions = p.payload
    key = id(p)

    def once(done: InferDone) -> None:
        if key in answered:
            return
        answered.add(key)
        answer(done)

    payload = (once, call, buf, recv, regions)
    return Pending(p.call_id, p.batch_size, p.enqueued_ns, p.deadline_ns, payload=payload)


def queue_call(
    model: GraphModel,
    call: Infer,
    answer: Callable[[InferDone], None],
    buf: memoryview,
    regions: RegionTable | None,
    received_ns: int,
    current: Callable[[], GraphModel | None] = lambda: None,
) -> None:
    """Queue `call` on a graph-served version's instance `model`; a full queue is answered at
    once through `answer`. A reload swaps the instance between the caller's lookup of `model`
    and this submit, then closes the old one: the call goes to the instance `current()` names
    now (a hot swap drops nothing). Only a version being unloaded answers it NOT_READY."""
    payload = (answer, call, buf, received_ns, regions)
    item = Pending(call.call_id, call.rows, received_ns, call.deadline_ns, payload=payload)
    while True:
        try:
            model.submit(item)
            return
        except QueueFull as exc:
            answer(InferDone(call.call_id, Code.OVERLOADED, str(exc)))
            return
        except BatcherClosed:
            successor = current()
            if successor is None or successor is model:
                break
            model = successor
    answer(
        InferDone(
            call.call_id,
            Code.NOT_READY,
            f"model '{call.name}' version {call.version} is being replaced or unloaded",
        )
    )


def _all_to_arena(call: Infer, names: tuple[str, ...]) -> bool:
    """Whether every output of the model goes to the arena, in the model's order: no CUDA
    region in the call, and no list of outputs or the model's own."""
    if call.bound:
        return False
    return not call.outputs or tuple(o.name for o in call.outputs) == names


def _placed(outs: list[Any], names: tuple[str, ...], places: dict[str, Any]) -> list[str]:
    """The outputs the replay copied into their places (it returns the place itself)."""
    return [n for n, o in zip(names, outs, strict=True) if places.get(n) is o]


def _host_outputs(batch: list[Pending[Queued]], names: tuple[str, ...]) -> set[str]:
    """The outputs some call of `batch` reads from the host: all but those every call that
    asks for them places in a CUDA region (copied device to device from the bucket)."""
    wanted: set[str] = set()
    for p in batch:
        outputs = p.payload[1].outputs
        if not outputs:  # no list: every output, into the arena
            return set(names)
        wanted.update(o.name for o in outputs if not o.region)
    return wanted


def _device_feed(payload: Queued) -> tuple[Held, dict[str, Any]]:
    """A region call's inputs for GraphSet.run: DeviceRows at the region's address, arena
    arrays for the rest; its regions held (released by the caller). RegionError when a tensor
    does not fit its region or cannot live there."""
    _answer, call, buf, _recv, regions = payload
    held = hold(regions)
    try:
        feed: dict[str, Any] = {}
        for ref in call.inputs:
            if not ref.region:
                feed[ref.name] = _input_array(ref, buf)
                continue
            ptr, dtype = region_input(held, ref)
            feed[ref.name] = DeviceRows(ptr, tuple(ref.shape), dtype)
        hold_outputs(held, call)
    except BaseException:
        held.release()
        raise
    return held, feed


def _padded(result: BatchResult) -> int:
    """The bucket a replayed batch was padded to; 0 for an eager run (no padding happened,
    whatever bucket the rows would have taken)."""
    return (result.bucket or 0) if result.replayed else 0
