"""ModelInfer's request and response in their serialized form, tensors copied once.

protobuf's Python API copies a bytes field on every read, so a tensor sent as
`raw_input_contents` would be copied out of the gRPC message before the one copy into the
worker's shared-memory slot. ModelInfer therefore takes the request's bytes (its handler has no
request deserializer, server.rpc.servicer) and `InferDecoder` walks only the top level of the
message: a raw input becomes a memoryview of the gRPC bytes, and everything else (model,
version, parameters, input and output descriptions) is a *header* whose bytes key a cache of
requests already decoded by protobuf and checked by `codec.decode_infer`. A client repeats its
header from call to call, so most calls are never parsed by protobuf at all.

Anything the walk does not expect (another wire type, an unknown or malformed field, shared
memory, BYTES or typed `contents` inputs, an unseen header) takes the full path: protobuf
parses the bytes and `decode_infer` decodes and checks them, with its errors.

The response goes the other way (`encode_response`): protobuf serializes everything but the
raw output contents, which are appended as their fields. Serialized messages concatenate into
their merge, and a repeated field's entries append, so this is the message protobuf would
write, without copying each output into the message and out again.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from google.protobuf.message import DecodeError

from runtime.ipc.dtypes import DTYPES
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.rpc.codec import decode_infer, encode_infer_head
from server.types import InferRequest, InferResponse, Tensor

__all__ = ["InferDecoder", "encode_response", "split_request"]

# ModelInferRequest's fields, all length-delimited (wire type 2): tag byte = number << 3 | 2.
_ID = 3 << 3 | 2
_RAW = 7 << 3 | 2
_FIRST, _LAST = 1 << 3 | 2, 7 << 3 | 2
_RAW_OUTPUT = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents


def split_request(data: bytes) -> tuple[bytes, bytes, list[memoryview]] | None:
    """The header (every field but `id` and `raw_input_contents`, as sent), the id's bytes and
    a view of each raw input of a serialized ModelInferRequest; None when the bytes hold
    anything else at the top level (protobuf decides what they mean)."""
    view = memoryview(data)
    n = len(data)
    header: list[bytes] = []
    raws: list[memoryview] = []
    ident = b""
    pos = start = 0  # start: where the header's current run of fields began
    while pos < n:
        tag = data[pos]
        if tag & 7 != 2 or not _FIRST <= tag <= _LAST:
            return None
        p = pos + 1
        size = shift = 0
        while True:  # the length, a varint
            if p >= n or shift > 35:
                return None
            b = data[p]
            p += 1
            size |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
        end = p + size
        if end > n:
            return None
        if tag in (_RAW, _ID):
            if pos > start:
                header.append(data[start:pos])
            if tag == _RAW:
                raws.append(view[p:end])
            else:
                ident = data[p:end]
            start = end
        pos = end
    if n > start:
        header.append(data[start:n])
    return b"".join(header), ident, raws


@dataclass(frozen=True, slots=True)
class _Template:
    """A decoded and checked request, less its id and its inputs' data."""

    request: InferRequest
    sizes: tuple[int, ...]  # the byte count each raw input must have


class InferDecoder:
    """Serialized ModelInferRequest -> InferRequest (see the module docstring). One per front;
    the cache holds up to `capacity` headers of at most `max_header` bytes each (a client's
    parameters could otherwise fill memory) and starts over when full."""

    def __init__(self, capacity: int = 1024, max_header: int = 4096) -> None:
        self.capacity = capacity
        self.max_header = max_header
        self._templates: dict[bytes, _Template] = {}

    def decode(self, data: bytes) -> InferRequest:
        split = split_request(data)
        if split is not None:
            header, ident, raws = split
            t = self._templates.get(header)
            if t is not None and len(raws) == len(t.sizes):
                req = _fill(t, ident, raws)
                if req is not None:
                    return req
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            raise InvalidInput("the request is not a valid ModelInferRequest message") from None
        req = decode_infer(message)
        if split is None or len(split[0]) > self.max_header or not _cacheable(req, len(split[2])):
            return req
        t = _Template(
            InferRequest(
                req.model,
                req.version,
                "",
                tuple(Tensor(i.name, i.datatype, i.shape, b"") for i in req.inputs),
                req.outputs,
                MappingProxyType(dict(req.parameters)),  # shared by every call of the header
            ),
            tuple(len(i.data) for i in req.inputs),
        )
        if len(self._templates) >= self.capacity:
            self._templates.clear()
        self._templates[split[0]] = t
        return _fill(t, split[1], split[2]) or req


def _cacheable(req: InferRequest, raw_count: int) -> bool:
    """Every input sent as raw contents of a fixed-size type, nothing in shared memory: then
    the header alone decides the decoding, and the raw inputs only need their byte counts."""
    return (
        raw_count == len(req.inputs)
        and not req.output_shm
        and all(t.shm is None and DTYPES[t.datatype].itemsize for t in req.inputs)
    )


def _fill(t: _Template, ident: bytes, raws: list[memoryview]) -> InferRequest | None:
    """The template with this call's id and inputs; None when they do not fit it (the full
    path then says why)."""
    base = t.request
    inputs = []
    for spec, raw, size in zip(base.inputs, raws, t.sizes, strict=True):
        if len(raw) != size:
            return None
        inputs.append(Tensor(spec.name, spec.datatype, spec.shape, raw))
    try:
        request_id = ident.decode() if ident else ""
    except UnicodeDecodeError:
        return None
    return InferRequest(
        base.model, base.version, request_id, tuple(inputs), base.outputs, base.parameters
    )


def encode_response(res: InferResponse) -> bytes:
    """The serialized ModelInferResponse of `res`: one raw_output_contents entry per output,
    empty for those written to shared memory (clients index them by output position)."""
    parts = [encode_infer_head(res).SerializeToString()]
    for t in res.outputs:
        parts += (_RAW_OUTPUT, _varint(len(t.data)), t.data)
    return b"".join(parts)


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)
