"""runtime.ipc.dtypes: the datatype table and the KServe BYTES codec."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.ipc.dtypes import (
    BY_CONFIG,
    BY_ONNX,
    DTYPES,
    BytesDecodeError,
    check_bytes_tensor,
    decode_bytes_tensor,
    encode_bytes_tensor,
    numpy_dtype,
)
from server._proto.inference import grpc_service_pb2 as pb

ALL = sorted(DTYPES)
FIXED = [w for w in ALL if w != "BYTES"]

# ----------------------------------------------------------------------------- BYTES codec

items_strategy = st.lists(st.binary(max_size=64), max_size=32)


@settings(max_examples=200, deadline=None)
@given(items_strategy)
def test_bytes_round_trip(items: list[bytes]) -> None:
    payload = encode_bytes_tensor(items)
    assert len(payload) == sum(4 + len(i) for i in items)
    assert decode_bytes_tensor(payload, len(items)) == items
    # memoryview and bytearray inputs decode the same; elements come back as bytes
    out = decode_bytes_tensor(memoryview(bytearray(payload)), len(items))
    assert out == items
    assert all(type(x) is bytes for x in out)


@settings(max_examples=200, deadline=None)
@given(items_strategy.filter(bool), st.data())
def test_every_strict_prefix_of_a_payload_is_rejected(
    items: list[bytes], data: st.DataObject
) -> None:
    payload = encode_bytes_tensor(items)
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(BytesDecodeError):
        decode_bytes_tensor(payload[:cut], len(items))


@settings(max_examples=100, deadline=None)
@given(items_strategy, st.integers(0, 40))
def test_count_mismatch_is_rejected(items: list[bytes], count: int) -> None:
    payload = encode_bytes_tensor(items)
    if count == len(items):
        assert decode_bytes_tensor(payload, count) == items
    else:
        with pytest.raises(BytesDecodeError, match=f"holds {len(items)} elements"):
            decode_bytes_tensor(payload, count)


def test_encoding_is_little_endian_uint32_prefix() -> None:
    assert encode_bytes_tensor([b"ab", b"", b"\x00"]) == (
        b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x00\x00"
    )
    assert encode_bytes_tensor([]) == b""
    assert decode_bytes_tensor(b"", 0) == []


@pytest.mark.parametrize(
    ("payload", "count", "message"),
    [
        # truncated length prefix
        (b"\x01\x00", 1, "truncated length prefix at byte 0"),
        (b"\x02\x00\x00\x00ab\x00", 2, "truncated length prefix at byte 6"),
        # a length running past the end
        (struct.pack("<I", 10) + b"abc", 1, "element 0 claims 10 bytes but 3 remain"),
        (
            encode_bytes_tensor([b"x"]) + struct.pack("<I", 0xFFFFFFFF),
            2,
            "element 1 claims 4294967295 bytes but 0 remain",
        ),
        # count mismatches
        (encode_bytes_tensor([b"a", b"b"]), 3, "holds 2 elements but the shape needs 3"),
        (encode_bytes_tensor([b"a", b"b"]), 1, "holds 2 elements but the shape needs 1"),
        (b"", 1, "holds 0 elements but the shape needs 1"),
    ],
    ids=[
        "short-prefix",
        "short-second-prefix",
        "length-past-end",
        "huge-length",
        "too-few",
        "too-many",
        "empty",
    ],
)
def test_malformed_payloads(payload: bytes, count: int, message: str) -> None:
    with pytest.raises(BytesDecodeError) as info:
        decode_bytes_tensor(payload, count)
    assert str(info.value) == message


def test_bytes_decode_error_is_a_value_error() -> None:
    assert issubclass(BytesDecodeError, ValueError)


# ----------------------------------------------------------------------------- DTYPES table


def test_table_holds_the_kserve_datatypes() -> None:
    assert set(DTYPES) == {
        "BOOL",
        "UINT8",
        "UINT16",
        "UINT32",
        "UINT64",
        "INT8",
        "INT16",
        "INT32",
        "INT64",
        "FP16",
        "FP32",
        "FP64",
        "BYTES",
    }
    # the reverse tables are bijections
    assert len(BY_ONNX) == len(DTYPES) == len(BY_CONFIG)


@pytest.mark.parametrize("wire", ALL)
def test_entry_is_consistent(wire: str) -> None:
    d = DTYPES[wire]
    assert d.wire == wire
    assert BY_ONNX[d.onnx] is d
    assert BY_CONFIG[d.config] is d
    assert numpy_dtype(wire) == np.dtype(d.numpy)
    # every wire type has a Triton model-config enum value
    assert pb.DataType.Value(d.config) != pb.DataType.Value("TYPE_INVALID")
    assert re.fullmatch(r"tensor\(\w+\)", d.onnx), d.onnx
    if d.contents_field is not None:
        assert d.contents_field in pb.InferTensorContents.DESCRIPTOR.fields_by_name


@pytest.mark.parametrize("wire", FIXED)
def test_itemsize_matches_numpy(wire: str) -> None:
    d = DTYPES[wire]
    assert d.itemsize == np.dtype(d.numpy).itemsize > 0


def test_bytes_is_variable_size() -> None:
    d = DTYPES["BYTES"]
    assert (d.itemsize, d.numpy, d.config, d.onnx) == (0, "object", "TYPE_STRING", "tensor(string)")
    assert d.contents_field == "bytes_contents"


def test_only_fp16_is_raw_only() -> None:
    assert [w for w in ALL if DTYPES[w].contents_field is None] == ["FP16"]


@pytest.mark.parametrize("wire", ALL)
def test_onnx_type_agrees_with_numpy(wire: str) -> None:
    onnx = pytest.importorskip("onnx")
    d = DTYPES[wire]
    inner = d.onnx[len("tensor(") : -1].upper()
    elem = onnx.TensorProto.DataType.Value(inner)
    assert onnx.helper.tensor_dtype_to_np_dtype(elem) == np.dtype(d.numpy)


def test_wire_types_cover_config_types_that_onnx_serves() -> None:
    """Every Triton TYPE_ that has a KServe wire name here; BF16 is the only one left out."""
    config_names = set(pb.DataType.DESCRIPTOR.values_by_name) - {"TYPE_INVALID"}
    assert config_names - set(BY_CONFIG) == {"TYPE_BF16"}


def test_check_bytes_tensor_walks_small_tensors_and_sizes_large_ones() -> None:
    """The front checks BYTES inputs on its event loop: walking the prefixes of millions of
    elements there held every other request up for seconds. Past `walk_up_to` elements only
    the size is checked; the worker decodes (and so checks) every tensor anyway."""
    good = encode_bytes_tensor([b"a", b"bc"])
    check_bytes_tensor(good, 2)
    with pytest.raises(BytesDecodeError, match="holds 2 elements but the shape needs 3"):
        check_bytes_tensor(good, 3)
    with pytest.raises(BytesDecodeError, match="element 0 claims 100 bytes"):
        check_bytes_tensor(struct.pack("<I", 100) + b"short", 1)
    malformed = struct.pack("<I", 100) + bytes(8 * 4)  # right size for 8, framing wrong
    check_bytes_tensor(malformed, 8, walk_up_to=4)  # too large to walk: sized only
    with pytest.raises(BytesDecodeError, match="9 bytes cannot hold the 8 elements"):
        check_bytes_tensor(bytes(9), 8, walk_up_to=4)
    with pytest.raises(BytesDecodeError):
        decode_bytes_tensor(malformed, 8)  # (what the worker does with it)
