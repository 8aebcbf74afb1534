"""server.rpc.wire: ModelInfer's request decoded from its bytes, raw inputs left in place.

Whatever the path (cached header or protobuf), the decoded request must equal what protobuf and
codec.decode_infer make of the same bytes, errors included.

Never import tritonclient here: it registers the same protobuf names as server._proto.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import event, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from runtime.ipc.dtypes import DTYPES
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.rpc.codec import decode_infer, encode_infer
from server.rpc.wire import (
    MAX_OTHER_FIELDS,
    MAX_TENSORS,
    InferDecoder,
    encode_response,
    request_head,
    split_request,
)
from server.types import InferRequest, InferResponse, ShmRef, Tensor


def dense_request(rows: int = 1, request_id: str = "", value: float = 0.5) -> pb.ModelInferRequest:
    r = pb.ModelInferRequest(model_name="dense", model_version="1", id=request_id)
    r.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    r.outputs.add(name="OUTPUT0")
    r.raw_input_contents.append(np.full((rows, 4), value, np.float32).tobytes())
    return r


def plain(req: InferRequest) -> InferRequest:
    """`req` with its tensors' data as bytes (the decoder's are views), to compare."""
    inputs = tuple(replace(t, data=bytes(t.data)) for t in req.inputs)
    return replace(req, inputs=inputs, parameters=dict(req.parameters))


def reference(data: bytes) -> InferRequest:
    return plain(decode_infer(pb.ModelInferRequest.FromString(data)))


# ----------------------------------------------------------------------------- split_request


def test_split_leaves_out_the_id_and_the_raw_inputs_which_stay_views() -> None:
    a = dense_request(request_id="a", value=1.0).SerializeToString()
    b = dense_request(request_id="bb", value=2.0).SerializeToString()
    split_a, split_b = split_request(a), split_request(b)
    assert split_a is not None and split_b is not None
    assert split_a[0] == split_b[0]  # the same header
    assert (split_a[1], split_b[1]) == (b"a", b"bb")
    (raw,) = split_a[2]
    assert raw.obj is a and bytes(raw) == np.full(4, 1.0, np.float32).tobytes()


@pytest.mark.parametrize(
    "data",
    [
        b"\x08\x01",  # field 1 as a varint: not ModelInferRequest's layout
        b"\x42\x00",  # field 8: unknown here
        b"\x0a\x05abc",  # a length past the end
        b"\x0a\xff\xff\xff\xff\xff\xff\x01",  # a length varint too long
        b"\x0a",  # a tag without its length
    ],
    ids=["varint", "unknown-field", "truncated", "huge-length", "no-length"],
)
def test_split_gives_up_on_anything_unexpected(data: bytes) -> None:
    assert split_request(data) is None


def test_an_empty_message_splits_into_nothing() -> None:
    assert split_request(b"") == (b"", b"", [])


# ----------------------------------------------------------------------------- InferDecoder


def test_a_repeated_header_is_decoded_from_the_cache_with_its_own_id_and_data() -> None:
    decoder = InferDecoder()
    first = dense_request(request_id="1", value=1.0).SerializeToString()
    second = dense_request(request_id="2", value=2.0).SerializeToString()
    assert plain(decoder.decode(first)) == reference(first)
    out = decoder.decode(second)
    assert plain(out) == reference(second)
    (t,) = out.inputs
    assert isinstance(t.data, memoryview) and t.data.obj is second  # no copy of the tensor
    assert len(decoder._templates) == 1


def test_a_large_raw_input_is_a_view_too() -> None:
    """80,000 bytes: a three-byte length varint."""
    decoder = InferDecoder()
    data = dense_request(rows=5000, value=3.0).SerializeToString()
    for _ in range(2):
        out = decoder.decode(data)
        assert plain(out) == reference(data)
        assert out.inputs[0].data.obj is data  # type: ignore[union-attr]


def test_a_cached_header_with_a_raw_input_of_another_size_gets_decode_infers_error() -> None:
    decoder = InferDecoder()
    decoder.decode(dense_request().SerializeToString())
    bad = dense_request()
    bad.raw_input_contents[0] = b"\x00" * 12
    with pytest.raises(InvalidInput) as exc:
        decoder.decode(bad.SerializeToString())
    assert exc.value.message == (
        "input 'INPUT0' has 12 bytes of raw content but shape [1, 4] of FP32 needs 16"
    )


def test_a_cached_header_with_a_missing_raw_input_gets_decode_infers_error() -> None:
    decoder = InferDecoder()
    decoder.decode(dense_request().SerializeToString())
    bad = dense_request()
    del bad.raw_input_contents[:]
    bad.inputs[0].contents.fp32_contents.extend([1.0] * 4)
    out = decoder.decode(bad.SerializeToString())  # typed contents: the full path decodes them
    assert plain(out) == reference(bad.SerializeToString())


def test_bytes_that_are_no_message_are_invalid_argument() -> None:
    with pytest.raises(InvalidInput) as exc:
        InferDecoder().decode(b"\x0a\x05abc")
    assert exc.value.message == "the request is not a valid ModelInferRequest message"


def test_an_id_that_is_not_utf8_is_refused_on_the_cached_path_too() -> None:
    decoder = InferDecoder()
    good = dense_request(request_id="x").SerializeToString()
    decoder.decode(good)
    bad = good.replace(b"\x1a\x01x", b"\x1a\x01\xff")
    with pytest.raises(InvalidInput) as exc:
        decoder.decode(bad)
    assert exc.value.message == "the request is not a valid ModelInferRequest message"


def test_shared_memory_and_bytes_inputs_are_never_cached() -> None:
    decoder = InferDecoder()
    r = pb.ModelInferRequest(model_name="m")
    r.inputs.add(name="T", datatype="BYTES", shape=[1])
    r.raw_input_contents.append(b"\x01\x00\x00\x00a")
    s = pb.ModelInferRequest(model_name="m")
    i = s.inputs.add(name="X", datatype="FP32", shape=[1])
    i.parameters["shared_memory_region"].string_param = "r"
    i.parameters["shared_memory_byte_size"].int64_param = 4
    for data in (r.SerializeToString(), s.SerializeToString()):
        assert plain(decoder.decode(data)) == reference(data)
    assert decoder._templates == {}


def test_the_cache_starts_over_when_full() -> None:
    decoder = InferDecoder(capacity=2)
    for rows in (1, 2, 3):
        decoder.decode(dense_request(rows).SerializeToString())
    assert len(decoder._templates) == 1


def test_a_header_larger_than_the_limit_is_decoded_but_never_cached() -> None:
    decoder = InferDecoder(max_header=256)
    r = dense_request()
    r.parameters["note"].string_param = "x" * 300
    for _ in range(2):
        assert plain(decoder.decode(r.SerializeToString())) == reference(r.SerializeToString())
    assert decoder._templates == {}


def test_parameters_are_shared_read_only() -> None:
    decoder = InferDecoder()
    r = dense_request()
    r.parameters["routing_key"].string_param = "user-1"
    for _ in range(2):
        out = decoder.decode(r.SerializeToString())
        assert dict(out.parameters) == {"routing_key": "user-1"}
    with pytest.raises(TypeError):
        out.parameters["routing_key"] = "other"  # type: ignore[index]


names = st.sampled_from(["INPUT0", "INPUT1", "X"])
datatypes = st.sampled_from(["FP32", "INT64", "UINT8", "BOOL", "FP16", "BYTES"])


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    r = pb.ModelInferRequest(
        model_name=draw(st.sampled_from(["", "dense", "simple"])),
        model_version=draw(st.sampled_from(["", "1"])),
        id=draw(st.text(max_size=4)),
    )
    sizes = []
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(st.lists(st.integers(-1, 3), max_size=3))
        datatype = draw(datatypes)
        r.inputs.add(name=draw(names), datatype=datatype, shape=shape)
        itemsize = DTYPES[datatype].itemsize
        sizes.append(math.prod(shape) * itemsize if itemsize and min(shape, default=0) >= 0 else 0)
    if draw(st.booleans()):  # mostly well-formed: raw contents of the right sizes
        raws = [draw(st.binary(min_size=n, max_size=n)) for n in sizes]
    else:
        raws = draw(st.lists(st.binary(max_size=24), max_size=3))
    r.raw_input_contents.extend(raws)
    for _ in range(draw(st.integers(0, 2))):
        r.outputs.add(name=draw(names))
    if draw(st.booleans()):
        r.parameters["routing_key"].string_param = draw(st.text(max_size=3))
    return r.SerializeToString()


def outcome(decode: object, data: bytes) -> object:
    try:
        return plain(decode(data))  # type: ignore[operator]
    except InvalidInput as exc:
        return ("InvalidInput", exc.message)


@settings(max_examples=300, deadline=None)
@given(st.lists(requests(), min_size=1, max_size=6))
def test_any_sequence_of_requests_decodes_as_protobuf_and_decode_infer_do(
    batch: list[bytes],
) -> None:
    """Cached or not, every request of a client's sequence gets what the full path gives."""
    decoder = InferDecoder()
    for data in batch + batch:  # the second pass finds the headers cached
        assert outcome(decoder.decode, data) == outcome(reference, data)
    event(f"headers cached: {min(len(decoder._templates), 1)}")


# ----------------------------------------------------------------------------- bounds


def varint(n: int, width: int = 1) -> bytes:
    """`n` as a varint of at least `width` bytes (protobuf reads the padded ones too)."""
    out = bytearray()
    while n > 0x7F or len(out) < width - 1:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(number: int, payload: bytes, key_width: int = 1, length_width: int = 1) -> bytes:
    return varint(number << 3 | 2, key_width) + varint(len(payload), length_width) + payload


VALID = dense_request(request_id="r").SerializeToString()
EMPTY_ENTRY = {"inputs": b"\x2a\x00", "outputs": b"\x32\x00", "raw": b"\x3a\x00"}
TOO_MANY = {
    "inputs": f"the request has more than {MAX_TENSORS} inputs, the most this server takes",
    "outputs": f"the request asks for more than {MAX_TENSORS} outputs, the most this server takes",
    "raw": (
        f"the request has more than {MAX_TENSORS} raw_input_contents entries, the most this "
        "server takes"
    ),
    "other": (
        f"the request has more than {MAX_OTHER_FIELDS} top-level fields besides its inputs, "
        "outputs and raw_input_contents (model_name, model_version, id, parameters, unknown "
        "fields), the most this server takes"
    ),
}
N = 2 << 20  # 2M fields of two bytes (or three: a group's)
FLOODS = {
    "empty inputs": (b"\x2a\x00" * N + VALID, "inputs"),
    "empty outputs": (VALID + b"\x32\x00" * N, "outputs"),
    "empty raw entries": (b"\x3a\x00" * N + VALID, "raw"),
    # a valid request, the model named 2M times first (the last one counts)
    "repeated model_name": (b"\x0a\x00" * N + VALID, "other"),
    "empty parameters": (VALID + b"\x22\x00" * N, "other"),
    # fields the header cache's walk does not take (protobuf's parse does)
    "unknown varint fields": (b"\x40\x00" * N + VALID, "other"),
    "empty inputs after an unknown field": (b"\x40\x00" + b"\x2a\x00" * N + VALID, "inputs"),
    "empty inputs with long lengths": (field(5, b"", length_width=2) * N + VALID, "inputs"),
    "a group of fields": (b"\x43" + b"\x08\x00" * N + b"\x44" + VALID, "other"),
}


@pytest.mark.parametrize("case", FLOODS)
def test_a_request_of_millions_of_fields_is_refused_before_it_is_parsed(case: str) -> None:
    """One valid message of millions of tiny fields held the front's event loop for seconds
    (walk, protobuf's parse, decode_infer, then a second parse for the model's name) and took
    ~200x its size in memory. Now it is refused as soon as the walk passes a bound."""
    data, kind = FLOODS[case]
    start = time.perf_counter()
    with pytest.raises(InvalidInput) as exc:
        InferDecoder().decode(data)
    assert exc.value.message == TOO_MANY[kind]
    # the model a refused request is counted under, read as far as the bound
    assert request_head(data)[0] == ("" if data.endswith(VALID) else "dense")
    assert time.perf_counter() - start < 1.0  # (milliseconds; it took seconds to minutes)


def many(kind: str, count: int) -> pb.ModelInferRequest:
    """A request of `count` inputs (with their raw contents) or outputs, or of `count` fields
    other than those (its model name, and parameters)."""
    r = pb.ModelInferRequest(model_name="m")
    if kind == "other":
        for k in range(count - 1):
            r.parameters[f"p{k}"].int64_param = k
    for k in range(count if kind in ("inputs", "raw") else 0):
        r.inputs.add(name=f"I{k}", datatype="UINT8", shape=[1])
        r.raw_input_contents.append(b"\x01")
    for k in range(count if kind == "outputs" else 0):
        r.outputs.add(name=f"O{k}")
    return r


@pytest.mark.parametrize("kind", ["inputs", "outputs", "other"])
def test_a_request_at_the_bounds_is_decoded_and_one_field_more_is_refused(kind: str) -> None:
    bound = MAX_OTHER_FIELDS if kind == "other" else MAX_TENSORS
    decoder = InferDecoder()
    data = many(kind, bound).SerializeToString()
    for _ in range(2):  # (cached the second time)
        assert plain(decoder.decode(data)) == reference(data)
    extra = {"inputs": b"\x2a\x00", "outputs": b"\x32\x00", "other": b"\x1a\x00"}[kind]
    with pytest.raises(InvalidInput) as exc:
        decoder.decode(data + extra)
    assert exc.value.message == TOO_MANY[kind]
    with pytest.raises(InvalidInput) as exc:
        decoder.decode(data + b"\x3a\x00" * (MAX_TENSORS + 1 - (kind == "inputs") * bound))
    assert exc.value.message == TOO_MANY["raw"]


@st.composite
def odd_fields(draw: st.DrawFn) -> bytes:
    """A top-level field as protobuf may find it: any wire type, padded keys and lengths,
    unknown fields and groups, or bytes that are no field at all."""
    number = draw(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 15, 16, (1 << 29) - 1]))
    key_width = draw(st.sampled_from([1, 1, 1, 2, 5, 6]))
    kind = draw(st.sampled_from(["len", "len", "len", "varint", "fixed", "group", "bad"]))
    if kind == "len":
        payload = {
            1: draw(st.sampled_from([b"dense", b"m", b"", b"\xff"])),
            2: draw(st.sampled_from([b"1", b""])),
            3: draw(st.text(max_size=3)).encode(),
            4: draw(st.sampled_from([b"", b"\x0a\x01k\x12\x02\x08\x01"])),
            5: draw(st.sampled_from([b"", b"\x0a\x01X\x12\x04FP32\x1a\x01\x01"])),
            6: draw(st.sampled_from([b"", b"\x0a\x01Y"])),
        }.get(number, draw(st.binary(max_size=4)))
        return field(number, payload, key_width, draw(st.sampled_from([1, 1, 2, 10, 11])))
    if kind == "varint":
        return varint(number << 3, key_width) + varint(
            draw(st.integers(0, 300)), draw(st.sampled_from([1, 3, 10, 11]))
        )
    if kind == "fixed":
        wire = draw(st.sampled_from([1, 5]))
        return varint(number << 3 | wire, key_width) + b"\x00" * draw(st.sampled_from([4, 8]))
    if kind == "group":
        inner = b"".join(draw(st.lists(st.sampled_from([b"\x08\x01", b"\x12\x00"]), max_size=3)))
        end = draw(st.sampled_from([number, number, number + 1]))
        return varint(number << 3 | 3, key_width) + inner + varint(end << 3 | 4, key_width)
    return draw(st.sampled_from([b"\x00\x01", b"\x0c", b"\x0e\x00", b"\x0a\x05ab", b"\x0a"]))


@settings(max_examples=500, deadline=None)
@given(st.lists(odd_fields(), max_size=6), st.booleans())
def test_odd_encodings_read_as_protobuf_reads_them(fields: list[bytes], valid: bool) -> None:
    """The bounded walk (request_head; split_request's count) stops only where protobuf
    refuses the bytes too, and reads the model, version and id protobuf reads."""
    data = b"".join(fields) + (VALID if valid else b"")
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        expected: object = ("InvalidInput", "the request is not a valid ModelInferRequest message")
    else:
        assert request_head(data) == (message.model_name, message.model_version, message.id)
        expected = outcome(reference, data)
    decoder = InferDecoder()
    for _ in range(2):
        assert outcome(decoder.decode, data) == expected


# ----------------------------------------------------------------------------- encode_response


outputs = st.lists(
    st.builds(
        Tensor,
        name=names,
        datatype=datatypes,
        shape=st.lists(st.integers(0, 300), max_size=3).map(tuple),
        # lengths of one, two and three varint bytes (hypothesis draws short binaries only)
        data=st.one_of(st.binary(max_size=40), st.integers(0, 70_000).map(lambda n: b"\x07" * n)),
        shm=st.one_of(st.none(), st.builds(ShmRef, st.just("r"), st.integers(0, 9), st.just(4))),
    ),
    max_size=3,
)


@settings(max_examples=200, deadline=None)
@given(outputs, st.text(max_size=4))
def test_the_response_is_the_message_protobuf_writes(out: list[Tensor], request_id: str) -> None:
    res = InferResponse("dense", "2", request_id, tuple(out), "stable")
    data = encode_response(res)
    assert pb.ModelInferResponse.FromString(data) == encode_infer(res)
