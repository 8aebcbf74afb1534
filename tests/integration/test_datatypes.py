"""Every KServe datatype that ONNX has round-trips through an identity model, in raw form
(tritonclient and the raw stub) and in typed `contents` form where a contents field exists."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import DATATYPES, ID_DIMS, identity_name, sample
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

# datatype -> InferTensorContents field (FP16 has none: raw only)
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
ALL = sorted(DATATYPES)


def raw_bytes(datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return serialize_byte_tensor(arr).item()
    return arr.tobytes()


def decode_output(resp: pb.ModelInferResponse, datatype: str) -> np.ndarray:
    (out,) = resp.outputs
    assert out.name == "OUT" and out.datatype == datatype
    shape = list(out.shape)
    raw = resp.raw_output_contents[0]
    if datatype == "BYTES":
        return deserialize_bytes_tensor(raw).reshape(shape)
    return np.frombuffer(raw, dtype=DATATYPES[datatype][2]).reshape(shape)


def assert_same(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    if want.dtype == object:
        assert [bytes(x) for x in got.ravel()] == [bytes(x) for x in want.ravel()]
    else:
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def request(datatype: str, arr: np.ndarray, *, typed: bool) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=identity_name(datatype), id=f"{datatype}-{typed}")
    t = req.inputs.add(name="IN", datatype=datatype, shape=list(arr.shape))
    if typed:
        values: list[Any] = (
            [bytes(x) for x in arr.ravel()] if datatype == "BYTES" else (arr.ravel().tolist())
        )
        getattr(t.contents, CONTENTS_FIELD[datatype]).extend(values)
    else:
        req.raw_input_contents.append(raw_bytes(datatype, arr))
    return req


@pytest.mark.parametrize("datatype", ALL)
def test_raw_roundtrip_tritonclient(
    client: grpcclient.InferenceServerClient, datatype: str
) -> None:
    for batch in (1, 3):
        arr = sample(datatype, batch)
        inp = grpcclient.InferInput("IN", list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        res = client.infer(identity_name(datatype), [inp])
        got = res.as_numpy("OUT")
        assert got is not None
        assert_same(got, arr)


@pytest.mark.parametrize("datatype", ALL)
def test_raw_roundtrip_stub(stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str) -> None:
    arr = sample(datatype, batch=2)
    resp = stub.ModelInfer(request(datatype, arr, typed=False), timeout=10)
    assert resp.model_name == identity_name(datatype)
    assert_same(decode_output(resp, datatype), arr)


@pytest.mark.parametrize("datatype", sorted(CONTENTS_FIELD))
def test_typed_contents_roundtrip(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str
) -> None:
    arr = sample(datatype, batch=2)
    resp = stub.ModelInfer(request(datatype, arr, typed=True), timeout=10)
    # Responses are always raw, whatever form the request used.
    assert_same(decode_output(resp, datatype), arr)


def test_typed_fp16_is_rejected(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    req = pb.ModelInferRequest(model_name="id_fp16")
    t = req.inputs.add(name="IN", datatype="FP16", shape=[1, ID_DIMS])
    t.contents.fp32_contents.extend([1.0] * ID_DIMS)  # no FP16 field exists; FP32's is wrong
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(req, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'IN'" in ei.value.details() and "raw" in ei.value.details()


@pytest.mark.parametrize(
    ("datatype", "values"),
    [("UINT8", [256, 0, 0, 0]), ("INT8", [-129, 0, 0, 0]), ("UINT16", [70000, 0, 0, 0])],
)
def test_typed_contents_out_of_range(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, datatype: str, values: list[int]
) -> None:
    req = pb.ModelInferRequest(model_name=identity_name(datatype))
    t = req.inputs.add(name="IN", datatype=datatype, shape=[1, ID_DIMS])
    getattr(t.contents, CONTENTS_FIELD[datatype]).extend(values)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(req, timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "input 'IN'" in ei.value.details() and "out of range" in ei.value.details()


def test_bytes_special_values(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    """Embedded NULs, empty strings and non-ASCII UTF-8 survive, raw and typed."""
    values = [b"", b"\x00", b"a\x00\x00b", "\u00e9\u4e2d\U0001f600".encode()]
    arr = np.array([values, values[::-1]], dtype=object)
    for typed in (False, True):
        resp = stub.ModelInfer(request("BYTES", arr, typed=typed), timeout=10)
        got = decode_output(resp, "BYTES")
        assert [bytes(x) for x in got.ravel()] == [bytes(x) for x in arr.ravel()], typed


@pytest.mark.parametrize("typed", [False, True])
def test_bytes_invalid_utf8(stub: service_pb2_grpc.GRPCInferenceServiceStub, typed: bool) -> None:
    arr = np.array([[b"ok", b"\xff\xfe", b"x", b""]], dtype=object)
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(request("BYTES", arr, typed=typed), timeout=10)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = ei.value.details()
    assert "input 'IN'" in details and "UTF-8" in details
    assert "onnxruntime string tensors hold text" in details
    # The server goes on serving text.
    good = np.array([[b"a", b"b", b"c", b"d"]], dtype=object)
    got = decode_output(stub.ModelInfer(request("BYTES", good, typed=typed), timeout=10), "BYTES")
    assert [bytes(x) for x in got.ravel()] == [b"a", b"b", b"c", b"d"]


def test_a_4_mib_tensor_travels_raw_both_ways(client: grpcclient.InferenceServerClient) -> None:
    """4 MiB each way, as raw contents (lengths of a 4-byte varint): the front takes the
    request's input as a view of the gRPC bytes and writes the response's output as a field
    of its own (server.rpc.wire). Different data each call: the header is cached from the
    first, the contents are not."""
    for seed in range(3):
        data = np.random.default_rng(seed).standard_normal(1 << 20).astype(np.float32)
        inp = grpcclient.InferInput("INPUT0", [1 << 20], "FP32")
        inp.set_data_from_numpy(data)
        res = client.infer("identity_fp32", [inp])
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), data)
