"""Shared-memory backpressure on a server with a tiny arena (16 slots of 64 KiB): a request whose
inputs are larger than the arena is RESOURCE_EXHAUSTED (outputs that do not fit come back
inline), concurrent requests that do not fit at once wait for
slots instead of failing, and no failure path leaks a slot (a request needing the whole arena
still runs afterwards)."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures as cf
import random
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from harness import Server, running_server
from onnx import TensorProto, helper
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from runtime.ipc.shm import align_up

SLOT = 64 * 1024
SLOTS = 16
ARENA = SLOT * SLOTS
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def small(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    args = ("--shm-slots", str(SLOTS), "--shm-slot-bytes", str(SLOT))
    with running_server(model_repository, tmp_path_factory.mktemp("small"), args) as s:
        yield s


@pytest.fixture(scope="module")
def stub(small: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    ch = grpc.insecure_channel(small.url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(ch)
    ch.close()


def identity_request(columns: int, item: bytes = b"x" * 100) -> pb.ModelInferRequest:
    """simple_identity (BYTES [batch, -1]) at batch 8. The server reserves as many output bytes
    as the input has, so the request takes about twice its payload in the arena."""
    arr = np.array([[item] * columns] * 8, dtype=object)
    req = pb.ModelInferRequest(model_name="simple_identity")
    req.inputs.add(name="INPUT0", datatype="BYTES", shape=[8, columns])
    req.raw_input_contents.append(serialize_byte_tensor(arr).item())
    return req


def whole_arena_request() -> pb.ModelInferRequest:
    # 8 x 630 x (4 + 100) = 524160 bytes in, as many reserved out: 1048320 <= ARENA (16 slots).
    req = identity_request(630)
    assert ARENA - SLOT < 2 * len(req.raw_input_contents[0]) <= ARENA
    return req


def test_request_larger_than_the_arena(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    req = identity_request(1300)  # 8 x 1300 x 104 = 1081600 bytes of input alone
    assert len(req.raw_input_contents[0]) > ARENA
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(req, timeout=10)
    assert ei.value.code() == Code.RESOURCE_EXHAUSTED, ei.value.details()
    assert ei.value.details() == (
        f"request needs {align_up(len(req.raw_input_contents[0]))} bytes of shared memory; "
        f"the arena holds {ARENA}"
    )
    resp = stub.ModelInfer(identity_request(10), timeout=10)
    assert list(resp.outputs[0].shape) == [8, 10]


def test_inputs_that_fit_run_though_their_output_guess_does_not(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    """832 KB of text in: the server reserves as much again for the output of unknown size,
    which cannot fit beside it in the 1 MiB arena; the reserve shrinks and the output comes
    back inline (it was RESOURCE_EXHAUSTED, though the input fits)."""
    req = identity_request(1000, item=b"y" * 100)
    assert ARENA / 2 < len(req.raw_input_contents[0]) < ARENA
    resp = stub.ModelInfer(req, timeout=10)
    out = deserialize_bytes_tensor(resp.raw_output_contents[0])
    assert list(resp.outputs[0].shape) == [8, 1000] and out.size == 8000
    assert all(bytes(item) == b"y" * 100 for item in out)


def test_contention_waits_for_slots(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    req = identity_request(300)  # ~250 KB in + out: 8 slots, two requests fit at a time

    def one(_: int) -> str:
        try:
            resp = stub.ModelInfer(req, timeout=30)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
        out = deserialize_bytes_tensor(resp.raw_output_contents[0])
        return "OK" if out.size == 8 * 300 and bytes(out[-1]) == b"x" * 100 else "WRONG"

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(24)))
    assert results == ["OK"] * 24, sorted(set(results))


def test_no_slot_leaks_on_failure_paths(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    # Worker-side rejection (invalid UTF-8 is found by the worker, after the slots are leased).
    bad_text = identity_request(4, item=b"\xff\xfe")
    with pytest.raises(grpc.RpcError) as ei:
        stub.ModelInfer(bad_text, timeout=10)
    assert ei.value.code() == Code.INVALID_ARGUMENT
    # onnxruntime rejects the data at run time (Cast "abc" -> INT32).
    text = serialize_byte_tensor(np.array([[b"abc"] * 16], dtype=object)).item()
    req = pb.ModelInferRequest(model_name="simple_string")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="BYTES", shape=[1, 16])
        req.raw_input_contents.append(text)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(req, timeout=10)
    # Callers that gave up: the worker answers later and the slots come back then.
    x = np.zeros((32, 1024), dtype=np.float32)
    slow = pb.ModelInferRequest(model_name="dense_large")
    slow.inputs.add(name="INPUT0", datatype="FP32", shape=[32, 1024])
    slow.raw_input_contents.append(x.tobytes())
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(slow, timeout=0.005)
        assert ei.value.code() == Code.DEADLINE_EXCEEDED
    # Only a fully free arena can hold this one (it waits for late answers, within its deadline).
    resp = stub.ModelInfer(whole_arena_request(), timeout=20)
    assert list(resp.outputs[0].shape) == [8, 630]


def test_no_slot_leaks_when_deadlines_race_answers(
    small: Server, stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """Deadlines about as long as the call itself: some answers land just as their caller
    gives up. Whoever holds the slots then (caller or reader) must return them."""
    x = np.zeros((8, 256), dtype=np.float32)
    req = pb.ModelInferRequest(model_name="dense")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[8, 256])
    req.raw_input_contents.append(x.tobytes())
    rng = random.Random(7)
    timeouts = [rng.uniform(0.0003, 0.004) for _ in range(8 * 120)]
    codes: collections.Counter[str] = collections.Counter()

    async def client(mine: list[float]) -> None:
        async with grpc.aio.insecure_channel(small.url) as ch:
            aio_stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
            for t in mine:
                try:
                    await aio_stub.ModelInfer(req, timeout=t)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as exc:
                    codes[exc.code().name] += 1

    async def run_all() -> None:
        await asyncio.gather(*(client(timeouts[i::8]) for i in range(8)))

    asyncio.run(asyncio.wait_for(run_all(), 60))
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED"}, dict(codes)
    resp = stub.ModelInfer(whole_arena_request(), timeout=20)
    assert list(resp.outputs[0].shape) == [8, 630]


LIMIT = 1 << 20  # --max-message-bytes of the `limited` server


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with --max-message-bytes 1 MiB serving `quad`, which answers four times its
    input (FP32 [n] -> [4n])."""
    repo = tmp_path_factory.mktemp("quad")
    graph = helper.make_graph(
        [helper.make_node("Concat", ["X", "X", "X", "X"], ["Y"], axis=0)],
        "quad",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (repo / "quad" / "1").mkdir(parents=True)
    onnx.save(model, str(repo / "quad" / "1" / "model.onnx"))
    (repo / "quad" / "config.pbtxt").write_text(
        'platform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
    )
    log_dir = tmp_path_factory.mktemp("limited")
    with running_server(repo, log_dir, ("--max-message-bytes", str(LIMIT))) as s:
        yield s


def quad(n: int, rid: str) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="quad", id=rid)
    req.inputs.add(name="X", datatype="FP32", shape=[n])
    req.raw_input_contents.append(np.ones(n, np.float32).tobytes())
    return req


def quad_counts(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> tuple[int, int]:
    stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="quad"), timeout=10)
    infer_stats = stats.model_stats[0].inference_stats
    return infer_stats.success.count, infer_stats.fail.count


def test_a_response_past_the_message_limit_is_refused_and_counted_failed(limited: Server) -> None:
    """With --max-message-bytes 1 MiB, 300 KB in make 1.2 MB out: gRPC failed the call as it
    sent it, after the server had counted a success, and on ModelStreamInfer it ended the
    stream (the requests after it unanswered). Now it is that request's RESOURCE_EXHAUSTED,
    counted a failure, and the stream goes on."""
    big, small = 75_000, 4  # 300 KB in, 1.2 MB out; 16 B in
    ch = grpc.insecure_channel(limited.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    try:
        before = quad_counts(stub)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(quad(big, "big"), timeout=30)
        assert ei.value.code() == Code.RESOURCE_EXHAUSTED, ei.value.details()
        assert (ei.value.details() or "").startswith(
            "the response would take 1200003 bytes (1200000 of outputs, 3 of the request's id "
            "and output region names), more than a response may carry"
        ), ei.value.details()
        success, fail = quad_counts(stub)
        assert (success - before[0], fail - before[1]) == (0, 1)

        answers = list(
            stub.ModelStreamInfer(
                iter([quad(small, "1"), quad(big, "2"), quad(small, "3")]), timeout=30
            )
        )
        assert [a.infer_response.id for a in answers] == ["1", "2", "3"]
        errors = [a.error_message[:39] for a in answers]
        assert errors == ["", "the response would take 1200001 bytes (", ""]
    finally:
        ch.close()


def test_a_response_past_the_limit_by_its_echoed_id_is_refused_and_counted_failed(
    limited: Server,
) -> None:
    """A response echoes its request's id: a request a few bytes under the limit, nearly all
    id, made a response a few bytes over it, which the check of the outputs' size let
    through. gRPC failed the call ("Sent message larger than max") and logged an ERROR
    traceback, the request counted a success, and on ModelStreamInfer the stream ended there.
    Now it is RESOURCE_EXHAUSTED, counted a failure, and the stream goes on (its error
    answer without the id, which would not fit either)."""
    req = quad(4, "")
    req.id = "x" * (LIMIT - req.ByteSize() - 8)
    assert LIMIT - 8 <= req.ByteSize() <= LIMIT
    ch = grpc.insecure_channel(limited.url)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
    try:
        before = quad_counts(stub)
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req, timeout=30)
        assert ei.value.code() == Code.RESOURCE_EXHAUSTED, ei.value.details()
        assert (ei.value.details() or "").startswith(
            f"the response would take {len(req.id) + 64} bytes (64 of outputs, {len(req.id)} of "
            "the request's id and output region names), more than a response may carry"
        ), ei.value.details()
        success, fail = quad_counts(stub)
        assert (success - before[0], fail - before[1]) == (0, 1)

        answers = list(stub.ModelStreamInfer(iter([quad(4, "1"), req, quad(4, "3")]), timeout=30))
        assert [a.infer_response.id for a in answers] == ["1", "", "3"]
        took = f"the response would take {len(req.id) + 64} bytes"
        assert [a.error_message[: len(took)] for a in answers] == ["", took, ""]
        assert answers[1].infer_response.model_name == "quad"
    finally:
        ch.close()
    assert '"level": "ERROR"' not in limited.log()
