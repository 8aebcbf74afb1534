"""Each version without dynamic batching runs its calls on threads of its own (runtime.lanes),
as many at once as its instance count, as each Triton model instance has its own thread.

Every such call that did not run inline went to one FIFO pool of the worker (--worker-threads,
2), shared by every model: while two slow calls of one model ran, a tiny model's call of a
batch size not seen before, or its first call after a reload (a hot swap), waited for them and
ended DEADLINE_EXCEEDED. And instance_group counts were ignored without dynamic batching.

`spin` (tests/integration/spin_model.py) runs as long as its input says; `m` adds 1.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from harness import Server, fp32_op_model, running_server
from spin_model import spin_repository, spin_request
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Code = grpc.StatusCode
# The spin models: their instance_group, and the calls they run at once.
SPINS = {
    "spin": ("", 2),  # none: --worker-threads (2)
    "spin_x1": ("instance_group [ { count: 1 kind: KIND_CPU } ]\n", 1),
    "spin_x3": ("instance_group [ { count: 2 }, { kind: KIND_CPU } ]\n", 3),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    """The server, and the spin loop count that takes about a second."""
    repo = tmp_path_factory.mktemp("isolation") / "models"
    n = spin_repository(repo, 1.0)
    config = (repo / "spin" / "config.pbtxt").read_text()
    for name, (groups, _) in SPINS.items():
        if name != "spin":
            shutil.copytree(repo / "spin" / "1", repo / name / "1")
            (repo / name / "config.pbtxt").write_text(config + groups)
    (repo / "m" / "1").mkdir(parents=True)
    onnx.save(fp32_op_model("Add", 1, "INPUT0", "OUTPUT0"), str(repo / "m" / "1" / "model.onnx"))
    (repo / "m" / "config.pbtxt").write_text("max_batch_size: 8\n")
    args = ("--model-control-mode", "explicit", "--load-model", "*")
    with running_server(repo, repo.parent / "server", args) as s:
        yield s, n


@pytest.fixture(scope="module")
def stub(served: tuple[Server, int]) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(served[0].url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def spin(model: str, n: int) -> pb.ModelInferRequest:
    req = spin_request(n)
    req.model_name = model
    return req


def m_request(rows: int) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="INPUT0", datatype="FP32", shape=[rows, 4])
    req.raw_input_contents.append(np.full((rows, 4), rows, np.float32).tobytes())
    return req


def call_m(stub: service_pb2_grpc.GRPCInferenceServiceStub, rows: int) -> float:
    """Seconds `m` took to answer `rows` rows (right)."""
    start = time.monotonic()
    reply = stub.ModelInfer(m_request(rows), timeout=2.0)
    took = time.monotonic() - start
    y = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(rows, 4)
    np.testing.assert_array_equal(y, np.full((rows, 4), rows + 1, np.float32))
    return took


def test_a_models_calls_do_not_wait_for_another_models_slow_calls(
    served: tuple[Server, int], stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """While two 4 s calls of `spin` hold both of its threads, `m` answers at once: with a
    batch size it has not run yet, and with its first call after a reload in place, both of
    which run on a thread (the inline path needs a timing the version has not measured)."""
    _, n = served
    for _ in range(20):
        call_m(stub, 1)
    slow: list[Future[Any]] = [stub.ModelInfer.future(spin("spin", 4 * n), timeout=60)]
    slow.append(stub.ModelInfer.future(spin("spin", 4 * n), timeout=60))
    time.sleep(0.5)  # both running
    assert call_m(stub, 8) < 1.5  # a size not seen before
    stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="m"), timeout=30)
    assert call_m(stub, 1) < 1.5  # the reloaded version's first call
    assert all(not f.done() for f in slow), "the spin calls ended early: nothing was shown"
    for f in slow:
        assert f.result().model_name == "spin"


def stats(stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str) -> tuple[int, int, int]:
    """The model's calls, their time waiting for a thread and their time computing (ns)."""
    reply = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    st = reply.model_stats[0].inference_stats
    return st.compute_infer.count, st.queue.ns, st.compute_infer.ns


@pytest.mark.parametrize("model", list(SPINS))
def test_a_version_runs_as_many_calls_at_once_as_it_has_instances(
    served: tuple[Server, int], stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    """Three calls of a second at once. One instance runs them in turn: they wait 0, 1 and 2
    computes. Three run them together: none waits. Two (no instance_group: --worker-threads)
    leave one to wait about one compute. ModelConfig says the count."""
    _, n = served
    config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    instances = SPINS[model][1]
    assert [g.count for g in config.instance_group] == [instances]
    before = stats(stub, model)
    calls = [stub.ModelInfer.future(spin(model, n), timeout=60) for _ in range(3)]
    for f in calls:
        assert f.result().model_name == model
    count, queued, computed = (b - a for a, b in zip(before, stats(stub, model), strict=True))
    assert count == 3
    ratio = queued / (computed / 3)  # time waiting for a thread, in mean computes
    if instances == 1:
        assert ratio > 2.0, ratio  # ~3
    elif instances == 2:
        assert 0.5 < ratio < 2.0, ratio  # ~1
    else:
        assert ratio < 0.3, ratio  # ~0


def test_a_call_cancelled_while_it_waits_for_a_lane_thread_never_runs(
    served: tuple[Server, int], stub: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    """`spin_x1`'s one thread runs a 2 s call; three calls wait for it and their client
    cancels them. They are dropped from the lane's queue: the next call runs right after the
    long one, and only those two are computed."""
    _, n = served
    before = stats(stub, "spin_x1")
    long = stub.ModelInfer.future(spin("spin_x1", 2 * n), timeout=60)
    time.sleep(0.3)
    waiting = [stub.ModelInfer.future(spin("spin_x1", n), timeout=60) for _ in range(3)]
    time.sleep(0.3)
    for f in waiting:
        f.cancel()
    for f in waiting:
        with pytest.raises(grpc.FutureCancelledError):
            f.result()
    assert long.result().model_name == "spin_x1"
    start = time.monotonic()
    assert stub.ModelInfer(spin("spin_x1", 1), timeout=30).model_name == "spin_x1"
    assert time.monotonic() - start < 1.0
    assert stats(stub, "spin_x1")[0] - before[0] == 2
