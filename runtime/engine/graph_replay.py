"""Replaying one captured bucket of a GraphSet (runtime.engine.graphs): the batch's rows copied
into the bucket's bound device inputs, the graph replayed, the outputs copied back and split per
request.

Two ways, fixed per GraphSet when it captures:
- without a copy stream, onnxruntime's own copies: the rows gathered and padded into host
  staging (or taken as they are when one pinned request fills the bucket), `update_inplace`
  into the bound inputs, `numpy()` for the outputs; each copy a blocking cudaMemcpy;
- with one (`streamed`: the session computes on a stream of ours), every copy is queued on that
  stream (small requests gathered into pinned staging first, large ones copied from where they
  are), the padding zeroed on the device, and the outputs copied into pinned memory, or straight
  into the places the caller names, with one synchronisation.
Before either replays, the registry checks that the bucket is still bound to the buffers it
was captured with (onnxruntime replays without checking).

Allowed imports: numpy, onnxruntime, runtime.engine.{buckets,capturability,copy_stream,
device_rows,graph_batch,graph_registry,regions}.
"""

from __future__ import annotations

import contextlib
import functools
import operator
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from runtime.engine.buckets import pad_batch
from runtime.engine.capturability import TensorSpec
from runtime.engine.copy_stream import CopyStream
from runtime.engine.device_rows import copy_rows_into, has_device_rows
from runtime.engine.graph_batch import (
    BadBatch,
    BatchResult,
    BatchTimings,
    BucketBuffers,
    HostBuffer,
    per_request,
)
from runtime.engine.graph_registry import GraphRegistry
from runtime.engine.regions import Copier

__all__ = ["DIRECT_MIN_BYTES", "Captured", "Replayer", "Signature", "native_replay", "rows_of"]

Array = npt.NDArray[Any]
# (name, shape, dtype name, device address) of every bound tensor: what the registry compares.
Signature = list[tuple[str, tuple[int, ...], str, int]]

# With a copy stream, requests of at least this many bytes (per input) are copied to the device
# each straight from where they are (the pinned arena), not gathered on the host first: below
# it, one gather and one copy cost less than a copy call per request. The same rule, the other
# way, for outputs copied back straight into their places (`run(places=...)`, GraphModel).
DIRECT_MIN_BYTES: Final = 64 * 1024


@dataclass(slots=True, eq=False)
class Captured:
    """One bucket as captured; fixed for the GraphSet's life."""

    buf: BucketBuffers
    staging: list[Array]  # per input: this bucket's rows of the host staging
    out_staging: dict[str, Array]  # streamed: per output, its rows of the pinned output staging
    # The OrtValues it was captured with (in the Replayer's layout order) and the signature the
    # registry holds for them. An OrtValue's shape and address are fixed for its life, so while
    # the bucket holds those very objects its signature is the captured one, known without
    # reading six properties back through onnxruntime on every replay; a replaced entry (the
    # rebind the registry exists to refuse) is read back and checked.
    values: list[ort.OrtValue]
    sig: Signature
    device: dict[str, int]  # bound device address of every input and output, as captured
    device_outs: dict[str, int]  # outputs only
    call: Callable[[], None]  # the replay itself (native_replay)


class Replayer:
    """The replay of a GraphSet's captured buckets, on the thread that captured them."""

    def __init__(
        self,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        registry: GraphRegistry,
        lock: contextlib.AbstractContextManager[Any],
        staging: Mapping[str, HostBuffer],
        out_staging: Mapping[str, HostBuffer],
        *,
        device_id: int,
        device_type: str,
        copier: Copier | None,
        stream: CopyStream | None,
    ) -> None:
        self._inputs = inputs
        self._outputs = outputs
        self.output_names = tuple(s.name for s in outputs)
        self.registry = registry
        self._lock = lock
        self._device_id = device_id
        self._device_type = device_type
        self._copier = copier  # rows in client CUDA regions (runtime.engine.device_rows)
        self._stream = stream
        # Precomputed for the hot path (numpy's dtype.name and np.prod cost microseconds).
        self._layout = [  # (name, dtype name, is input) of every bound tensor
            *((s.name, s.dtype.name, True) for s in inputs),
            *((s.name, s.dtype.name, False) for s in outputs),
        ]
        # A pageable input staging (no pinned memory to be had): wait for its DMA.
        self._pageable = {s.name: not staging[s.name].pinned for s in inputs}
        # Host addresses of the input and output staging (every bucket's view starts there).
        self._host_ptrs = {n: b.array.ctypes.data for n, b in staging.items()}
        self._out_ptrs = {n: b.array.ctypes.data for n, b in out_staging.items()}

    def capture_record(
        self,
        buf: BucketBuffers,
        session: ort.InferenceSession,
        staging: list[Array],
        out_staging: dict[str, Array],
    ) -> Captured:
        """What replays of the freshly captured `buf` use; registers its signature."""
        sig = self.signature(buf)
        self.registry.register(buf.bucket, sig)
        ins, outs = buf.inputs, buf.outputs
        return Captured(
            buf,
            staging,
            out_staging,
            self._values(buf),
            sig,
            {n: v.data_ptr() for n, v in (*ins.items(), *outs.items())},
            {n: v.data_ptr() for n, v in outs.items()},
            native_replay(session, buf.binding, buf.run_options),
        )

    def replay(
        self,
        cap: Captured,
        feeds: Sequence[Mapping[str, Array]],
        sizes: list[int],
        inputs_pinned: bool,
        host_outputs: Collection[str] | None,
        places: Sequence[Mapping[str, Array]] | None,
    ) -> BatchResult:
        """Replay `cap` for a batch (GraphSet.run's arguments, checked); the streamed way when
        there is a copy stream."""
        if self._stream is not None:
            return self._replay_streamed(self._stream, cap, feeds, sizes, host_outputs, places)
        return self._replay(cap, feeds, sizes, inputs_pinned, host_outputs)

    def _replay(
        self,
        cap: Captured,
        feeds: Sequence[Mapping[str, Array]],
        sizes: list[int],
        inputs_pinned: bool,
        host_outputs: Collection[str] | None = None,
    ) -> BatchResult:
        buf = cap.buf
        t0 = time.perf_counter_ns()
        hosts: list[Array | None] = []  # None: filled row by row on the device (device_rows)
        sync = False  # a pageable source: wait for its DMA before the replay reads it
        direct = False
        for spec, staging in zip(self._inputs, cap.staging, strict=True):
            arrays = [f[spec.name] for f in feeds]
            if has_device_rows(arrays):
                hosts.append(None)
                direct = True
            elif inputs_pinned and len(arrays) == 1 and arrays[0].shape[0] == buf.bucket:
                hosts.append(np.ascontiguousarray(arrays[0]))  # fills the bucket: no gather
            else:
                hosts.append(pad_batch(arrays, buf.bucket, out=staging))
                sync = sync or self._pageable[spec.name]
        t1 = time.perf_counter_ns()
        with self._lock:
            self.registry.check(buf.bucket, self._signature_now(cap))
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
                    self._device_id,
                )
            if direct and self._copier is not None:
                self._copier.synchronize(self._device_id)  # ORT's stream does not wait for ours
            elif sync and self._device_type != "cpu":
                buf.binding.synchronize_inputs()
            t2 = time.perf_counter_ns()
            cap.call()
            t3 = time.perf_counter_ns()
            wanted = self.output_names if host_outputs is None else host_outputs
            results = [self.host_output(buf, o, wanted) for o in self._outputs]
        t4 = time.perf_counter_ns()
        return BatchResult(
            per_request(results, sizes, buf.bucket, self.output_names),
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
        cap: Captured,
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
        buf = cap.buf
        t0 = time.perf_counter_ns()
        rows = sum(sizes)
        # Per input, how its rows reach the bound buffer: "device" (client CUDA regions, by
        # the copier on the legacy stream), "gather" (into pinned staging, one copy) or "each"
        # (one copy per request, from where it is).
        plans: list[tuple[TensorSpec, list[Array], str]] = []
        direct = False
        for spec, staging in zip(self._inputs, cap.staging, strict=True):
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
        device = cap.device
        with self._lock:
            try:
                self.registry.check(buf.bucket, self._signature_now(cap))
                for spec, arrays, how in plans:
                    dst = device[spec.name]
                    if how == "device":  # copy_rows_into zeroes the padding itself
                        if self._copier is None:
                            raise BadBatch("rows in device memory, but this GraphSet has no copier")
                        copy_rows_into(
                            dst, spec.row_nbytes, arrays, buf.bucket, self._copier, self._device_id
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
                    self._copier.synchronize(self._device_id)  # the legacy stream's copies
                t2 = time.perf_counter_ns()
                cap.call()
                t3 = time.perf_counter_ns()
                wanted = self.output_names if host_outputs is None else host_outputs
                views = cap.out_staging
                results: list[Array] = []
                placed: dict[int, list[Array]] = {}  # output index -> each request's place
                for k, spec in enumerate(self._outputs):
                    if spec.name not in wanted:
                        results.append(self.host_output(buf, spec, ()))
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
            except BaseException:
                # Copies queued before the failure may still be running: the staging, the
                # arena slots and the places must not be reused (the call's answer frees
                # its slot at once) until the stream has let go of them.
                with contextlib.suppress(Exception):
                    stream.synchronize()
                raise
        t4 = time.perf_counter_ns()
        outputs = per_request(results, sizes, buf.bucket, self.output_names)
        for k, dests in placed.items():
            for i, dest in enumerate(dests):
                outputs[i][k] = dest
        return BatchResult(
            outputs,
            rows,
            buf.bucket,
            True,
            BatchTimings(t1 - t0, t2 - t1, t3 - t2, t4 - t3),
            cap.device_outs,
        )

    def host_output(self, buf: BucketBuffers, spec: TensorSpec, wanted: Collection[str]) -> Array:
        """Output `spec` of `buf`'s last replay on the host; only its shape when not wanted."""
        if spec.name not in wanted:  # the shape without the bytes: a zero-stride view of a zero
            return np.broadcast_to(np.zeros((), spec.dtype), (buf.bucket, *spec.row_shape))
        out = buf.outputs[spec.name].numpy()
        # A CPU OrtValue's numpy() is a view of the bound buffer, which the next replay rewrites.
        return out.copy() if self._device_type == "cpu" else out

    def _values(self, buf: BucketBuffers) -> list[ort.OrtValue]:
        """The OrtValues the bucket holds now, in `_layout` order."""
        ins, outs = buf.inputs, buf.outputs
        return [ins[name] if is_input else outs[name] for name, _, is_input in self._layout]

    def _signature_now(self, cap: Captured) -> Signature:
        """`signature(cap.buf)`: the captured one while the bucket holds the captured
        OrtValues (compared by identity), else read back."""
        captured = cap.values
        now = self._values(cap.buf)
        if len(now) == len(captured) and all(map(operator.is_, now, captured)):
            return cap.sig
        return self.signature(cap.buf)

    def signature(self, buf: BucketBuffers) -> Signature:
        """Read back what the bucket's OrtValues are now (shape, address), for the registry."""
        sig = []
        for name, dtype, is_input in self._layout:
            v = buf.inputs[name] if is_input else buf.outputs[name]
            sig.append((name, tuple(v.shape()), dtype, v.data_ptr()))
        return sig


def rows_of(raw: npt.NDArray[np.uint8], spec: TensorSpec, rows: int) -> Array:
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


def native_replay(
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
