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
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from runtime.engine.regions import Held, RegionError, RegionTable
from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import Infer, ModelSignature, OutputData, TensorRef

__all__ = [
    "ArenaIO",
    "BoundRun",
    "check_fits",
    "check_nbytes",
    "numeric_dtype",
    "run_bound",
    "uses_regions",
]


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


def uses_regions(call: Infer) -> bool:
    """Whether `call` runs here (the front sets `bound` when a TensorRef or OutputRequest
    names a region: one attribute read on the dispatch path, not a scan of the tensors)."""
    return call.bound


class BoundRun:
    """What `run_bound` produced: outputs in the order asked, and the phase boundaries."""

    __slots__ = ("outputs", "t_bound", "t_done", "t_ran")

    def __init__(
        self, outputs: tuple[OutputData, ...], t_bound: int, t_ran: int, t_done: int
    ) -> None:
        self.outputs = outputs
        self.t_bound = t_bound
        self.t_ran = t_ran
        self.t_done = t_done


def run_bound(
    session: ort.InferenceSession,
    call: Infer,
    buf: memoryview,
    regions: RegionTable,
    names: list[str],
    sig: ModelSignature,
    device_id: int,
    arena: ArenaIO,
    run_options: ort.RunOptions | None = None,
) -> BoundRun:
    """Run `call` on `session` (device `device_id`); `arena` reads and writes the tensors that
    are not in a region. RegionError for a tensor that does not fit its region or cannot live
    there (BYTES); onnxruntime's errors propagate."""
    device_type = regions.copier.device_type
    held = Held(regions)
    try:
        io = session.io_binding()
        for ref in call.inputs:
            if not ref.region:
                io.bind_cpu_input(ref.name, arena.read(ref, buf))
                continue
            use = held.use(ref.region)
            dtype = numeric_dtype(ref.name, ref.datatype)
            check_fits(ref.name, ref.region, ref.offset, ref.nbytes, use.memory.size)
            check_nbytes(ref.name, ref.datatype, ref.shape, ref.nbytes, dtype)
            io.bind_input(
                ref.name,
                device_type,
                use.memory.device_id,
                dtype,
                list(ref.shape),
                use.memory.ptr + ref.offset,
            )
        wanted = {o.name: o for o in call.outputs if o.region}
        for o in wanted.values():
            size = held.use(o.region).memory.size
            check_fits(o.name, o.region, o.offset, o.nbytes, size)
        for name in names:
            io.bind_output(name, device_type, device_id)
        t_bound = time.monotonic_ns()
        if run_options is None:
            session.run_with_iobinding(io)
        else:
            session.run_with_iobinding(io, run_options)
        t_ran = time.monotonic_ns()
        types = {t.name: t.datatype for t in sig.outputs}
        values = io.get_outputs()
        placed: dict[str, OutputData] = {}
        host_names: list[str] = []
        host_arrays: list[Any] = []
        for name, value in zip(names, values, strict=True):
            req = wanted.get(name)
            if req is None:
                host_names.append(name)
                host_arrays.append(value.numpy())
                continue
            datatype = types[name]
            dtype = numeric_dtype(name, datatype)
            shape = tuple(int(d) for d in value.shape())
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > req.nbytes:
                raise RegionError(
                    f"shared memory size specified with the request for output '{name}' "
                    f"({req.nbytes} bytes) should be at least {nbytes} bytes to hold the results"
                )
            memory = held.uses[req.region].memory
            if nbytes:
                regions.copier.copy(
                    memory.ptr + req.offset, value.data_ptr(), nbytes, memory.device_id
                )
            placed[name] = OutputData(name, datatype, shape, req.offset, nbytes, region=req.region)
        if placed:
            regions.copier.synchronize(device_id)  # the client reads the region on our answer
        written = iter(arena.write(host_names, host_arrays, sig, buf, call) if host_names else ())
        outputs = tuple(placed[n] if n in placed else next(written) for n in names)
        return BoundRun(outputs, t_bound, t_ran, time.monotonic_ns())
    finally:
        held.release()


def numeric_dtype(name: str, datatype: str) -> np.dtype[Any]:
    if datatype == "BYTES":
        raise RegionError(f"tensor '{name}' is BYTES: it cannot live in CUDA shared memory")
    return np.dtype(DTYPES[datatype].numpy)


def check_nbytes(
    name: str, datatype: str, shape: tuple[int, ...], nbytes: int, dtype: np.dtype[Any]
) -> None:
    want = math.prod(shape) * dtype.itemsize
    if nbytes != want:
        raise RegionError(
            f"input '{name}' has shared_memory_byte_size {nbytes} but shape {list(shape)} "
            f"of {datatype} needs {want} bytes"
        )


def check_fits(name: str, region: str, offset: int, nbytes: int, size: int) -> None:
    if offset < 0 or nbytes < 0 or offset + nbytes > size:
        raise RegionError(
            f"tensor '{name}': offset {offset} + byte_size {nbytes} is outside CUDA shared "
            f"memory region '{region}' ({size} bytes)"
        )
