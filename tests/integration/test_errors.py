"""Bad requests: each asserts the status code AND a message substring (naming the tensor where
there is one), then proves the server still serves a good request right after."""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from harness import Server, assert_still_serving
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import InferenceServerException, serialize_byte_tensor

Stub = service_pb2_grpc.GRPCInferenceServiceStub
Code = grpc.StatusCode

A = np.arange(16, dtype=np.int32).reshape(1, 16)


def simple(
    *,
    model: str = "simple",
    version: str = "",
    inputs: list[tuple[str, str, list[int], bytes]] | None = None,
    outputs: tuple[str, ...] = (),
) -> pb.ModelInferRequest:
    """A `simple` request in raw form; `inputs` replaces the two good INT32 [1, 16] inputs."""
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    if inputs is None:
        inputs = [
            ("INPUT0", "INT32", [1, 16], A.tobytes()),
            ("INPUT1", "INT32", [1, 16], A.tobytes()),
        ]
    for name, datatype, shape, raw in inputs:
        req.inputs.add(name=name, datatype=datatype, shape=shape)
        req.raw_input_contents.append(raw)
    for o in outputs:
        req.outputs.add(name=o)
    return req


def strings(shape: list[int], raw: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="simple_string")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="BYTES", shape=shape)
    req.raw_input_contents.append(raw)
    good = serialize_byte_tensor(np.array([[b"1"] * 16], dtype=object)).item()
    req.raw_input_contents.append(good)
    return req


def stream_then_good(channel: grpc.Channel, first: bytes) -> list[pb.ModelStreamInferResponse]:
    """The answers of one ModelStreamInfer stream that sends `first` (bytes as they are), then
    a good `simple` request of id "after"."""
    stream = channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    good = simple()
    good.id = "after"
    return list(stream(iter([first, good.SerializeToString()]), timeout=30))


def expect(stub: Stub, req: pb.ModelInferRequest, code: grpc.StatusCode, *needles: str) -> str:
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(req, timeout=10)
    details = ei.value.details() or ""
    assert ei.value.code() == code, (ei.value.code(), details)
    for n in needles:
        assert n in details, (n, details)
    assert_still_serving(stub)
    return details


I32 = "INT32"
GOOD1 = ("INPUT1", I32, [1, 16], A.tobytes())

CASES: dict[str, tuple[Callable[[], pb.ModelInferRequest], grpc.StatusCode, tuple[str, ...]]] = {
    "unknown model": (
        lambda: simple(model="no_such_model"),
        Code.NOT_FOUND,
        ("no_such_model",),
    ),
    "unknown version": (
        lambda: simple(version="7"),
        Code.NOT_FOUND,
        ("'simple'", "version 7"),
    ),
    "non-numeric version": (
        lambda: simple(version="latest"),
        Code.INVALID_ARGUMENT,
        ("'latest'", "version"),
    ),
    "zero version": (
        lambda: simple(version="0"),
        Code.INVALID_ARGUMENT,
        ("'0'", "version"),
    ),
    "wrong input name": (
        lambda: simple(inputs=[("INPUTX", I32, [1, 16], A.tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUTX'", "'simple'"),
    ),
    "missing input": (
        lambda: simple(inputs=[GOOD1]),
        Code.INVALID_ARGUMENT,
        ("INPUT0", "missing"),
    ),
    "duplicate input": (
        lambda: simple(inputs=[GOOD1, GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT1'", "more than once"),
    ),
    "wrong dtype": (
        lambda: simple(inputs=[("INPUT0", "FP32", [1, 16], A.astype(np.float32).tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "FP32", "INT32"),
    ),
    "unknown dtype": (
        lambda: simple(inputs=[("INPUT0", "COMPLEX64", [1, 16], A.tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "COMPLEX64"),
    ),
    "wrong rank": (
        lambda: simple(inputs=[("INPUT0", I32, [16], A.tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "[16]", "[-1, 16]"),
    ),
    "wrong dim": (
        lambda: simple(inputs=[("INPUT0", I32, [2, 8], A.tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "[2, 8]", "[-1, 16]"),
    ),
    "negative dim": (
        lambda: simple(inputs=[("INPUT0", I32, [-1, 16], A.tobytes()), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "negative"),
    ),
    "no element but a huge dim": (  # 0 bytes, but no array can have that shape
        lambda: simple(inputs=[("INPUT0", I32, [0, 1 << 62], b""), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("input 'INPUT0' has shape [0, 4611686018427387904]: too large a tensor",),
    ),
    "zero batch": (
        lambda: simple(inputs=[("INPUT0", I32, [0, 16], b""), ("INPUT1", I32, [0, 16], b"")]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "batch size 0"),
    ),
    "batch over max_batch_size": (
        lambda: simple(
            inputs=[
                ("INPUT0", I32, [9, 16], np.zeros((9, 16), np.int32).tobytes()),
                ("INPUT1", I32, [9, 16], np.zeros((9, 16), np.int32).tobytes()),
            ]
        ),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "batch size 9", "max_batch_size 8"),
    ),
    "inputs disagree on batch": (
        lambda: simple(
            inputs=[
                ("INPUT0", I32, [2, 16], np.zeros((2, 16), np.int32).tobytes()),
                GOOD1,
            ]
        ),
        Code.INVALID_ARGUMENT,
        ("'simple'", "batch size"),
    ),
    "raw byte count too small": (
        lambda: simple(inputs=[("INPUT0", I32, [1, 16], A.tobytes()[:-1]), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "63 bytes", "needs 64"),
    ),
    "raw byte count too large": (
        lambda: simple(inputs=[("INPUT0", I32, [1, 16], A.tobytes() + b"\0" * 4), GOOD1]),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "68 bytes", "needs 64"),
    ),
    "BYTES truncated length prefix": (
        lambda: strings(
            [1, 16],
            serialize_byte_tensor(np.array([b"1"] * 15, dtype=object)).item() + b"\x01\x00",
        ),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "BYTES", "truncated length prefix"),
    ),
    "BYTES element overruns": (
        lambda: strings([1, 16], struct.pack("<I", 100) + b"short"),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "BYTES", "claims 100 bytes"),
    ),
    "BYTES count mismatch": (
        lambda: strings([1, 16], serialize_byte_tensor(np.array([b"1"] * 15, dtype=object)).item()),
        Code.INVALID_ARGUMENT,
        ("'INPUT0'", "15 elements", "16"),
    ),
    "unknown requested output": (
        lambda: simple(outputs=("OUTPUT0", "NOPE")),
        Code.INVALID_ARGUMENT,
        ("'NOPE'", "'simple'"),
    ),
    "output requested twice": (
        lambda: simple(outputs=("OUTPUT0", "OUTPUT0")),
        Code.INVALID_ARGUMENT,
        ("more than once",),
    ),
    "unavailable model": (
        lambda: simple(model="bad_corrupt", inputs=[("IN", "FP32", [1, 4], b"\0" * 16)]),
        Code.UNAVAILABLE,
        ("'bad_corrupt'", "unavailable"),
    ),
    "model without versions": (
        lambda: simple(model="bad_no_versions", inputs=[("IN", "FP32", [1, 4], b"\0" * 16)]),
        Code.UNAVAILABLE,
        ("'bad_no_versions'", "no version directory"),
    ),
    "no model name": (
        lambda: simple(model=""),
        Code.INVALID_ARGUMENT,
        ("model_name",),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_request(stub: Stub, case: str) -> None:
    make, code, needles = CASES[case]
    expect(stub, make(), code, *needles)


def test_contents_and_raw_mixed(stub: Stub) -> None:
    req = simple()
    req.inputs[0].contents.int_contents.extend(range(16))
    expect(stub, req, Code.INVALID_ARGUMENT, "'INPUT0'", "contents", "raw_input_contents")


def test_raw_entries_do_not_match_inputs(stub: Stub) -> None:
    req = simple()
    req.raw_input_contents.append(b"\0" * 64)
    expect(stub, req, Code.INVALID_ARGUMENT, "3 raw_input_contents", "2 inputs")


def test_no_data(stub: Stub) -> None:
    req = pb.ModelInferRequest(model_name="simple")
    req.inputs.add(name="INPUT0", datatype="INT32", shape=[1, 16])
    req.inputs.add(name="INPUT1", datatype="INT32", shape=[1, 16])
    expect(stub, req, Code.INVALID_ARGUMENT, "'INPUT0'", "no data")


def test_typed_contents_count_mismatch(stub: Stub) -> None:
    req = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        t = req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        t.contents.int_contents.extend(range(15))
    expect(stub, req, Code.INVALID_ARGUMENT, "'INPUT0'", "15 values", "16")


def test_bytes_that_are_no_request_message(channel: grpc.Channel, stub: Stub) -> None:
    """ModelInfer decodes its request's bytes itself (server.rpc.wire): bytes no protobuf
    parser accepts are INVALID_ARGUMENT, like any other bad request."""
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as ei:
        infer(b"\x0a\x05abc", timeout=10)  # model_name: 5 bytes announced, 3 sent
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details() == "the request is not a valid ModelInferRequest message"
    assert_still_serving(stub)


GARBAGE = b"\x0a\x05abc"  # field 1: 5 bytes announced, 3 sent


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("/inference.GRPCInferenceService/ServerLive", "ServerLiveRequest"),
        ("/inference.GRPCInferenceService/ModelReady", "ModelReadyRequest"),
        ("/inference.GRPCInferenceService/ModelMetadata", "ModelMetadataRequest"),
        ("/inference.GRPCInferenceService/ModelStatistics", "ModelStatisticsRequest"),
        ("/inference.GRPCInferenceService/RepositoryModelLoad", "RepositoryModelLoadRequest"),
        ("/inference.GRPCInferenceService/SystemSharedMemoryRegister", (
            "SystemSharedMemoryRegisterRequest")),
        ("/microtune.admin.v1.RoutingAdmin/SetRouting", "SetRoutingRequest"),
        ("/grpc.health.v1.Health/Check", "HealthCheckRequest"),
    ],
)  # fmt: skip
def test_bytes_that_are_no_request_message_on_any_rpc(
    channel: grpc.Channel, stub: Stub, method: str, message: str
) -> None:
    """Every RPC decodes its own request: left to grpc, bytes that do not parse answered
    UNKNOWN with the Python exception's text, and the server logged a traceback."""
    with pytest.raises(grpc.RpcError) as ei:
        channel.unary_unary(method)(GARBAGE, timeout=10)
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details() == f"the request is not a valid {message} message"
    assert_still_serving(stub)


def test_bytes_that_are_no_request_message_on_the_streams(
    channel: grpc.Channel, stub: Stub
) -> None:
    """On ModelStreamInfer, such a message is one request's error (error_message) and the
    stream goes on: it ended the stream, the requests after it unanswered. The other streams
    (health's Watch, reflection) end with INVALID_ARGUMENT."""
    answers = stream_then_good(channel, GARBAGE)
    assert [a.error_message for a in answers] == [
        "the request is not a valid ModelInferRequest message",
        "",
    ]
    assert answers[1].infer_response.id == "after"
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch")
    with pytest.raises(grpc.RpcError) as ei:
        list(watch(GARBAGE, timeout=10))
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details() == "the request is not a valid HealthCheckRequest message"
    reflect = channel.stream_stream(
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    )
    with pytest.raises(grpc.RpcError) as ei:
        list(reflect(iter([GARBAGE]), timeout=10))
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert_still_serving(stub)


def test_a_repeated_request_with_a_short_input_after_good_ones(stub: Stub) -> None:
    """The header of this request is known (cached) from good ones; its short raw input is
    still refused with decode_infer's message, and the next good one is right."""
    for _ in range(3):
        assert_still_serving(stub)
    req = simple(
        inputs=[("INPUT0", "INT32", [1, 16], A.tobytes()), ("INPUT1", "INT32", [1, 16], b"\0")]
    )
    expect(stub, req, Code.INVALID_ARGUMENT, "'INPUT1'", "1 bytes", "needs 64")


def test_model_rejects_data_at_run_time(stub: Stub) -> None:
    """simple_string casts its text to INT32: "abc" fails inside onnxruntime."""
    req = strings([1, 16], serialize_byte_tensor(np.array([b"abc"] * 16, dtype=object)).item())
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(req, timeout=10)
    # The model itself failed on this input: INTERNAL (status table), with the model's own
    # message rather than the generic "internal error (id ...)".
    assert ei.value.code() == Code.INTERNAL, ei.value.details()
    assert "model 'simple_string' version 1 failed" in ei.value.details()
    assert "internal error (id" not in ei.value.details()
    assert_still_serving(stub)


# ------------------------------------------------------------------------- through tritonclient


def test_tritonclient_errors(client: grpcclient.InferenceServerClient) -> None:
    a = grpcclient.InferInput("INPUT0", [1, 16], "INT32")
    a.set_data_from_numpy(A)
    b = grpcclient.InferInput("INPUT1", [1, 16], "INT32")
    b.set_data_from_numpy(A)
    wrong = grpcclient.InferInput("INPUT0", [1, 16], "INT64")
    wrong.set_data_from_numpy(A.astype(np.int64))
    classes = grpcclient.InferRequestedOutput("OUTPUT0", class_count=3)
    for kwargs, status, needle in [
        ({"model_name": "no_such_model", "inputs": [a, b]}, "NOT_FOUND", "no_such_model"),
        ({"model_name": "simple", "inputs": [a, b], "model_version": "7"}, "NOT_FOUND", "7"),
        ({"model_name": "simple", "inputs": [wrong, b]}, "INVALID_ARGUMENT", "'INPUT0'"),
        ({"model_name": "simple", "inputs": [a]}, "INVALID_ARGUMENT", "INPUT1"),
        (  # Triton's classification extension: not advertised, so refused, not ignored
            {"model_name": "simple", "inputs": [a, b], "outputs": [classes]},
            "UNIMPLEMENTED",
            "output 'OUTPUT0': classification is not supported",
        ),
    ]:
        with pytest.raises(InferenceServerException) as ei:
            client.infer(**kwargs)
        assert ei.value.status() == f"StatusCode.{status}", ei.value.message()
        assert needle in ei.value.message()
        res = client.infer("simple", [a, b])
        np.testing.assert_array_equal(res.as_numpy("OUTPUT0"), A + A)


# ------------------------------------------------------------------------------------ deadlines


def dense_large_batch() -> pb.ModelInferRequest:
    """dense_large at batch 32: tens of milliseconds of compute on a CPU."""
    x = np.random.default_rng(0).standard_normal((32, 1024)).astype(np.float32)
    req = pb.ModelInferRequest(model_name="dense_large")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[32, 1024])
    req.raw_input_contents.append(x.tobytes())
    return req


def failures(stub: Stub, model: str) -> int:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=5)
    return sum(s.inference_stats.fail.count for s in stats.model_stats)


def test_deadline_expired_on_the_client(stub: Stub) -> None:
    # gRPC keeps deadlines in milliseconds: a 1 us timeout can outlive a sub-millisecond call,
    # so the call here is a slow one.
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(dense_large_batch(), timeout=1e-6)
    assert ei.value.code() == Code.DEADLINE_EXCEEDED
    assert_still_serving(stub)


def test_deadline_expires_in_the_server(stub: Stub) -> None:
    """The deadline passes while the worker computes: DEADLINE_EXCEEDED, the server counts the
    failure, takes its shared-memory slots back when the worker answers, and serves on."""
    req = dense_large_batch()
    before = failures(stub, "dense_large")
    for _ in range(5):
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req, timeout=0.005)
        assert ei.value.code() == Code.DEADLINE_EXCEEDED, ei.value.details()
    deadline = time.monotonic() + 5
    while failures(stub, "dense_large") == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert failures(stub, "dense_large") > before  # the server saw (some of) them
    resp = stub.ModelInfer(req, timeout=30)
    assert list(resp.outputs[0].shape) == [32, 10]
    assert_still_serving(stub)


@pytest.mark.parametrize("model", ["dense", "dense_large"])  # plain and batched
def test_a_timeout_parameter_too_large_to_matter_is_no_deadline(
    client: grpcclient.InferenceServerClient, model: str
) -> None:
    # tritonclient's infer(timeout=...) is microseconds in an int64; its largest value (a
    # client's "no timeout") overflowed the worker's nanosecond deadline into INTERNAL.
    width = 256 if model == "dense" else 1024
    x = grpcclient.InferInput("INPUT0", [1, width], "FP32")
    x.set_data_from_numpy(np.ones((1, width), np.float32))
    for timeout in (10**16, 2**62, 2**63 - 1):
        res = client.infer(model, [x], timeout=timeout)
        assert res.as_numpy("OUTPUT0").shape[0] == 1


def test_an_error_that_quotes_a_huge_request_stays_that_error(stub: Stub) -> None:
    # Messages quote what the client sent; a status's details travel in a header, and past
    # grpc's metadata limit the client got RESOURCE_EXHAUSTED "Stream removed" instead.
    name = "X" * 100_000
    req = simple(inputs=[(name, I32, [1, 16], A.tobytes()), GOOD1])
    details = expect(stub, req, Code.INVALID_ARGUMENT, "XXXX", "characters in all)")
    assert len(details) <= 2000
    # In a stream, the error message is the same, clipped the same.
    (answer,) = stub.ModelStreamInfer(iter([req]), timeout=10)
    assert answer.error_message == details


def test_a_shape_of_thousands_of_dims_is_refused_as_such(stub: Stub) -> None:
    req = simple(inputs=[("INPUT0", I32, [1] * 3000, A.tobytes()), GOOD1])
    expect(stub, req, Code.INVALID_ARGUMENT, "INPUT0")


def test_streams_cancelled_while_the_server_writes_log_no_error(server: Server, stub: Stub) -> None:
    """A client that stops reading a stream (its responses wait on flow control) and then
    cancels it made grpc log "ExecuteBatchError raised in core" with a traceback at ERROR,
    one per stream: a log any client could flood."""
    req = simple()
    req.id = "x" * (256 << 10)  # echoed in each response: the window fills at once
    big = req.SerializeToString()

    async def one() -> None:
        async with grpc.aio.insecure_channel(server.url) as ch:
            method = ch.stream_stream(
                "/inference.GRPCInferenceService/ModelStreamInfer",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )

            async def requests() -> Any:
                for _ in range(200):
                    yield big

            call = method(requests())
            await asyncio.sleep(1.0)  # never read: the server's writes wait
            call.cancel()
            await asyncio.sleep(0.3)

    before = server.log().count("ExecuteBatchError")

    async def all_of_them() -> None:
        await asyncio.gather(*(one() for _ in range(4)))

    asyncio.run(all_of_them())
    time.sleep(0.5)
    assert server.log().count("ExecuteBatchError") == before
    assert_still_serving(stub)


def test_a_request_of_millions_of_empty_inputs_is_refused_at_once(
    channel: grpc.Channel, stub: Stub
) -> None:
    """One valid ModelInferRequest of 4M empty inputs (8 MB) held the front's event loop for
    ~17 s, every other request and health probe waiting, and took ~200x its size in memory
    (protobuf's parse, then a second one for the model's name). It is refused as soon as the
    walk over its bytes passes the bound, on ModelInfer and on a stream alike."""
    body = b"\x2a\x00" * (4 << 20) + simple().SerializeToString()
    too_many = "the request has more than 4096 inputs, the most this server takes"
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as ei:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")(body, timeout=30)
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details() == too_many
    answers = stream_then_good(channel, body)
    assert [a.error_message for a in answers] == [too_many, ""]
    assert answers[1].infer_response.id == "after"
    assert time.monotonic() - start < 5  # (milliseconds of work; it took ~35 s)
    assert_still_serving(stub)
