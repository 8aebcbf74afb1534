"""The closed, typed message protocol between a front process and the runtime worker.

Every message is a msgspec Struct in one tagged union per direction, encoded as msgpack and framed
with a 4-byte little-endian length on a Unix stream socket. Tensors never travel here: messages
carry (offset, nbytes) references into the front's shared-memory arena (`runtime.ipc.shm`).
Nothing is pickled; an unknown tag or a malformed frame is a protocol error that closes the link.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from typing import Final

import msgspec

__all__ = [
    "GOLDEN_FILE",
    "PROTOCOL_VERSION",
    "Attach",
    "Batching",
    "Cancel",
    "CloseRegion",
    "Code",
    "FrameReader",
    "FrontMessage",
    "GetStatus",
    "Hello",
    "Infer",
    "InferDone",
    "LoadDone",
    "LoadModel",
    "ModelSignature",
    "OpenRegion",
    "OutputData",
    "OutputRequest",
    "QueuedCalls",
    "RegionDone",
    "Shutdown",
    "TensorInfo",
    "TensorRef",
    "Timings",
    "UnloadDone",
    "UnloadModel",
    "Welcome",
    "WorkerMessage",
    "WorkerStatus",
    "decode_front",
    "decode_worker",
    "encode",
]

PROTOCOL_VERSION: Final = 4
FRAME_HEADER: Final = struct.Struct("<I")
MAX_FRAME: Final = 64 * 1024 * 1024  # inline outputs are the only large payloads
GOLDEN_FILE: Final = "golden.json"  # a version's golden request/response, beside its model file


class Code(enum.IntEnum):
    """Outcome of a worker operation; the front maps these onto its domain errors."""

    OK = 0
    BAD_INPUT = 1
    NOT_LOADED = 2
    NOT_READY = 3
    OVERLOADED = 4
    DEADLINE = 5
    INTERNAL = 6
    MODEL_FAILED = 7  # onnxruntime rejected the data at run time (e.g. Cast of "abc" to int)
    UNSUPPORTED = 8  # the worker cannot do this at all (CUDA shared memory on a CPU worker)
    # onnxruntime refused the request's data as it ran (INVALID_ARGUMENT: an index out of
    # range, dims that do not agree): the client's to fix, yet a failure of this version
    # (a broken canary may refuse data its stable version takes: the guard counts it)
    DATA_REJECTED = 9
    # The front gave the call up (Cancel) while it waited: dropped, never run. Nobody waits for
    # this answer; it tells the front that the call's arena lease is free.
    CANCELLED = 10


class _Msg(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, frozen=True):
    pass


class TensorInfo(_Msg):
    """A model tensor as the ONNX graph (and config) declares it; -1 = variable dimension."""

    name: str
    datatype: str  # KServe wire datatype
    shape: tuple[int, ...]


class ModelSignature(_Msg):
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


class TensorRef(_Msg):
    """A tensor held in the sender's shared-memory arena at [offset, offset + nbytes), or, with
    `region`, at that place of a client CUDA shared-memory region the front registered."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    region: str = ""


class OutputRequest(_Msg):
    """An output to compute; with `region`, written into that client CUDA shared-memory region
    at [offset, offset + nbytes) instead of the arena."""

    name: str
    region: str = ""
    offset: int = 0
    nbytes: int = 0


class Timings(_Msg):
    """Nanoseconds spent in the worker for one call (Triton's statistics phases)."""

    queue_ns: int = 0
    input_ns: int = 0
    infer_ns: int = 0
    output_ns: int = 0
    batch_size: int = 1  # rows of the execution this call ran in
    executions: int = 1  # 1 for one call of each execution (so executions are counted once)
    padded_batch: int = 0  # the CUDA-graph bucket the batch was padded to (0 = no padding)
    # "replay" (a captured CUDA graph), "fallback" (eager on a version with captured graphs)
    # or "eager" (a version without graphs)
    mode: str = "eager"
    links: tuple[bytes, ...] = ()  # on the counted call: span refs of every call in the batch


# ----------------------------------------------------------------------------- front -> worker


class Hello(_Msg, tag="hello"):
    version: int
    frontend_id: int
    arena_name: str  # POSIX shm name, e.g. "/microtune-1234-0"
    arena_size: int


class Batching(_Msg):
    """Dynamic batching of a model version (Triton's dynamic_batching block)."""

    max_queue_delay_us: int = 0
    preferred: tuple[int, ...] = ()
    max_queue_size: int = 1024
    instances: int = 1  # batches that may execute at once (Triton's instance_group count)


class LoadModel(_Msg, tag="load"):
    request_id: int
    name: str
    version: int
    path: str  # model.onnx on disk
    max_batch_size: int
    declared: ModelSignature  # inputs/outputs from the config file; empty = take the graph's
    intra_op_threads: int = 1
    # Which load of the files at `path` this is: their fingerprint when a front saw them
    # change, plus the request's token for a RepositoryModelLoad (which reloads even the same
    # files). The fronts of a pod send the same revision for one change, so the worker loads
    # it once. "" (start-up, worker restart): whatever revision the worker has.
    revision: str = ""
    batching: Batching | None = None  # None: each call runs alone

    def identity(self) -> LoadModel:
        """What the instance loaded from this message is (the request id left out)."""
        return msgspec.structs.replace(self, request_id=0)

    def served_by(self, loaded: LoadModel | None) -> bool:
        """Whether the instance loaded from `loaded` (an identity) is the one this load asks
        for: the first front's load serves every front that asks for the same."""
        if loaded is None:
            return False
        if not self.revision:
            return msgspec.structs.replace(self, request_id=0, revision=loaded.revision) == loaded
        return self.identity() == loaded

    golden_path: str = ""  # its GOLDEN_FILE, if any: must be reproduced before it is ready
    # Config tensors with Triton's `reshape`: (name, its shape in the graph, batch excluded);
    # the worker serves the graph with those tensors seen as `declared` (runtime.engine.reshape).
    reshapes: tuple[tuple[str, tuple[int, ...]], ...] = ()
    # Without dynamic batching: how many calls of the version may run at once, each on a
    # thread of its own (runtime.lanes): Triton's instance_group counts, summed; 0 = the
    # worker's exec_threads. (A batching version's count is `batching.instances`.)
    instances: int = 0


class UnloadModel(_Msg, tag="unload"):
    request_id: int
    name: str
    version: int


class Infer(_Msg, tag="infer"):
    call_id: int
    name: str
    version: int
    inputs: tuple[TensorRef, ...]
    outputs: tuple[OutputRequest, ...]  # empty = all outputs
    out_offset: int  # where in the arena the worker may write outputs
    out_capacity: int
    deadline_ns: int = 0  # CLOCK_MONOTONIC deadline; 0 = none
    span: bytes = b""  # the request's trace/span id (24 bytes) for execution span links
    bound: bool = False  # some input or output lives in a client CUDA shared-memory region

    @property
    def rows(self) -> int:
        """The rows it adds to a batch: its first input's leading dimension (1 without)."""
        inputs = self.inputs
        return inputs[0].shape[0] if inputs and inputs[0].shape else 1


class Cancel(_Msg, tag="cancel"):
    """Nobody waits for call `call_id` of model `name` version `version` any more (its client
    cancelled it). Sent where the call went (the link or the version's direct channel), so the
    worker reads it after the call. A call still queued (a batcher, a lane) is answered
    CANCELLED at once and never runs; one already running finishes, and its answer returns the
    lease as before. As Triton (r23.10+) drops cancelled requests from its schedulers' queues:
    without this they kept their queue places (a live client got "queue full" behind calls
    nobody would read), their arena leases, and were computed."""

    call_id: int
    name: str
    version: int


class GetStatus(_Msg, tag="status"):
    """Ask what the worker holds for this front (the front's metrics poll it about once a
    second, off the request path)."""

    request_id: int


class Shutdown(_Msg, tag="shutdown"):
    pass


class OpenRegion(_Msg, tag="region_open"):
    """Register a client CUDA shared-memory region: open its 64-byte CUDA IPC handle."""

    request_id: int
    name: str
    handle: bytes
    device_id: int
    byte_size: int


class CloseRegion(_Msg, tag="region_close"):
    """Unregister a region ("" = all of this front's); closed once no call uses it."""

    request_id: int
    name: str


class Attach(_Msg, tag="attach"):
    """The first message on a direct channel (`LoadDone.channel`): whose calls follow, named
    by the id the worker gave that front's connection in its Welcome."""

    connection: int


FrontMessage = (
    Hello
    | LoadModel
    | UnloadModel
    | Infer
    | Cancel
    | GetStatus
    | Shutdown
    | OpenRegion
    | CloseRegion
    | Attach
)

# ----------------------------------------------------------------------------- worker -> front


class Welcome(_Msg, tag="welcome"):
    version: int
    pid: int
    device: str  # "cpu" or "cuda:N"
    providers: tuple[str, ...]
    connection: int = 0  # this connection's id, which a direct channel's Attach names


class LoadDone(_Msg, tag="loaded"):
    request_id: int
    code: Code
    message: str = ""
    signature: ModelSignature | None = None
    load_ns: int = 0
    # Bytes of device memory the load took (runtime.engine.memory); None on a CPU worker, or
    # when it could not be attributed.
    device_memory: int | None = None
    reused: bool = False  # the instance another front's load made (same identity): no load
    # A batched version served by one thread (from CUDA graphs, or a plain batcher with one
    # instance): the Unix socket of its direct channel, where the front sends its calls so
    # that they reach that thread without a hop through the connection's reader
    # (runtime.channels). "" = none: calls go by the link.
    channel: str = ""


class UnloadDone(_Msg, tag="unloaded"):
    request_id: int


class OutputData(_Msg):
    """An output written at [offset, offset + nbytes) of the arena, or carried inline when it
    did not fit in the space the front reserved (counted as a slow path)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    inline: bytes | None = None
    region: str = ""  # written into this client CUDA shared-memory region at offset


class InferDone(_Msg, tag="done"):
    call_id: int
    code: Code
    message: str = ""
    outputs: tuple[OutputData, ...] = ()
    timings: Timings | None = None


class QueuedCalls(_Msg):
    """Calls of one front waiting in the queue of one model version's batcher."""

    name: str
    version: int
    calls: int


class WorkerStatus(_Msg, tag="report"):
    """The answer to GetStatus, about the asking front only."""

    request_id: int
    queued: tuple[QueuedCalls, ...] = ()  # versions with calls waiting (none listed: none)
    pinned_bytes: int = 0  # bytes of the front's arena page-locked for the GPU (0 on a CPU)
    # Times the worker found the front's link or direct channels full and left answers to a
    # writer thread, since the front connected (runtime.ipc.outbound).
    send_stalls: int = 0


class RegionDone(_Msg, tag="region_done"):
    """The answer to OpenRegion and CloseRegion."""

    request_id: int
    code: Code
    message: str = ""


WorkerMessage = Welcome | LoadDone | UnloadDone | InferDone | WorkerStatus | RegionDone

_encoder = msgspec.msgpack.Encoder()
_front_decoder = msgspec.msgpack.Decoder(FrontMessage)
_worker_decoder = msgspec.msgpack.Decoder(WorkerMessage)


def encode(msg: FrontMessage | WorkerMessage) -> bytes:
    """Encode one message as a complete frame (length header + msgpack body)."""
    body = _encoder.encode(msg)
    return FRAME_HEADER.pack(len(body)) + body


def decode_front(body: bytes | memoryview) -> FrontMessage:
    return _front_decoder.decode(body)


def decode_worker(body: bytes | memoryview) -> WorkerMessage:
    return _worker_decoder.decode(body)


class FrameReader:
    """The frames of a stream read in pieces: `frames(data)` yields the body of every complete
    frame of what was read so far; a partial frame at the end waits for the next read. Bodies
    are views (of `data`, or of the bytes kept when a frame spans reads): decode each before
    the next read, which may reuse `data`'s buffer (decoding copies what it keeps)."""

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        self._partial = bytearray()
        self._need = 0  # bytes `_partial` must reach before it holds a whole frame

    def frames(self, data: memoryview) -> Iterator[memoryview]:
        if self._partial:
            # A frame spanning many reads (a large inline output) is appended to, and parsed
            # once whole: not copied again at every read.
            self._partial += data
            if len(self._partial) < self._need:
                return
            data = memoryview(self._partial)
            self._partial = bytearray()  # (`data` keeps the old one, no longer resized)
        pos, end, hdr = 0, len(data), FRAME_HEADER.size
        try:
            while end - pos >= hdr:
                (size,) = FRAME_HEADER.unpack_from(data, pos)
                if self.max_frame is not None and size > self.max_frame:
                    raise ValueError(f"frame of {size} bytes")
                if end - pos - hdr < size:
                    break
                body = data[pos + hdr : pos + hdr + size]
                pos += hdr + size
                yield body
        finally:
            if pos < end:
                self._partial += data[pos:end]
                rest = end - pos
                self._need = hdr + FRAME_HEADER.unpack_from(data, pos)[0] if rest >= hdr else hdr
