"""One request's use of client shared memory (Triton's extensions), for the handler.

Inputs in a system region become slices of its file (runtime.ipc.file_slice: read once, by
the kernel, into the worker's arena); inputs in a CUDA region stay references the worker
reads on the device. Outputs bound for a system region are copied straight from the arena into
it (`OutputRegions.slices`, resolved before the request runs; its sink is asked by the
RuntimeClient as it reads the answer); outputs bound for a CUDA region are written there by the
worker (`OutputRegions.cuda`). The response then describes each such output by region, without
its bytes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from msgspec.structs import replace as struct_replace

from runtime.client import OutputTensor, PreparedInput, RegionInput
from runtime.ipc.dtypes import BytesDecodeError, check_bytes_tensor
from runtime.ipc.file_slice import FileSlice, SliceTruncated
from server.errors import InvalidInput
from server.routing.shadow import OutputLike
from server.shm_regions import SharedMemoryRegistry
from server.types import InferRequest, ShmRef, Tensor

__all__ = [
    "OutputRegions",
    "in_regions",
    "response_tensor",
    "served_outputs",
    "shm_input",
]


def shm_input(shm: SharedMemoryRegistry, t: Tensor) -> Tensor:
    """A system shared-memory input becomes a view of its bytes (`shm` cleared); a CUDA one
    stays a reference, bounds-checked, for the worker to read on the device."""
    if t.shm is None:
        return t
    if shm.cuda_ref(t.shm, t.name) is not None:
        if t.datatype == "BYTES":
            raise InvalidInput(
                f"input '{t.name}' is BYTES: CUDA shared memory holds numeric tensors only"
            )
        return t
    data: FileSlice | bytes = shm.view(t.shm, t.name)
    if t.datatype == "BYTES":
        # Read now, once: the bytes checked are the bytes sent (the client could change its
        # region between a check and a later copy).
        data = _read(data)
        try:
            check_bytes_tensor(data, math.prod(t.shape))
        except BytesDecodeError as exc:
            raise InvalidInput(
                f"input '{t.name}' has malformed BYTES content in shared memory: {exc}"
            ) from None
    return struct_replace(t, data=data, shm=None)


def _read(region: FileSlice) -> bytes:
    try:
        return region.read()
    except SliceTruncated as exc:
        raise InvalidInput(str(exc)) from None


def in_regions(inputs: tuple[PreparedInput, ...], req: InferRequest) -> tuple[PreparedInput, ...]:
    """Plan inputs whose tensor is in a client CUDA region, as references to it."""
    refs = {t.name: t.shm for t in req.inputs if t.shm is not None}
    out = []
    for p in inputs:
        ref = refs.get(p.name)
        if ref is not None:
            p = RegionInput(p.name, p.datatype, p.shape, b"", ref.region, ref.offset, ref.byte_size)
        out.append(p)
    return tuple(out)


class OutputRegions:
    """The client regions a request's outputs go to, looked up and bounds-checked before the
    request runs (Triton refuses a bad output region before inference too: a request must not
    run, be counted and half-write its regions, to fail on its last output). `cuda`: outputs
    the worker writes into client CUDA regions, name -> (region, offset, size), or None.
    `slices`: the system regions' bytes, held until the request ends: a region unregistered
    meanwhile still takes its outputs (the slices keep its descriptor), as in Triton."""

    __slots__ = ("cuda", "slices")

    def __init__(self, shm: SharedMemoryRegistry, req: InferRequest) -> None:
        cuda: dict[str, tuple[str, int, int]] = {}
        system: list[tuple[str, ShmRef]] = []
        for name, ref in req.output_shm.items():
            if shm.cuda_ref(ref, name) is not None:
                cuda[name] = (ref.region, ref.offset, ref.byte_size)
            else:
                system.append((name, ref))
        self.cuda = cuda or None
        self.slices = {name: shm.view(ref, name) for name, ref in system}

    def sink(self, name: str, nbytes: int) -> FileSlice | None:
        """The RuntimeClient's OutputSink: where an output bound for a system region is copied,
        straight from the arena (one copy). None leaves it to `response_tensor`: no region, or
        one too small (whose error `response_tensor` gives)."""
        region = self.slices.get(name)
        return region if region is not None and nbytes <= len(region) else None


def response_tensor(req: InferRequest, o: OutputTensor, outs: OutputRegions | None) -> Tensor:
    """An output as the response describes it: its bytes, or where in a client region it is
    (copied there now if the sink did not take it: an inline output, or one too large)."""
    ref = req.output_shm.get(o.name)
    if ref is None:
        return Tensor(o.name, o.datatype, o.shape, o.data)
    if o.region_nbytes is not None:  # already in the client's region
        return Tensor(
            o.name, o.datatype, o.shape, b"", ShmRef(ref.region, ref.offset, o.region_nbytes)
        )
    assert outs is not None
    data = o.data
    if len(data) > ref.byte_size:
        raise InvalidInput(
            f"shared memory size specified with the request for output '{o.name}' "
            f"({ref.byte_size} bytes) should be at least {len(data)} bytes to hold the results"
        )
    outs.slices[o.name].write(data)
    return Tensor(o.name, o.datatype, o.shape, b"", ShmRef(ref.region, ref.offset, len(data)))


def served_outputs(
    outputs: Sequence[OutputTensor], outs: OutputRegions | None
) -> list[OutputLike] | None:
    """What was served, as bytes, for the shadow comparison; None when an output went to a
    client CUDA region. System-region outputs are read back (only for sampled requests)."""
    served: list[OutputLike] = []
    for o in outputs:
        data = o.data
        if o.region_nbytes is not None:
            region = None if outs is None else outs.slices.get(o.name)
            if region is None:
                return None  # a CUDA region's
            try:
                data = region.head(o.region_nbytes).read()
            except SliceTruncated:  # shrunk meanwhile: the client's answer is not ours to fail
                return None
        served.append((o.name, o.datatype, o.shape, data))
    return served
