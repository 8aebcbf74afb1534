"""server.rpc.wire: ModelInfer's request decoded from its bytes, raw inputs left in place.

Whatever the path (cached header or protobuf), the decoded request must equal what protobuf and
codec.decode_infer make of the same bytes, errors included.

Never import tritonclient here: it registers the same protobuf names as server._proto.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from msgspec.structs import replace

from runtime.ipc.dtypes import DTYPES
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.rpc.codec import decode_infer, encode_infer
from server.rpc.wire import InferDecoder, encode_response, split_request
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
