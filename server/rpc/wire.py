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

Before any of that, the number of top-level fields is bounded (MAX_TENSORS, MAX_OTHER_FIELDS):
the walk, protobuf's parse (a message object per input or output) and `decode_infer` all work
per field, on the event loop, so one valid message of millions of 2-byte fields (empty inputs,
a repeated model_name) held every other request and probe for seconds to minutes and took
~200x its size in memory. A message past a bound is refused before protobuf sees it, and the
walk that finds that out stops there: its cost is bounded, not the message's size.

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
from server.rpc.codec import decode_infer, encode_infer_head, read_varint
from server.types import InferRequest, InferResponse, Tensor

__all__ = [
    "MAX_OTHER_FIELDS",
    "MAX_TENSORS",
    "InferDecoder",
    "encode_response",
    "request_head",
    "split_request",
]

# The most inputs, requested outputs and raw_input_contents entries (each) a request may have:
# far more than any model has, few enough that walking and parsing them stays in milliseconds.
MAX_TENSORS = 4096
# The most other top-level fields (model_name, model_version, id, parameters entries, unknown
# fields and what unknown groups hold) a request may have: a client sends a handful.
MAX_OTHER_FIELDS = 1024

# ModelInferRequest's fields, all length-delimited (wire type 2): tag byte = number << 3 | 2.
_ID = 3 << 3 | 2
_RAW = 7 << 3 | 2
_TAGS = frozenset(range(1 << 3 | 2, 8 << 3, 8))  # fields 1 to 7
_RAW_OUTPUT = bytes([6 << 3 | 2])  # ModelInferResponse.raw_output_contents

# A message of fewer fields than this is within every bound, whatever its fields are.
_UNCOUNTED = min(MAX_TENSORS, MAX_OTHER_FIELDS)
# _scan's kinds of top-level field: other, inputs (5), outputs (6), raw_input_contents (7).
_LIMITS = (MAX_OTHER_FIELDS, MAX_TENSORS, MAX_TENSORS, MAX_TENSORS)
_TOO_MANY = (
    f"the request has more than {MAX_OTHER_FIELDS} top-level fields besides its inputs, "
    "outputs and raw_input_contents (model_name, model_version, id, parameters, unknown "
    "fields), the most this server takes",
    f"the request has more than {MAX_TENSORS} inputs, the most this server takes",
    f"the request asks for more than {MAX_TENSORS} outputs, the most this server takes",
    f"the request has more than {MAX_TENSORS} raw_input_contents entries, the most this "
    "server takes",
)


def split_request(data: bytes) -> tuple[bytes, bytes, list[memoryview]] | None:
    """The header (every field but `id` and `raw_input_contents`, as sent), the id's bytes and
    a view of each raw input of a serialized ModelInferRequest; None when the bytes hold
    anything else at the top level (protobuf decides what they mean). InvalidInput when they
    hold more fields than the bounds (module docstring) allow."""
    view = memoryview(data)
    n = len(data)
    header: list[bytes] = []
    raws: list[memoryview] = []
    ident = b""
    pos = start = 0  # start: where the header's current run of fields began
    uncounted = _UNCOUNTED
    try:
        while pos < n:
            uncounted -= 1
            if not uncounted:  # (once: then below 0)
                _check_counts(data)
            tag = data[pos]
            if tag not in _TAGS:
                return _unexpected(data)
            size = data[pos + 1]  # the length, a varint: mostly one byte
            p = pos + 2
            if size > 0x7F:
                size &= 0x7F
                shift = 7
                while True:
                    b = data[p]
                    p += 1
                    size |= (b & 0x7F) << shift
                    if b < 0x80:
                        break
                    shift += 7
                    if shift > 35:
                        return _unexpected(data)
            end = p + size
            if end > n:
                return _unexpected(data)
            if tag == _RAW or tag == _ID:  # noqa: SIM109 (a tuple of globals is built anew)
                if pos > start:
                    header.append(data[start:pos])
                if tag == _RAW:
                    raws.append(view[p:end])
                else:
                    ident = data[p:end]
                start = end
            pos = end
    except IndexError:  # a varint cut short by the end
        return _unexpected(data)
    if n > start:
        header.append(data[start:n])
    return b"".join(header), ident, raws


def _unexpected(data: bytes) -> None:
    """split_request's answer to bytes that protobuf must read: they may hold many more fields
    past what the walk read, so they are counted first."""
    _check_counts(data)


def _check_counts(data: bytes) -> None:
    too_many, _ = _scan(data)
    if too_many is not None:
        raise InvalidInput(too_many)


def request_head(data: bytes) -> tuple[str, str, str]:
    """The model name, version and id a serialized ModelInferRequest gives (for a request that
    failed: its statistics, its stream error), each "" if not given; all "" when protobuf
    would not read the bytes. Read from the bytes without parsing the rest: a refused request
    may be large, or hold too many fields (what was read up to the bound)."""
    _, head = _scan(data)
    if head is None:
        return "", "", ""
    try:
        name, version, ident = (bytes(head[k]).decode() if k in head else "" for k in (1, 2, 3))
    except UnicodeDecodeError:  # (protobuf refuses the message)
        return "", "", ""
    return name, version, ident


def _scan(data: bytes) -> tuple[str | None, dict[int, memoryview] | None]:
    """Walk every field of the message's top level (and the fields of unknown groups), kind
    by kind counted against the bounds. Returns why there are too many, if there are (the
    walk stops at the first bound passed), and the last model_name, model_version and id met
    (by field number); None for those when the bytes stop being a message protobuf reads."""
    view = memoryview(data)
    n = len(data)
    counts = [0, 0, 0, 0]
    head: dict[int, memoryview] = {}
    groups: list[int] = []  # the field numbers of the groups being skipped
    pos = 0
    try:
        while pos < n:
            key, pos = read_varint(data, pos)
            number, kind = key >> 3, key & 7
            if number == 0:
                return None, None
            field = 0
            if kind == 2:  # length-delimited
                size, pos = read_varint(data, pos)
                end = pos + size
                if end > n:
                    return None, None
                if not groups:
                    if number <= 3:
                        head[number] = view[pos:end]
                    elif number <= 7:
                        field = number - 4
                pos = end
            elif kind == 0:  # varint
                _, pos = read_varint(data, pos)
            elif kind in (1, 5):  # fixed 64 or 32 bits
                pos += 8 if kind == 1 else 4
            elif kind == 3:  # a group starts
                groups.append(number)
            elif kind == 4 and groups and groups[-1] == number:  # ... and ends
                groups.pop()
            else:
                return None, None
            counts[field] += 1
            if counts[field] > _LIMITS[field]:
                return _TOO_MANY[field], head
    except IndexError:  # a varint cut short by the end
        return None, None
    if pos > n or groups:
        return None, None
    return None, head


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
