"""Executions counted on calls that are no served request, in ModelStatistics and in the metrics
alike (an in-process server of its own).

The worker counts each execution once, on one call of its batch (Timings.executions), whichever
call that is; a served request's execution is counted with the request, and any other call's
must be counted by the front or the execution is lost:

- a shadow call (routing's mirror) batched with the shadow version's own requests: when the
  batch's first call was the shadow call, ModelStatistics and `microtune_executions_total`
  missed the execution (`execution_count +0` for a batch of 4 that ran);
"""

from __future__ import annotations

import asyncio
import json
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

SHADOWED = "mvb"  # versions 1 and 2; routing: every request to 1, each mirrored to 2
DELAY_US = 200_000  # its batching delay: long enough for the calls below to meet


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
    for v in (1, 2):
        (repo / SHADOWED / str(v)).mkdir(parents=True)
        # Both versions compute the same: the shadow comparison matches.
        onnx.save(_mul_model(2.0), str(repo / SHADOWED / str(v) / "model.onnx"))
    (repo / SHADOWED / "config.pbtxt").write_text(
        f'name: "{SHADOWED}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        "version_policy: { all { } }\n"
        "dynamic_batching { preferred_batch_size: [4] "
        f"max_queue_delay_microseconds: {DELAY_US} }}\n"
    )
    routing = root / "routing.json"
    table = {"weights": {"1": 10000}, "shadow": {"version": 2, "sample_bp": 10000}}
    routing.write_text(json.dumps({"models": {SHADOWED: table}}))
    with in_process_app(repo, routing_file=routing) as srv:
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
