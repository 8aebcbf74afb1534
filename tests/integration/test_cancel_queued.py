"""A request its client cancels while it waits in a batcher's queue leaves the queue: it frees
its place (max_queue_size) and its shared-memory slots at once, and it is never computed. As
Triton (r23.10+), whose dynamic batcher drops cancelled requests.

`held` batches up to 8 rows, waits a minute for them, and queues at most 4 requests; `held_x2`
is the same with two instances. Four one-row requests fill the queue and are cancelled by
their client; four two-row requests then find room, make a batch of 8 at once, and are the
only execution the statistics count. One instance: the front sends its calls on the version's
direct channel; two: on its link to the worker (runtime.channels).
"""

from __future__ import annotations

import re
import time
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import onnx
import pytest
from harness import Server, fp32_op_model, running_server
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Code = grpc.StatusCode
MODELS = {"held": "", "held_x2": "instance_group [ { count: 2 kind: KIND_CPU } ]\n"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("cancel") / "models"
    for name, instances in MODELS.items():
        (repo / name / "1").mkdir(parents=True)
        onnx.save(fp32_op_model("Mul", 2), str(repo / name / "1" / "model.onnx"))
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nmax_batch_size: 8\n{instances}'
            "dynamic_batching { max_queue_delay_microseconds: 60000000 "
            "preferred_batch_size: [ 8 ] default_queue_policy { max_queue_size: 4 } }\n"
        )
    with running_server(repo, repo.parent / "server") as s:
        yield s


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def request(model: str, x: np.ndarray) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="X", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.tobytes())
    return req


def metric(server: Server, line: str) -> float | None:
    """The value of the /metrics sample that starts with `line` (None: not there)."""
    found = re.search(r"metrics on (http://[0-9.:]+/metrics)", server.log())
    assert found, "the server logged no metrics address"
    text = urllib.request.urlopen(found.group(1), timeout=10).read().decode()
    for sample in text.splitlines():
        if sample.startswith(line + " "):
            return float(sample.rsplit(" ", 1)[1])
    return None


def until(cond: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def stats(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> pb.ModelStatistics:
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    return reply.model_stats[0]


@pytest.mark.parametrize("model", list(MODELS))
def test_cancelled_requests_free_their_queue_places_and_slots_and_never_run(
    server: Server, stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    pending = f'microtune_pending_requests{{model="{model}"}}'
    one = np.ones((1, 4), np.float32)
    waiting = [stub.ModelInfer.future(request(model, one), timeout=120) for _ in range(4)]
    until(lambda: metric(server, pending) == 4, "the four requests never queued")
    for call in waiting:
        call.cancel()
    for call in waiting:
        with pytest.raises(grpc.FutureCancelledError):
            call.result()
    until(lambda: not metric(server, pending), "the cancelled requests stayed queued")
    until(
        lambda: metric(server, "microtune_shm_slots_in_use") == 0,
        "the cancelled requests kept their shared-memory slots",
    )
    before = stats(stub, model)
    assert (before.execution_count, before.inference_count) == (0, 0)
    # As any request given up on, each is counted a failure (Triton counts a cancelled one so).
    assert before.inference_stats.fail.count == 4

    xs = [np.full((2, 4), k, np.float32) for k in range(4)]
    started = time.monotonic()
    answers = [stub.ModelInfer.future(request(model, x), timeout=30) for x in xs]
    for x, answer in zip(xs, answers, strict=True):
        reply = answer.result()  # the queue has room: no RESOURCE_EXHAUSTED "queue full"
        y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(2, 4)
        np.testing.assert_array_equal(y, x * 2)
    assert time.monotonic() - started < 20  # a full batch of 8 rows: not the minute's delay
    after = stats(stub, model)
    assert (after.execution_count, after.inference_count) == (1, 8)
    assert [(b.batch_size, b.compute_infer.count) for b in after.batch_stats] == [(8, 1)]
