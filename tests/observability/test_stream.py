"""ModelStreamInfer runs a stream's requests side by side and answers them in request order.

It served them one at a time: requests of one stream never shared an execution, so a
streaming client got none of dynamic batching (each request of `rows4` waited out the
batcher's 100 ms queue delay alone). Triton's stream runs them as they arrive and, for a
model that is not decoupled, answers in the order they came."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np
from obs_support import InProcess
from test_statistics import rows4_request, rows4_stats

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg

N = 8


def test_a_streams_requests_batch_together_and_answer_in_order(traced: InProcess) -> None:
    requests = []
    for i in range(N):
        req = rows4_request(1)
        req.id = f"r{i}"
        req.raw_input_contents[0] = np.full((1, 4), i, np.float32).tobytes()
        requests.append(req)
    bad = rows4_request(1)
    bad.id = "bad"
    bad.inputs[0].datatype = "INT32"  # refused: answered in its place, the stream goes on
    requests.insert(3, bad)

    async def scenario() -> tuple[list[pb.ModelStreamInferResponse], dict[str, Any], Any]:
        async with grpc.aio.insecure_channel(traced.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            before = await rows4_stats(stub)

            async def send() -> Any:
                for r in requests:
                    yield r

            got = [r async for r in stub.ModelStreamInfer(send(), timeout=30)]
            return got, before, await rows4_stats(stub)

    got, before, after = traced.run(scenario())
    assert [r.infer_response.id for r in got] == [r.id for r in requests]
    assert got[3].error_message == (
        "input 'INPUT0' has datatype INT32 but model 'rows4' expects FP32"
    )
    good = [r for r in got if r.infer_response.id != "bad"]
    for r in good:
        assert r.error_message == "", r.error_message
        out = np.frombuffer(r.infer_response.raw_output_contents[0], np.float32)
        assert out.size and not (out - out[0]).any()  # each answer is its own request's
    outs = [np.frombuffer(r.infer_response.raw_output_contents[0], np.float32)[0] for r in good]
    assert len(set(outs)) == N
    assert after["inference_count"] - before["inference_count"] == N
    assert after["execution_count"] - before["execution_count"] < N / 2  # they batched
