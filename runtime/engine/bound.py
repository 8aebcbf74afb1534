"""One call whose tensors live in client CUDA shared-memory regions, run with an IOBinding.

Inputs in a region are bound to onnxruntime at the region's device address (no copy at all);
inputs in the arena are bound from their host views (onnxruntime copies them to the device).
Outputs are allocated by onnxruntime on the session's device; those the client wants in a
region are copied device to device into it, the rest come back to the arena as usual. Nothing
of a region's tensor crosses to the host.

With the `fake_opener`/`host_copier` of runtime.engine.regions the same code runs on the CPU EP
with host addresses: that is how CPU-only tests drive it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from runtime.engine.regions import Copier, Held, RegionError, RegionTable, hold
from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import Infer, ModelSignature, OutputData, TensorRef

__all__ = ["ArenaIO", "BoundRun", "place_outputs", "region_input", "run_bound"]


class ArenaIO(Protocol):
    """How the engine reads an input from, and writes outputs to, the front's arena."""

    def read(self, ref: TensorRef, buf: memoryview) -> np.ndarray[Any, Any]: ...

    def write(
        self,
        names: list[str],
        arrays: list[Any],
        sig: ModelSignature,
        buf: memoryview,
        call: Infer,
    ) -> tuple[OutputData, ...]: ...


@dataclass(frozen=True, slots=True)
class BoundRun:
    """What `run_bound` produced: outputs in the order asked, and the phase boundaries."""

    outputs: tuple[OutputData, ...]
    t_bound: int
    t_ran: int
    t_done: int


def run_bound(
    session: ort.InferenceSession,
    call: Infer,
    buf: memoryview,
    regions: RegionTable | None,
    names: list[str],
    sig: ModelSignature,
    device_id: int,
    arena: ArenaIO,
    run_options: ort.RunOptions | None = None,
) -> BoundRun:
    """Run `call` on `session` (device `device_id`); `arena` reads and writes the tensors that
    are not in a region. RegionError for a tensor that does not fit its region or cannot live
    there (BYTES), or for a front without regions; onnxruntime's errors propagate."""
    held = hold(regions)
    copier = held.regions.copier
    try:
        io = session.io_binding()
        for ref in call.inputs:
            if not ref.region:
                if ref.datatype == "BYTES":  # IOBinding binds no string tensor
                    raise RegionError(
                        f"input '{ref.name}' is BYTES: a call with tensors in CUDA shared "
                        f"memory ({_in_regions(call)}) carries numeric tensors only"
                    )
                io.bind_cpu_input(ref.name, arena.read(ref, buf))
                continue
            ptr, dtype = region_input(held, ref)
            io.bind_input(ref.name, copier.device_type, device_id, dtype, list(ref.shape), ptr)
        hold_outputs(held, call)
        to_regions = {o.name for o in call.outputs if o.region}
        for name in names:
            # An output read on the host is bound there: onnxruntime copies it back itself,
            # and a BYTES output (strings live on the CPU only) works too.
            if name in to_regions:
                io.bind_output(name, copier.device_type, device_id)
            else:
                io.bind_output(name, "cpu")
        t_bound = time.monotonic_ns()
        if run_options is None:
            session.run_with_iobinding(io)
        else:
            session.run_with_iobinding(io, run_options)
        t_ran = time.monotonic_ns()
        values = dict(zip(names, io.get_outputs(), strict=True))
        outputs = place_outputs(
            names,
            call,
            sig,
            buf,
            arena,
            held,
            copier,
            device_id,
            host=lambda n: values[n].numpy(),
            on_device=lambda n: (values[n].data_ptr(), tuple(values[n].shape())),
        )
        return BoundRun(outputs, t_bound, t_ran, time.monotonic_ns())
    finally:
        held.release()


def region_input(held: Held, ref: TensorRef) -> tuple[int, np.dtype[Any]]:
    """Input `ref`, which names a region: its device address and dtype, its region held.
    RegionError when it does not fit the region, or its size or datatype is wrong for it."""
    memory = held.use(ref.region).memory
    dtype = _numeric_dtype(ref.name, ref.datatype)
    _check_fits(ref.name, ref.region, ref.offset, ref.nbytes, memory.size)
    want = math.prod(ref.shape) * dtype.itemsize
    if ref.nbytes != want:
        raise RegionError(
            f"input '{ref.name}' has shared_memory_byte_size {ref.nbytes} but shape "
            f"{list(ref.shape)} of {ref.datatype} needs {want} bytes"
        )
    return memory.ptr + ref.offset, dtype


def hold_outputs(held: Held, call: Infer) -> None:
    """Hold the regions `call`'s outputs go to, checking that each place fits its region."""
    for o in call.outputs:
        if o.region:
            size = held.use(o.region).memory.size
            _check_fits(o.name, o.region, o.offset, o.nbytes, size)


def place_outputs(
    names: list[str],
    call: Infer,
    sig: ModelSignature,
    buf: memoryview,
    arena: ArenaIO,
    held: Held | None,
    copier: Copier | None,
    device_id: int,
    *,
    host: Callable[[str], Any],
    on_device: Callable[[str], tuple[int, tuple[int, ...]]],
) -> tuple[OutputData, ...]:
    """`call`'s outputs `names`, in that order: those it placed in a region (held by `held`)
    copied device to device from `on_device(name)` (address, shape) and synced, since the
    client reads the region on our answer; the others, `host(name)`, written to the arena.
    RegionError when a region place is too small for its output."""
    wanted = {o.name: o for o in call.outputs if o.region}
    placed: dict[str, OutputData] = {}
    if wanted:
        assert held is not None and copier is not None
        types = {t.name: t.datatype for t in sig.outputs}
        for name in names:
            o = wanted.get(name)
            if o is None:
                continue
            src, shape = on_device(name)
            nbytes = math.prod(shape) * _numeric_dtype(name, types[name]).itemsize
            if nbytes > o.nbytes:
                raise RegionError(
                    f"shared memory size specified with the request for output '{name}' "
                    f"({o.nbytes} bytes) should be at least {nbytes} bytes to hold the results"
                )
            if nbytes:
                copier.copy(held.uses[o.region].memory.ptr + o.offset, src, nbytes, device_id)
            placed[name] = OutputData(name, types[name], shape, o.offset, nbytes, region=o.region)
        if placed:
            copier.synchronize(device_id)
    rest = [n for n in names if n not in placed]
    written = iter(arena.write(rest, [host(n) for n in rest], sig, buf, call) if rest else ())
    return tuple(placed[n] if n in placed else next(written) for n in names)


def _numeric_dtype(name: str, datatype: str) -> np.dtype[Any]:
    if datatype == "BYTES":
        raise RegionError(f"tensor '{name}' is BYTES: it cannot live in CUDA shared memory")
    return np.dtype(DTYPES[datatype].numpy)


def _check_fits(name: str, region: str, offset: int, nbytes: int, size: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise RegionError(
            f"tensor '{name}': offset {offset} + byte_size {nbytes} is outside CUDA shared "
            f"memory region '{region}' ({size} bytes)"
        )


def _in_regions(call: Infer) -> str:
    """Names the tensors of `call` that are in CUDA shared memory, for a refusal whose cause
    is another tensor (the client may have put only an output there)."""
    named = [f"input '{t.name}'" for t in call.inputs if t.region]
    named += [f"output '{t.name}'" for t in call.outputs if t.region]
    return ", ".join(named)
