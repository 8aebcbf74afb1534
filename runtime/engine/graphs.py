"""One model version's CUDA graphs: per batch bucket, static device buffers bound once to an
IOBinding, captured at load, replayed at fixed addresses; plus the explicit, counted eager path.

Allowed imports: numpy, onnxruntime (the CPU build has every API used here; only CUDA device
buffers need onnxruntime-gpu),
runtime.engine.{buckets,capturability,copy_stream,device_rows,graph_batch,graph_registry,regions,
session}, runtime.ipc.{protocol,pinning}. CUDA itself is reached only through onnxruntime and
runtime.ipc.pinning (imported inside a function), so this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from runtime.engine.buckets import BucketTable, pad_batch
from runtime.engine.capturability import (
    TensorSpec,
    control_flow_reason,
    signature_reason,
    specs_of,
)
from runtime.engine.copy_stream import CopyStream, CudaStream
from runtime.engine.device_rows import copy_rows_into, has_device_rows
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
from runtime.engine.regions import Copier
from runtime.engine.session import (
    GraphsUnsupported,
    SessionError,
    first_line,
    make_graph_session,
    make_session,
    signature_of,
)
from runtime.ipc.protocol import ModelSignature

T = TypeVar("T")

__all__ = ["DIRECT_MIN_BYTES", "CaptureFailed", "GraphSet", "GraphSetStats", "WrongThread"]

log = logging.getLogger(__name__)

Array = npt.NDArray[Any]

_NO_GRAPH: Final = "-1"  # gpu_graph_id for a run that neither captures nor replays
_WARMUP_RUNS: Final = 2  # the CUDA EP wants 2 regular runs before a capture (ref. §2.2)
# With a copy stream, requests of at least this many bytes (per input) are copied to the device
# each straight from where they are (the pinned arena), not gathered on the host first: below
# it, one gather and one copy cost less than a copy call per request. The same rule, the other
# way, for outputs copied back straight into their places (`run(places=...)`, GraphModel).
DIRECT_MIN_BYTES: Final = 64 * 1024


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
    steps 3-5 are queued on the session's own stream instead: `_replay_streamed`.

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
        # Precomputed for the hot path (numpy's dtype.name and np.prod cost microseconds).
        self._layout = [  # (name, dtype name, is input) of every bound tensor
            *((s.name, s.dtype.name, True) for s in self._inputs),
            *((s.name, s.dtype.name, False) for s in self._outputs),
        ]
        self._buckets: dict[int, BucketBuffers] = {}
        self._staging: dict[str, HostBuffer] = {}  # per input: [largest bucket, *row_shape]
        self._views: dict[int, list[Array]] = {}  # per bucket, per input: its staging rows
        self._out_staging: dict[str, HostBuffer] = {}  # with a stream: per output, pinned
        self._out_views: dict[int, dict[str, Array]] = {}  # per bucket, per output
        # Host addresses of the input and output staging (every bucket's view starts there),
        # and each bucket's bound device addresses as captured: the replay uses them once the
        # registry check has read the live ones back and found them equal.
        self._host_ptrs: dict[str, int] = {}
        self._out_ptrs: dict[str, int] = {}
        self._device_ptrs: dict[int, dict[str, int]] = {}
        self._device_outs: dict[int, dict[str, int]] = {}  # per bucket: outputs only
        # Per bucket: the OrtValues it was captured with (in `_layout` order), and the
        # signature the registry holds for them. An OrtValue's shape and address are fixed for
        # its life, so while the bucket holds those very objects its signature is the captured
        # one, known without reading six properties back through onnxruntime on every replay;
        # a replaced entry (the rebind the registry exists to refuse) is read back and checked.
        self._bound_values: dict[int, list[ort.OrtValue]] = {}
        self._bound_sig: dict[int, list[tuple[str, tuple[int, ...], str, int]]] = {}
        # Per bucket: the replay itself, onnxruntime's native run_with_iobinding bound to the
        # bucket's binding and options (see _native_replay).
        self._replay_call: dict[int, Callable[[], None]] = {}
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
                sess, stream = _graph_session(
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
        return bucket is not None and bucket in self._buckets

    def _bucket_for(self, rows: int) -> int | None:
        """The bucket a batch of `rows` rows maps to; None above the largest or with no
        buckets at all (the eager path)."""
        return self.table.bucket_for(rows) if len(self.table) else None

    def bucket(self, size: int) -> BucketBuffers:
        """The captured buffers of bucket `size` (KeyError when it has no graph)."""
        return self._buckets[size]

    def binding(self, size: int) -> tuple[TensorBinding, ...]:
        """What bucket `size` is bound to now: (name, shape, dtype, address) per tensor, as
        `GraphRegistry.check` compares it with what was captured."""
        return tuple(TensorBinding(*b) for b in self._signature(self._buckets[size]))

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
            for size in self.table:
                self._views[size] = [self._staging_view(spec, size) for spec in self._inputs]
            if self._stream is not None:  # outputs come back here, one synchronisation
                for spec in self._outputs:
                    nbytes = max(1, largest * spec.row_nbytes)
                    self._out_staging[spec.name] = self._host_alloc(nbytes)
                    self._out_ptrs[spec.name] = self._out_staging[spec.name].array.ctypes.data
                for spec in self._inputs:
                    self._host_ptrs[spec.name] = self._staging[spec.name].array.ctypes.data
                for size in self.table:
                    self._out_views[size] = {
                        s.name: _rows_of(self._out_staging[s.name].array, s, size)
                        for s in self._outputs
                    }
            for size in self.table.capture_order():
                try:
                    self._capture_bucket(size)
                except Exception as exc:
                    raise CaptureFailed(
                        f"capture of bucket {size} (gpu_graph_id {self.table.graph_id(size)}) "
                        f"failed: {first_line(exc)}"
                    ) from exc
        self._owner = threading.get_ident()

    def _capture_bucket(self, size: int) -> None:
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
        for spec, zeros in zip(self._inputs, self._views[size], strict=True):
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
        sig = self._signature(buffers)
        self.registry.register(size, sig)
        self._bound_values[size] = self._values(buffers)
        self._bound_sig[size] = sig
        self._replay_call[size] = _native_replay(self.session, binding, run_options)
        self._device_ptrs[size] = {n: v.data_ptr() for n, v in (*inputs.items(), *outputs.items())}
        self._device_outs[size] = {n: v.data_ptr() for n, v in outputs.items()}
        self._buckets[size] = buffers

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
        if bucket is not None and bucket in self._buckets:
            if threading.get_ident() != self._owner:
                raise WrongThread(
                    f"bucket {bucket} was captured on thread {self._owner}; "
                    f"replaying it on thread {threading.get_ident()} is refused"
                )
            if self._stream is not None:
                return self._replay_streamed(
                    self._stream, self._buckets[bucket], feeds, sizes, host_outputs, places
                )
            return self._replay(self._buckets[bucket], feeds, sizes, inputs_pinned, host_outputs)
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

    def _replay(
        self,
        buf: BucketBuffers,
        feeds: Sequence[Mapping[str, Array]],
        sizes: list[int],
        inputs_pinned: bool,
        host_outputs: Collection[str] | None = None,
    ) -> BatchResult:
        t0 = time.perf_counter_ns()
        hosts: list[Array | None] = []  # None: filled row by row on the device (device_rows)
        sync = False  # a pageable source: wait for its DMA before the replay reads it
        direct = False
        for spec, staging in zip(self._inputs, self._views[buf.bucket], strict=True):
            arrays = [f[spec.name] for f in feeds]
            if has_device_rows(arrays):
                hosts.append(None)
                direct = True
            elif inputs_pinned and len(arrays) == 1 and arrays[0].shape[0] == buf.bucket:
                hosts.append(np.ascontiguousarray(arrays[0]))  # fills the bucket: no gather
            else:
                hosts.append(pad_batch(arrays, buf.bucket, out=staging))
                sync = sync or not self._staging[spec.name].pinned
        t1 = time.perf_counter_ns()
        with self._lock:
            self.registry.check(buf.bucket, self._signature_now(buf))
            for spec, host in zip(self._inputs, hosts, strict=True):
                if host is not None:
                    buf.inputs[spec.name].update_inplace(host)
                    continue
                if self._copier is None:
                    raise BadBatch("rows in device memory, but this GraphSet has no copier")
                copy_rows_into(
                    buf.inputs[spec.name].data_ptr(),
                    spec.row_nbytes,
                    [f[spec.name] for f in feeds],
                    buf.bucket,
                    self._copier,
                    self.device_id,
                )
            if direct and self._copier is not None:
                self._copier.synchronize(self.device_id)  # ORT's stream does not wait for ours
            elif sync and self.device_type != "cpu":
                buf.binding.synchronize_inputs()
            t2 = time.perf_counter_ns()
            self._replay_call[buf.bucket]()
            t3 = time.perf_counter_ns()
            wanted = self.output_names if host_outputs is None else host_outputs
            results = [self._host_output(buf, o, wanted) for o in self._outputs]
        t4 = time.perf_counter_ns()
        return BatchResult(
            per_request(results, sizes),
            sum(sizes),
            buf.bucket,
            True,
            BatchTimings(t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            # Valid until the next replay on this thread: region outputs are copied from here.
            {name: buf.outputs[name].data_ptr() for name in self.output_names},
        )

    def _replay_streamed(
        self,
        stream: CopyStream,
        buf: BucketBuffers,
        feeds: Sequence[Mapping[str, Array]],
        sizes: list[int],
        host_outputs: Collection[str] | None,
        places: Sequence[Mapping[str, Array]] | None = None,
    ) -> BatchResult:
        """`_replay` with the copies on the session's stream: each input's rows are copied
        to the bound buffer (gathered into pinned staging first when they are small), the
        padding zeroed on the device, then the replay (which synchronises the stream), then
        every wanted output copied into pinned memory with one synchronisation. The outputs
        are views of that memory: valid until the next run of this GraphSet."""
        t0 = time.perf_counter_ns()
        rows = sum(sizes)
        # Per input, how its rows reach the bound buffer: "device" (client CUDA regions, by
        # the copier on the legacy stream), "gather" (into pinned staging, one copy) or "each"
        # (one copy per request, from where it is).
        plans: list[tuple[TensorSpec, list[Array], str]] = []
        direct = False
        for spec, staging in zip(self._inputs, self._views[buf.bucket], strict=True):
            arrays = [f[spec.name] for f in feeds]
            if has_device_rows(arrays):
                plans.append((spec, arrays, "device"))
                direct = True
            elif _copy_each(arrays, rows * spec.row_nbytes):
                plans.append((spec, arrays, "each"))
            else:
                # check_feeds has checked every dtype and row shape: one C loop, no padding
                # (zeroed on the device below).
                np.concatenate(arrays, axis=0, out=staging[:rows])
                plans.append((spec, arrays, "gather"))
        t1 = time.perf_counter_ns()
        device = self._device_ptrs[buf.bucket]
        with self._lock:
            self.registry.check(buf.bucket, self._signature_now(buf))
            for spec, arrays, how in plans:
                dst = device[spec.name]
                if how == "device":  # copy_rows_into zeroes the padding itself
                    if self._copier is None:
                        raise BadBatch("rows in device memory, but this GraphSet has no copier")
                    copy_rows_into(
                        dst, spec.row_nbytes, arrays, buf.bucket, self._copier, self.device_id
                    )
                    continue
                nbytes = rows * spec.row_nbytes  # check_feeds: every request has these rows
                if how == "gather":
                    stream.to_device(dst, self._host_ptrs[spec.name], nbytes)
                else:
                    offset = 0
                    for a in arrays:
                        stream.to_device(dst + offset, a.ctypes.data, a.nbytes)
                        offset += a.nbytes
                if rows < buf.bucket:  # zeros, not stale rows (see pad_batch)
                    stream.zero(dst + nbytes, (buf.bucket - rows) * spec.row_nbytes)
            if direct and self._copier is not None:
                self._copier.synchronize(self.device_id)  # the legacy stream's copies
            t2 = time.perf_counter_ns()
            self._replay_call[buf.bucket]()
            t3 = time.perf_counter_ns()
            wanted = self.output_names if host_outputs is None else host_outputs
            views = self._out_views[buf.bucket]
            results: list[Array] = []
            placed: dict[int, list[Array]] = {}  # output index -> each request's place
            for k, spec in enumerate(self._outputs):
                if spec.name not in wanted:
                    results.append(self._host_output(buf, spec, ()))
                    continue
                results.append(views[spec.name])
                dests = _places_of(places, spec, sizes)
                if dests is None:
                    stream.to_host(
                        self._out_ptrs[spec.name], device[spec.name], rows * spec.row_nbytes
                    )
                    continue
                src = device[spec.name]
                for dest in dests:
                    stream.to_host(dest.ctypes.data, src, dest.nbytes)
                    src += dest.nbytes
                placed[k] = dests
            stream.synchronize()
        t4 = time.perf_counter_ns()
        outputs = per_request(results, sizes)
        for k, dests in placed.items():
            for i, dest in enumerate(dests):
                outputs[i][k] = dest
        return BatchResult(
            outputs,
            rows,
            buf.bucket,
            True,
            BatchTimings(t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            self._device_outs[buf.bucket],
        )

    def _host_output(self, buf: BucketBuffers, spec: TensorSpec, wanted: Collection[str]) -> Array:
        if spec.name not in wanted:  # the shape without the bytes: a zero-stride view of a zero
            return np.broadcast_to(np.zeros((), spec.dtype), (buf.bucket, *spec.row_shape))
        out = buf.outputs[spec.name].numpy()
        # A CPU OrtValue's numpy() is a view of the bound buffer, which the next replay rewrites.
        return out.copy() if self.device_type == "cpu" else out

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
            per_request([np.asarray(r) for r in results], sizes),
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
            self._buckets.clear()
            self._views.clear()
            self._out_views.clear()
            self._host_ptrs.clear()
            self._out_ptrs.clear()
            self._device_ptrs.clear()
            self._device_outs.clear()
            # These hold the bound OrtValues, and the native session and binding: cleared here,
            # or the session would outlive close() and free its graphs outside the lock.
            self._bound_values.clear()
            self._bound_sig.clear()
            self._replay_call.clear()
            for staging in (*self._staging.values(), *self._out_staging.values()):
                staging.close()
            self._staging.clear()
            self._out_staging.clear()
            self._session = None
            self._stream = None  # the session holds it too, and is freed first (_graph_session)

    # --- helpers ---------------------------------------------------------------------------

    def _staging_view(self, spec: TensorSpec, rows: int) -> Array:
        """The first `rows` rows of input `spec`'s staging buffer, as [rows, *row_shape]."""
        return _rows_of(self._staging[spec.name].array, spec, rows)

    def _values(self, buf: BucketBuffers) -> list[ort.OrtValue]:
        """The OrtValues the bucket holds now, in `_layout` order."""
        ins, outs = buf.inputs, buf.outputs
        return [ins[name] if is_input else outs[name] for name, _, is_input in self._layout]

    def _signature_now(self, buf: BucketBuffers) -> list[tuple[str, tuple[int, ...], str, int]]:
        """`_signature(buf)`: the captured one while the bucket holds the captured OrtValues
        (compared by identity), else read back."""
        captured = self._bound_values[buf.bucket]
        now = self._values(buf)
        if len(now) == len(captured) and all(map(operator.is_, now, captured)):
            return self._bound_sig[buf.bucket]
        return self._signature(buf)

    def _signature(self, buf: BucketBuffers) -> list[tuple[str, tuple[int, ...], str, int]]:
        """Read back what the bucket's OrtValues are now (shape, address), for the registry."""
        sig = []
        for name, dtype, is_input in self._layout:
            v = buf.inputs[name] if is_input else buf.outputs[name]
            sig.append((name, tuple(v.shape()), dtype, v.data_ptr()))
        return sig


def _rows_of(raw: npt.NDArray[np.uint8], spec: TensorSpec, rows: int) -> Array:
    """The first `rows` rows of `spec`'s tensor laid out in the bytes `raw`."""
    return raw[: rows * spec.row_nbytes].view(spec.dtype).reshape(rows, *spec.row_shape)


def _places_of(
    places: Sequence[Mapping[str, Array]] | None, spec: TensorSpec, sizes: list[int]
) -> list[Array] | None:
    """Each request's place for output `spec` when every request has one that fits exactly
    (C-contiguous, its rows' shape and dtype); else None: the output goes through staging."""
    if places is None or len(places) != len(sizes):
        return None
    dests: list[Array] = []
    for place, n in zip(places, sizes, strict=True):
        dest = place.get(spec.name)
        if (
            dest is None
            or dest.dtype != spec.dtype
            or dest.shape != (n, *spec.row_shape)
            or not dest.flags.c_contiguous
            or not dest.flags.writeable
        ):
            return None
        dests.append(dest)
    return dests


def _copy_each(arrays: Sequence[Array], nbytes: int) -> bool:
    """Whether to copy each request's rows to the device from where they are (no gather):
    one request, or requests large enough that a copy call each costs less than a gather;
    contiguous rows only (a copy takes one address)."""
    if len(arrays) == 1:
        return bool(arrays[0].flags.c_contiguous)
    if nbytes < DIRECT_MIN_BYTES * len(arrays):
        return False
    return all(a.flags.c_contiguous for a in arrays)


def _native_replay(
    session: ort.InferenceSession, binding: Any, run_options: ort.RunOptions
) -> Callable[[], None]:
    """`session.run_with_iobinding(binding, run_options)` as one native call. The Python
    wrapper adds WebGPU capture bookkeeping (a session check, the run options parsed, a call
    asking whether WebGPU capture is on) that the CUDA and CPU EPs never use: about a
    microsecond per replay, a tenth of a small model's. A session or binding without the
    native objects (a test double, another onnxruntime) gets the wrapper."""
    from onnxruntime.capi import _pybind_state as native

    native_sess = getattr(session, "_sess", None)
    native_io = getattr(binding, "_iobinding", None)
    if isinstance(native_sess, native.InferenceSession) and isinstance(
        native_io, native.SessionIOBinding
    ):
        return functools.partial(native_sess.run_with_iobinding, native_io, run_options)
    return functools.partial(session.run_with_iobinding, binding, run_options)


def _graph_session(
    path: str,
    device_id: int,
    intra_op_threads: int,
    provider_options: dict[str, str] | None,
    lock: contextlib.AbstractContextManager[Any],
) -> tuple[ort.InferenceSession, CopyStream | None]:
    """A graph session computing on a stream of ours (user_compute_stream), so that the
    batch's copies are queued on the stream the replay runs on; without one (no cupy, or an
    onnxruntime that refuses the option: logged) a session on onnxruntime's own stream.
    Raises what make_graph_session raises."""
    from runtime.ipc.pinning import CudaError

    try:
        stream: CopyStream | None = CudaStream(device_id)
    except CudaError as exc:
        log.warning("no copy stream for %s (%s): blocking copies", path, first_line(exc))
        stream = None
    if stream is not None:
        options = {**(provider_options or {}), "user_compute_stream": str(stream.ptr)}
        try:
            with lock:
                sess = make_graph_session(
                    path, device_id, intra_op_threads, provider_options=options
                )
            # The stream must outlive the session computing on it, whoever drops the session
            # last: the session's attributes are released after its native session (`_sess`,
            # set first), so the stream is destroyed after.
            sess._microtune_copy_stream = stream  # type: ignore[attr-defined]
            return sess, stream
        except SessionError as exc:
            log.warning(
                "%s: onnxruntime refused a user compute stream (%s): blocking copies",
                path,
                first_line(exc),
            )
    with lock:
        return make_graph_session(
            path, device_id, intra_op_threads, provider_options=provider_options
        ), None
