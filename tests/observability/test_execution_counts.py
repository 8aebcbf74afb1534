"""Executions counted on calls that are no served request, in ModelStatistics and in the metrics
alike (an in-process server of its own).

The worker counts each execution once, on one call of its batch (Timings.executions), whichever
call that is; a served request's execution is counted with the request, and any other call's
must be counted by the front or the execution is lost:

- a shadow call (routing's mirror) batched with the shadow version's own requests: when the
  batch's first call was the shadow call, ModelStatistics and `microtune_executions_total`
  missed the execution (`execution_count +0` for a batch of 4 that ran);
- a request that fails after its model ran (its output region too small, its response over
  --max-message-bytes) and whose call carries its batch's execution: ModelStatistics counted it,
  the metrics did not (in a batch of 4 with one such request, `microtune_executions_total +0`
  while `microtune_inferences_total` +3).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from obs_support import InProcess, in_process_app, wait_for
from onnx import TensorProto, helper, numpy_helper
from prometheus_client.parser import text_string_to_metric_families

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg
from server.settings import DEMO_REPOSITORY

SHADOWED = "mvb"  # versions 1 and 2; routing: every request to 1, each mirrored to 2
BATCHED = "b4"  # the same model without routing
DELAY_US = 200_000  # their batching delay: long enough for the calls below to meet
UNBATCHED = "identity_fp32"  # (the demo's) answers as many bytes as it is sent
MAX_MESSAGE_BYTES = 1 << 20


def _mul_model(k: float) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["X", "k"], ["O"])],
        "mul",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("O", TensorProto.FLOAT, [None, 4])],
        [numpy_helper.from_array(np.array(k, np.float32), "k")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    root = tmp_path_factory.mktemp("execution-counts")
    repo = root / "models"
    for name, versions in ((SHADOWED, (1, 2)), (BATCHED, (1,))):
        for v in versions:
            (repo / name / str(v)).mkdir(parents=True)
            # Both versions compute the same: the shadow comparison matches.
            onnx.save(_mul_model(2.0), str(repo / name / str(v) / "model.onnx"))
        (repo / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
            "version_policy: { all { } }\n"
            "dynamic_batching { preferred_batch_size: [4] "
            f"max_queue_delay_microseconds: {DELAY_US} }}\n"
        )
    shutil.copytree(DEMO_REPOSITORY / UNBATCHED, repo / UNBATCHED)
    routing = root / "routing.json"
    table = {"weights": {"1": 10000}, "shadow": {"version": 2, "sample_bp": 10000}}
    routing.write_text(json.dumps({"models": {SHADOWED: table}}))
    with in_process_app(
        repo,
        routing_file=routing,
        allow_client_shm=True,
        max_message_bytes=MAX_MESSAGE_BYTES,
    ) as srv:
        yield srv


def request(model: str, version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    t = req.inputs.add()
    t.name, t.datatype = "X", "FP32"
    t.shape.extend([1, 4])
    req.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    return req


async def statistics(stub: pbg.GRPCInferenceServiceStub, model: str, version: str) -> Any:
    answer = await stub.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version))
    (ms,) = answer.model_stats
    return ms


def scrape(srv: InProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    assert srv.app.metrics_server is not None
    with urllib.request.urlopen(srv.app.metrics_server.url, timeout=10) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def metric(samples: dict[Any, float], name: str, **labels: str) -> float:
    return sum(
        v
        for (n, lab), v in samples.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


def test_an_execution_counted_on_a_shadow_call_is_counted(server: InProcess) -> None:
    def executions(samples: dict[Any, float]) -> float:
        return metric(samples, "microtune_executions_total", model=SHADOWED, version="2")

    async def scenario() -> tuple[Any, Any, dict[Any, float]]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            before = await statistics(stub, SHADOWED, "2")
            # Served by version 1 (one batch of 2, after the delay), then mirrored: the two
            # shadow calls wait in version 2's queue...
            await asyncio.gather(*(stub.ModelInfer(request(SHADOWED)) for _ in range(2)))
            await asyncio.sleep(0.02)
            # ... where two requests pinned to version 2 join them: one batch of 4, whose
            # execution the worker counts on its first call, a shadow call.
            await asyncio.gather(*(stub.ModelInfer(request(SHADOWED, "2")) for _ in range(2)))
            for _ in range(100):  # the shadow calls' answers come with the batch's
                after = await statistics(stub, SHADOWED, "2")
                if after.execution_count != before.execution_count:
                    break
                await asyncio.sleep(0.01)
            return before, after, scrape(server)

    metrics_before = scrape(server)
    before, after, metrics_after = server.run(scenario())
    assert after.inference_count - before.inference_count == 2  # the pinned requests
    assert after.execution_count - before.execution_count == 1
    batches = {b.batch_size: b.compute_infer.count for b in after.batch_stats}
    batches_before = {b.batch_size: b.compute_infer.count for b in before.batch_stats}
    assert {s: n - batches_before.get(s, 0) for s, n in batches.items()} == {4: 1}
    assert executions(metrics_after) - executions(metrics_before) == 1
    wait_for(
        lambda: metric(scrape(server), "microtune_shadow_comparisons_total", outcome="match") == 2,
        5,
        "both shadow comparisons",
    )


def batch_counts(ms: Any) -> dict[int, int]:
    return {b.batch_size: b.compute_infer.count for b in ms.batch_stats}


def test_a_response_too_large_after_the_run_counts_its_execution(server: InProcess) -> None:
    n = 3
    big = pb.ModelInferRequest(model_name=UNBATCHED)
    t = big.inputs.add()
    t.name, t.datatype = "INPUT0", "FP32"
    t.shape.append(250_000)  # 1 MB in, fits a request; 1 MB out, over the response's room
    big.raw_input_contents.append(np.ones(250_000, np.float32).tobytes())

    async def scenario() -> tuple[Any, Any]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            before = await statistics(stub, UNBATCHED, "1")
            for _ in range(n):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ModelInfer(big)
                assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            return before, await statistics(stub, UNBATCHED, "1")

    metrics_before = scrape(server)
    before, after = server.run(scenario())
    metrics_after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return metric(metrics_after, name, model=UNBATCHED, **labels) - metric(
            metrics_before, name, model=UNBATCHED, **labels
        )

    assert after.inference_stats.fail.count - before.inference_stats.fail.count == n
    assert after.execution_count - before.execution_count == n
    assert grew("microtune_requests_total", code="RESOURCE_EXHAUSTED") == n
    assert grew("microtune_executions_total") == n
    assert grew("microtune_execution_batch_size_bucket", le="1.0") == n


def test_an_output_region_too_small_in_a_batch_counts_its_execution(server: InProcess) -> None:
    key = f"/exec-counts-test-{os.getpid()}"
    fd = os.open(f"/dev/shm{key}", os.O_CREAT | os.O_RDWR, 0o600)
    os.ftruncate(fd, 8)  # an output of one row takes 16 bytes
    os.close(fd)
    small = request(BATCHED)
    out = small.outputs.add()
    out.name = "O"
    out.parameters["shared_memory_region"].string_param = "small"
    out.parameters["shared_memory_byte_size"].int64_param = 8
    asking_o = request(BATCHED)  # the same outputs asked for: one execution group
    asking_o.outputs.add().name = "O"

    async def scenario() -> tuple[Any, Any, list[Any]]:
        async with grpc.aio.insecure_channel(server.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            await stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="small", key=key, byte_size=8)
            )
            before = await statistics(stub, BATCHED, "1")
            # The failing request first: the worker counts the batch's execution on its call.
            first = asyncio.ensure_future(stub.ModelInfer(small))
            await asyncio.sleep(0.02)
            rest = [stub.ModelInfer(asking_o) for _ in range(3)]
            answers = await asyncio.gather(first, *rest, return_exceptions=True)
            await stub.SystemSharedMemoryUnregister(
                pb.SystemSharedMemoryUnregisterRequest(name="small")
            )
            return before, await statistics(stub, BATCHED, "1"), answers

    metrics_before = scrape(server)
    try:
        before, after, answers = server.run(scenario())
    finally:
        os.unlink(f"/dev/shm{key}")
    metrics_after = scrape(server)

    def grew(name: str, **labels: str) -> float:
        return metric(metrics_after, name, model=BATCHED, **labels) - metric(
            metrics_before, name, model=BATCHED, **labels
        )

    assert isinstance(answers[0], grpc.aio.AioRpcError), answers[0]
    assert answers[0].code() is grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(a, pb.ModelInferResponse) for a in answers[1:]), answers[1:]
    assert after.execution_count - before.execution_count == 1
    grown = {s: c - batch_counts(before).get(s, 0) for s, c in batch_counts(after).items()}
    assert {s: c for s, c in grown.items() if c} == {4: 1}
    assert grew("microtune_inferences_total") == 3
    assert grew("microtune_executions_total") == 1
    assert grew("microtune_execution_batch_size_count") == 1
    assert grew("microtune_execution_batch_size_sum") == 4
