"""ModelStatistics with Triton's semantics, on a batched model of the session's in-process server.

Triton's rules (docs/protocol/extension_statistics.md): `success`/`fail` count requests and
their end-to-end time; `queue` and `compute_input/infer/output` count successful requests and
the time each spent in that phase; `inference_count` counts inferences (a batch-n request counts
n); `execution_count` counts model executions (one execution can serve several requests);
`batch_stats` has one entry per execution batch size, whose compute_* counts are executions.
The session's server is shared, so the test compares before/after deltas.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import numpy as np
import pytest
from obs_support import InProcess, fp32_request

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg

MODEL, VERSION = "rows4", "1"
PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def rows4_request(batch: int, values: int = 4) -> pb.ModelInferRequest:
    req = fp32_request(MODEL, values)
    req.inputs[0].shape[:] = [batch, values]
    req.raw_input_contents[0] = np.ones((batch, values), np.float32).tobytes()
    return req


def snapshot(stats: pb.ModelStatisticsResponse) -> dict[str, Any]:
    (ms,) = stats.model_stats
    assert (ms.name, ms.version) == (MODEL, VERSION)
    s = ms.inference_stats
    return {
        "inference_count": ms.inference_count,
        "execution_count": ms.execution_count,
        "last_inference": ms.last_inference,
        **{p: (getattr(s, p).count, getattr(s, p).ns) for p in PHASES},
        "batches": {
            b.batch_size: (b.compute_input.count, b.compute_infer.count, b.compute_output.count)
            for b in ms.batch_stats
        },
    }


async def rows4_stats(stub: pbg.GRPCInferenceServiceStub) -> dict[str, Any]:
    """ModelStatistics of rows4 version 1, as `snapshot` reads it."""
    return snapshot(
        await stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL, version=VERSION))
    )


def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> tuple[int, int]:
    (c1, n1), (c0, n0) = after[key], before[key]
    return c1 - c0, n1 - n0


def test_statistics_have_triton_semantics(traced: InProcess) -> None:
    # Two concurrent waves (they share executions: 100 ms queue delay), one of them with a
    # batch-2 request, then one request that fails in the model.
    waves = [[rows4_request(1) for _ in range(4)], [rows4_request(1), rows4_request(2)] * 2]
    k = sum(len(w) for w in waves)
    inferences = sum(r.inputs[0].shape[0] for w in waves for r in w)

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)

            async def stats() -> dict[str, Any]:
                return await rows4_stats(stub)

            before = await stats()
            for wave in waves:
                await asyncio.gather(*(stub.ModelInfer(r) for r in wave))
            ok = await stats()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ModelInfer(rows4_request(1, values=3))
            assert err.value.code() is grpc.StatusCode.INTERNAL
            return before, ok, await stats()

    before, ok, after = traced.run(scenario())

    # Requests: each successful request counts once in success and in each phase.
    assert delta(ok, before, "success")[0] == k
    for phase in ("queue", "compute_input", "compute_infer", "compute_output"):
        count, ns = delta(ok, before, phase)
        assert count == k, phase
        assert ns > 0, phase
    assert delta(ok, before, "success")[1] >= delta(ok, before, "queue")[1]
    assert delta(ok, before, "fail") == (0, 0)
    # Inferences count rows, executions count model runs: batching served k requests in fewer.
    assert ok["inference_count"] - before["inference_count"] == inferences
    executions = ok["execution_count"] - before["execution_count"]
    assert 1 <= executions < k
    # Per batch size: one count per execution in each compute phase, and the executions'
    # batch sizes add up to the inferences.
    per_size = {
        size: counts[1] - before["batches"].get(size, (0, 0, 0))[1]
        for size, counts in ok["batches"].items()
    }
    for size, counts in ok["batches"].items():
        c0 = before["batches"].get(size, (0, 0, 0))
        assert len({c - b for c, b in zip(counts, c0, strict=True)}) == 1, (size, counts, c0)
    assert sum(per_size.values()) == executions
    assert sum(size * n for size, n in per_size.items()) == inferences
    assert max(size for size, n in per_size.items() if n) >= 2
    assert ok["last_inference"] > 0

    # The failure: counted in fail (with its time), nowhere else.
    assert delta(after, ok, "fail")[0] == 1
    assert delta(after, ok, "fail")[1] > 0
    for key in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert delta(after, ok, key) == (0, 0), key
    assert after["inference_count"] == ok["inference_count"]
    assert after["execution_count"] == ok["execution_count"]
    assert after["batches"] == ok["batches"]
    assert after["last_inference"] >= ok["last_inference"]


def test_statistics_of_every_model_and_unknown_version(traced: InProcess) -> None:
    async def scenario() -> tuple[pb.ModelStatisticsResponse, grpc.StatusCode]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            every = await stub.ModelStatistics(pb.ModelStatisticsRequest())
            try:
                await stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL, version="9"))
            except grpc.aio.AioRpcError as exc:
                return every, exc.code()
            raise AssertionError("an unknown version was answered")

    every, code = traced.run(scenario())
    # One entry per READY version (dense and dense_batched have versions 1 and 2).
    assert {(m.name, m.version) for m in every.model_stats} == {
        ("dense", "1"),
        ("dense", "2"),
        ("dense_batched", "1"),
        ("dense_batched", "2"),
        ("simple", "1"),
        ("rows4", "1"),
    }
    assert code is grpc.StatusCode.NOT_FOUND


def test_a_request_abandoned_in_the_queue_leaves_its_batch(traced: InProcess) -> None:
    """A request whose client cancels it while it waits in the batcher's queue is dropped
    there (a Cancel reaches the worker) and never runs: the request that joined it runs alone,
    and its execution is counted once, with its own rows. (Before cancels reached the worker,
    the abandoned call still ran, and the worker counted the execution on it: this test
    checked that such an execution was still counted.)"""

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)

            async def stats() -> dict[str, Any]:
                return await rows4_stats(stub)

            before = await stats()
            abandoned = stub.ModelInfer(rows4_request(1))
            await asyncio.sleep(0.02)  # queued: the batcher waits 100 ms for company
            abandoned.cancel()
            await stub.ModelInfer(rows4_request(2))  # runs alone: the other left the queue
            for _ in range(100):
                after = await stats()
                if after["execution_count"] != before["execution_count"]:
                    break
                await asyncio.sleep(0.01)
            return before, after

    before, after = traced.run(scenario())
    assert after["inference_count"] - before["inference_count"] == 2  # the answered request
    assert after["execution_count"] - before["execution_count"] == 1
    batches = {
        size: counts[1] - before["batches"].get(size, (0, 0, 0))[1]
        for size, counts in after["batches"].items()
    }
    assert {size: n for size, n in batches.items() if n} == {2: 1}
