"""Direct channels on a real GPU worker: a front's calls of a graph-served version reach the
version's serving thread on its channel and replay captured CUDA graphs there (the thread
that captured them, as onnxruntime requires), and a reload hands the channel to the new
instance's thread, which captured its own graphs, without a failed call.

The CPU suite runs the same scenarios on the CPU EP (tests/unit/test_direct_channels.py);
here the worker owns a CUDA context, the arena is pinned, and the replay is real.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from runtime.ipc.protocol import Code
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from tests.unit.test_direct_channels import expected, front, infer, load, output, traffic
from tests.unit.worker_thread import serving_worker

pytestmark = pytest.mark.gpu
# The worker's sessions keep the CUDA EP's default TF32 MatMuls (10-bit mantissa inputs):
# against the CPU EP's FP32, the tolerance tests/gpu/test_graphs.py gives default sessions.
TOL = 1e-2


@pytest.fixture()
def worker(tmp_path: Path) -> Iterator[Worker]:
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cuda:0")
    with serving_worker(settings, listen_s=60) as w:
        yield w


def test_calls_on_the_channel_replay_on_the_gpu_and_survive_a_reload(worker: Worker) -> None:
    rng = np.random.default_rng(11)
    xs = [rng.standard_normal((rows, 256), dtype=np.float32) for rows in (1, 3, 8)]
    wants = [expected(x) for x in xs]

    async def scenario() -> tuple[int, int]:
        async with front(worker, 41) as a:
            first = await a.load(load(revision="r1"))
            assert first.code == Code.OK and first.channel, first.message
            for x, want in zip(xs, wants, strict=True):
                result = await infer(a, x)
                assert result.timings.mode == "replay"
                np.testing.assert_allclose(output(result), want, rtol=TOL, atol=TOL)
            cases = list(zip(xs, wants, strict=True))
            async with traffic(a, cases, senders=4, rtol=TOL, atol=TOL) as answered:
                await asyncio.sleep(0.3)
                second = await a.load(load(2, revision="r2"))  # captures anew, then takes over
                assert second.code == Code.OK and second.channel == first.channel, second.message
                await asyncio.sleep(0.3)
            return answered(), a.direct_calls

    answered, direct = asyncio.run(scenario())
    assert direct == answered + 3 and answered > 0
