"""One model version's CUDA graphs: per batch bucket, static device buffers bound once to an
IOBinding, captured at load, replayed at fixed addresses; plus the explicit, counted eager path.

The replays themselves (copies in, replay, copies out) are runtime.engine.graph_replay's.

Allowed imports: numpy, onnxruntime (the CPU build has every API used here; only CUDA device
buffers need onnxruntime-gpu),
runtime.engine.{buckets,capturability,copy_stream,device_rows,graph_batch,graph_registry,
graph_replay,regions,session}, runtime.ipc.{protocol,pinning}. CUDA itself is reached only
through onnxruntime and runtime.ipc.pinning (imported inside a function), so this module imports
anywhere.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from runtime.engine.buckets import BucketTable
from runtime.engine.capturability import (
    TensorSpec,
    control_flow_reason,
    signature_reason,
    specs_of,
)
from runtime.engine.copy_stream import CopyStream
from runtime.engine.device_rows import has_device_rows
from runtime.engine.graph_batch import (
    BadBatch,
    BatchResult,
    BatchTimings,
    BucketBuffers,
    HostBuffer,
    check_feeds,
    numpy_alloc,
    per_request,
    pinned_alloc,
)
from runtime.engine.graph_registry import GraphRegistry, GraphStats, TensorBinding
from runtime.engine.graph_replay import DIRECT_MIN_BYTES, Captured, Replayer, rows_of
from runtime.engine.regions import Copier
from runtime.engine.session import (
    GraphsUnsupported,
    first_line,
    make_session,
    make_streamed_graph_session,
    signature_of,
)
from runtime.ipc.protocol import ModelSignature

T = TypeVar("T")

__all__ = ["DIRECT_MIN_BYTES", "CaptureFailed", "GraphSet", "GraphSetStats", "WrongThread"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

_NO_GRAPH: Final = "-1"  # gpu_graph_id for a run that neither captures nor replays
_WARMUP_RUNS: Final = 2  # the CUDA EP wants 2 regular runs before a capture (ref. §2.2)


class CaptureFailed(RuntimeError):
    """Capturing a bucket failed at load. The session's other graphs may be unusable: discard
    this GraphSet and its session (GraphSet.load then reloads without graphs)."""


class WrongThread(RuntimeError):
    """A graph was about to be replayed on a thread other than the one that captured it.
    onnxruntime keeps graphs per thread: another thread would capture anew, unguarded."""


@dataclass(frozen=True, slots=True)
class GraphSetStats:
    capturable: bool
    reason: str | None  # why not capturable (None when it is)
    buckets: tuple[int, ...]
    graphs: GraphStats = field(repr=False)


class GraphSet:
    """CUDA graphs of one model version, one per bucket of a BucketTable, and its eager path.

    Lifecycle (style rule 5): construct (or `GraphSet.load`) -> `capture()` on the version's
    serving thread, before the version takes traffic -> `run()` on that same thread -> `close()`.

    `run(feeds)` for a batch of requests:
      1. rows = sum of the requests' rows; bucket = the smallest bucket >= rows;
      2. no captured graph for it (above the largest bucket, model not capturable) -> the eager
         path: one `session.run` with gpu_graph_id -1 on the concatenated rows, counted in
         the registry (`record_eager`), never a silent fallback;
      3. else gather the requests' rows into the bucket's host staging buffer (pinned when
         CUDA is there), zero rows for the padding; a request already filling the bucket is
         copied from directly when the caller says it is pinned;
      4. `registry.check` that the bucket's bound buffers are those the graph was captured
         with (onnxruntime replays without checking), then copy the staging into the bound
         inputs in place (`update_inplace`: same address), replay with `run_with_iobinding`;
      5. copy the outputs to host, trim the padding and split them per request.
    What it does not do: batch formation, deadlines, output placement in the arena (the
    batcher and the worker do). With a copy stream (`streamed`, what `load` makes on a GPU)
    steps 3-5 are queued on the session's own stream instead (runtime.engine.graph_replay).

    Threads: capture and every replay happen on one thread (onnxruntime keeps graphs in the
    capturing thread's context); `run` from another thread raises WrongThread. Every GPU run
    holds `device_lock`, as a capture does for its whole duration (a capture uses
    cudaStreamCaptureModeGlobal: another thread's cudaMalloc would break it). `stats()` may be
    called from any thread.

    device_type "cpu" runs the same code on the CPU EP, where gpu_graph_id is accepted and
    ignored: CPU tests exercise binding, staging, padding, the registry and the counters.
    """

    def __init__(
        self,
        session: ort.InferenceSession,
        table: BucketTable,
        signature: ModelSignature,
        *,
        device_id: int = 0,
        device_type: str = "cuda",
        capturable: bool = True,
        reason: str | None = None,
        device_lock: contextlib.AbstractContextManager[Any] | None = None,
        host_alloc: Callable[[int], HostBuffer] | None = None,
        warmup_runs: int = _WARMUP_RUNS,
        copier: Copier | None = None,
        stream: CopyStream | None = None,
    ) -> None:
        # First: a GraphSet dropped without close() frees its attributes in this order, and
        # the captured buckets hold the native session, whose destructor may still use the
        # stream below (freed after it).
        self._captured: dict[int, Captured] = {}  # per bucket
        self._replayer: Replayer | None = None  # made by capture()
        self._session: ort.InferenceSession | None = session
        self.table = table
        self.signature = signature
        self.device_id = device_id
        self.device_type = device_type
        self.registry = GraphRegistry()
        self._lock: contextlib.AbstractContextManager[Any] = (
            device_lock if device_lock is not None else contextlib.nullcontext()
        )
        if host_alloc is None:
            host_alloc = pinned_alloc if device_type == "cuda" else numpy_alloc
        self._host_alloc = host_alloc
        self._warmup_runs = warmup_runs
        self._copier = copier  # rows in client CUDA regions (runtime.engine.device_rows)
        # The session's compute stream (user_compute_stream), or None: then inputs go in with
        # update_inplace and outputs come back with numpy(), each a blocking cudaMemcpy.
        self._stream = stream
        self._inputs, self._outputs = specs_of(signature)
        self.input_names = tuple(s.name for s in self._inputs)
        self.output_names = tuple(s.name for s in self._outputs)
        self.output_row_nbytes = {s.name: s.row_nbytes for s in self._outputs}
        self._reason: str | None
        if not capturable:
            self._reason = reason or "graphs disabled"
        elif len(table) == 0:
            self._reason = "the bucket table is empty"
        else:
            self._reason = signature_reason(signature)
        self._staging: dict[str, HostBuffer] = {}  # per input: [largest bucket, *row_shape]
        self._out_staging: dict[str, HostBuffer] = {}  # with a stream: per output, pinned
        self._owner: int | None = None  # thread that captured
        self._eager_options = ort.RunOptions()
        self._eager_options.add_run_config_entry("gpu_graph_id", _NO_GRAPH)
        self._closed = False

    # --- load ------------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        path: str,
        device_id: int,
        table: BucketTable,
        *,
        intra_op_threads: int = 1,
        signature: Callable[[ort.InferenceSession], ModelSignature] = signature_of,
        graphs: bool = True,
        provider_options: dict[str, str] | None = None,
        device_lock: contextlib.AbstractContextManager[Any] | None = None,
        copier: Copier | None = None,
    ) -> GraphSet:
        """Load `path` on CUDA device `device_id` and capture every bucket, or fall back.

        The result is captured, or not capturable with `reason` set and a session without
        graphs: control flow (checked with onnx when it is installed, and by onnxruntime),
        nodes on the CPU EP, a signature with BYTES or non-batch variable dims, an empty
        table, `graphs=False`, or a capture that failed (that session is discarded). Real load
        errors raise: SessionError (bad file, no CUDA), and whatever `signature` raises
        (the caller's reconciliation with the model config). Call it on the version's serving
        thread: that thread then owns the graphs."""
        # Session creation and destruction cudaMalloc/cudaFree: never while another version's
        # capture runs (global capture mode), so they hold the device lock; capture() takes it.
        lock = device_lock if device_lock is not None else contextlib.nullcontext()
        reason: str | None = None
        if not graphs:
            reason = "graphs disabled by configuration"
        elif len(table) == 0:
            reason = "the bucket table is empty"
        else:
            reason = control_flow_reason(path)
        if reason is None:
            try:
                sess, stream = make_streamed_graph_session(
                    path, device_id, intra_op_threads, provider_options, lock
                )
            except GraphsUnsupported as exc:
                reason = str(exc)
            else:
                gs = cls(
                    sess,
                    table,
                    signature(sess),
                    device_id=device_id,
                    device_lock=device_lock,
                    copier=copier,
                    stream=stream,
                )
                if gs.capturable:
                    try:
                        gs.capture()
                        return gs
                    except CaptureFailed as exc:
                        reason = str(exc)
                else:
                    reason = gs.reason
                gs.close()
                with lock:
                    del gs, sess  # graphs are freed only with their session
        log.info("%s: CUDA graphs off (%s)", path, reason)
        with lock:
            plain = make_session(path, f"cuda:{device_id}", intra_op_threads)
        return cls(
            plain,
            table,
            signature(plain),
            device_id=device_id,
            capturable=False,
            reason=reason,
            device_lock=device_lock,
            copier=copier,
        )

    # --- properties ------------------------------------------------------------------------

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise RuntimeError("GraphSet is closed")
        return self._session

    @property
    def device_lock(self) -> contextlib.AbstractContextManager[Any]:
        """The lock every GPU step of this version holds (a no-op context without one)."""
        return self._lock

    @property
    def capturable(self) -> bool:
        return self._reason is None

    @property
    def reason(self) -> str | None:
        """Why this version runs without graphs (None when it has them)."""
        return self._reason

    @property
    def captured(self) -> bool:
        return self._owner is not None

    @property
    def streamed(self) -> bool:
        """Whether replays queue their copies on the session's own stream (a CUDA session
        made by `load` with cupy present; see runtime.engine.copy_stream)."""
        return self._stream is not None

    @property
    def output_specs(self) -> tuple[TensorSpec, ...]:
        """The outputs' specs (name, dtype, row shape, row bytes), in `output_names` order."""
        return self._outputs

    @property
    def copier(self) -> Copier | None:
        """What copies rows held in client CUDA regions (None: no regions on this worker)."""
        return self._copier

    def replays(self, rows: int) -> bool:
        """Whether a batch of `rows` rows would replay a captured graph (not run eagerly)."""
        bucket = self._bucket_for(rows)
        return bucket is not None and bucket in self._captured

    def _bucket_for(self, rows: int) -> int | None:
        """The bucket a batch of `rows` rows maps to; None above the largest or with no
        buckets at all (the eager path)."""
        return self.table.bucket_for(rows) if len(self.table) else None

    def bucket(self, size: int) -> BucketBuffers:
        """The captured buffers of bucket `size` (KeyError when it has no graph)."""
        return self._captured[size].buf

    def binding(self, size: int) -> tuple[TensorBinding, ...]:
        """What bucket `size` is bound to now: (name, shape, dtype, address) per tensor, as
        `GraphRegistry.check` compares it with what was captured."""
        buf = self._captured[size].buf  # KeyError when it has no graph, as bucket()
        assert self._replayer is not None  # it captured the bucket
        return tuple(TensorBinding(*b) for b in self._replayer.signature(buf))

    def stats(self) -> GraphSetStats:
        return GraphSetStats(self.capturable, self._reason, self.table.sizes, self.registry.stats())

    # --- capture ---------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture every bucket, largest first (the memory arena grows to its peak once), on
        this thread, holding the device lock throughout. Raises CaptureFailed naming the
        bucket (then discard this GraphSet); a no-op for a GraphSet that is not capturable."""
        if self._closed:
            raise RuntimeError("GraphSet is closed")
        if self._owner is not None:
            raise RuntimeError("graphs are already captured (a gpu_graph_id is captured once)")
        if not self.capturable:
            return
        largest = self.table.largest
        assert largest is not None  # capturable implies a non-empty table
        with self._lock:  # cudaHostAlloc too must not run during another version's capture
            for spec in self._inputs:
                self._staging[spec.name] = self._host_alloc(max(1, largest * spec.row_nbytes))
            if self._stream is not None:  # outputs come back here, one synchronisation
                for spec in self._outputs:
                    nbytes = max(1, largest * spec.row_nbytes)
                    self._out_staging[spec.name] = self._host_alloc(nbytes)
            self._replayer = Replayer(
                self._inputs,
                self._outputs,
                self.registry,
                self._lock,
                self._staging,
                self._out_staging,
                device_id=self.device_id,
                device_type=self.device_type,
                copier=self._copier,
                stream=self._stream,
            )
            for size in self.table.capture_order():
                try:
                    self._capture_bucket(self._replayer, size)
                except Exception as exc:
                    raise CaptureFailed(
                        f"capture of bucket {size} (gpu_graph_id {self.table.graph_id(size)}) "
                        f"failed: {first_line(exc)}"
                    ) from exc
        self._owner = threading.get_ident()

    def _capture_bucket(self, replayer: Replayer, size: int) -> None:
        def alloc(spec: TensorSpec) -> ort.OrtValue:
            return ort.OrtValue.ortvalue_from_shape_and_type(
                [size, *spec.row_shape], spec.dtype.type, self.device_type, self.device_id
            )

        inputs = {s.name: alloc(s) for s in self._inputs}
        outputs = {s.name: alloc(s) for s in self._outputs}
        binding = self.session.io_binding()
        for name, value in inputs.items():
            binding.bind_ortvalue_input(name, value)
        for name, value in outputs.items():
            binding.bind_ortvalue_output(name, value)
        staging = [rows_of(self._staging[s.name].array, s, size) for s in self._inputs]
        for spec, zeros in zip(self._inputs, staging, strict=True):
            zeros[...] = 0  # device memory starts uninitialised: capture on zeros
            inputs[spec.name].update_inplace(zeros)
        # Regular runs first: they grow the arena for this shape, so that the capturing run
        # allocates nothing (cudaMalloc is illegal during a capture; the EP's own warm-up
        # counter is per thread, not per graph id, so it would not protect later buckets).
        for _ in range(self._warmup_runs):
            self.session.run_with_iobinding(binding, self._eager_options)
        graph_id = self.table.graph_id(size)
        run_options = ort.RunOptions()
        run_options.add_run_config_entry("gpu_graph_id", str(graph_id))
        self.session.run_with_iobinding(binding, run_options)  # captures, then replays once
        self.session.run_with_iobinding(binding, run_options)  # a plain replay, before traffic
        buffers = BucketBuffers(size, graph_id, inputs, outputs, binding, run_options)
        out_staging = {
            s.name: rows_of(self._out_staging[s.name].array, s, size)
            for s in self._outputs
            if s.name in self._out_staging
        }
        self._captured[size] = replayer.capture_record(buffers, self.session, staging, out_staging)

    # --- run -------------------------------------------------------------------------------

    def run_arrays(self, arrays: Sequence[Array], *, inputs_pinned: bool = False) -> BatchResult:
        """`run` for a model with one input: `arrays[i]` is request i's rows."""
        if len(self.input_names) != 1:
            raise BadBatch(f"the model takes inputs {list(self.input_names)}: name them")
        (name,) = self.input_names
        return self.run([{name: a} for a in arrays], inputs_pinned=inputs_pinned)

    def run(
        self,
        feeds: Sequence[Mapping[str, Array]],
        *,
        inputs_pinned: bool = False,
        host_outputs: Collection[str] | None = None,
        places: Sequence[Mapping[str, Array]] | None = None,
    ) -> BatchResult:
        """Run one batch: `feeds[i]` maps every input name to request i's array (its rows on
        axis 0). Returns each request's outputs, padding trimmed. `inputs_pinned`: the arrays
        live in page-locked memory (the pinned arena), so a request that fills its bucket
        alone is copied to the device without a staging copy. `host_outputs` (replays only;
        None = all): the outputs copied back to the host; the others are read from
        `device_outputs` (CUDA shared-memory calls) and come back as data-less placeholders
        of the right shape, so a batch whose outputs all go to client regions makes no
        device-to-host copy. With a copy stream (`streamed`) the outputs are views of pinned
        output staging, valid until the next run of this GraphSet: place them before that.
        `places[i][name]` (streamed replays only; ignored otherwise): a C-contiguous array of
        request i's rows of output `name` (its shape and dtype) where the caller wants them,
        such as its answer's place in the pinned arena. When every request of the batch has
        one for an output, each request's rows are copied from the device straight there and
        that array is its output: no staging, no host copy after."""
        if self._closed:
            raise RuntimeError("GraphSet is closed")
        sizes = check_feeds(feeds, self._inputs)
        bucket = self._bucket_for(sum(sizes))
        if self.capturable and self._owner is None:
            raise RuntimeError("capture() before run(): a capturable GraphSet replays graphs")
        cap = None if bucket is None else self._captured.get(bucket)
        if cap is not None:
            if threading.get_ident() != self._owner:
                raise WrongThread(
                    f"bucket {bucket} was captured on thread {self._owner}; "
                    f"replaying it on thread {threading.get_ident()} is refused"
                )
            assert self._replayer is not None  # it captured `cap`
            return self._replayer.replay(cap, feeds, sizes, inputs_pinned, host_outputs, places)
        self.registry.record_eager(bucket)
        return self._eager(bucket, feeds, sizes)

    def run_eager_with(
        self, rows: int, run: Callable[[ort.InferenceSession, ort.RunOptions], T]
    ) -> T:
        """Call `run(session, run_options)` as one counted eager execution of `rows` rows, on
        this (the serving) thread under the device lock: for calls whose tensors are bound in
        place (CUDA shared memory, runtime.engine.bound) rather than padded into a bucket.
        The options carry gpu_graph_id -1, so nothing is captured."""
        if self._closed:
            raise RuntimeError("GraphSet is closed")
        if self._owner is not None and threading.get_ident() != self._owner:
            raise WrongThread(
                f"graphs were captured on thread {self._owner}; an eager run on thread "
                f"{threading.get_ident()} would race the replays"
            )
        self.registry.record_eager(self._bucket_for(rows))
        with self._lock:
            return run(self.session, self._eager_options)

    def run_unrecorded(self, feeds: Mapping[str, Array]) -> list[Array]:
        """One eager run of every output, left out of the statistics: the load's own runs
        (runtime.engine.batch_probe), on the serving thread under the device lock."""
        if self._closed:
            raise RuntimeError("GraphSet is closed")
        with self._lock:
            return self.session.run(list(self.output_names), dict(feeds), self._eager_options)

    def _eager(
        self, bucket: int | None, feeds: Sequence[Mapping[str, Array]], sizes: list[int]
    ) -> BatchResult:
        t0 = time.perf_counter_ns()
        joined: dict[str, Array] = {}
        for name in self.input_names:
            arrays = [f[name] for f in feeds]
            if has_device_rows(arrays):
                raise BadBatch("rows in device memory replay a captured bucket, never eagerly")
            joined[name] = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
        t1 = time.perf_counter_ns()
        with self._lock:
            # gpu_graph_id -1: on a graph session a run without it would capture graph 0.
            results = self.session.run(list(self.output_names), joined, self._eager_options)
        t2 = time.perf_counter_ns()
        return BatchResult(
            per_request([np.asarray(r) for r in results], sizes, sum(sizes), self.output_names),
            sum(sizes),
            bucket,
            False,
            BatchTimings(t1 - t0, 0, t2 - t1, 0),
        )

    def close(self) -> None:
        """Drop the bindings, free the staging buffers, and drop the session, which frees the
        graphs (onnxruntime has no release for CUDA graphs). All under the device lock: the
        session's cudaFree and graph destruction must not run during another's capture, and
        whoever drops the last reference to this GraphSet (an unload, on any thread) would
        otherwise free the session there, outside the lock."""
        if self._closed:
            return
        self._closed = True
        with self._lock:  # frees device and pinned memory: not during another's capture
            # The captured buckets hold the bound OrtValues, and the native session and
            # binding: dropped here, or the session would outlive close() and free its graphs
            # outside the lock.
            self._captured.clear()
            self._replayer = None
            for staging in (*self._staging.values(), *self._out_staging.values()):
                staging.close()
            self._staging.clear()
            self._out_staging.clear()
            self._session = None
            self._stream = None  # the session holds it too, and is freed first (_graph_session)
