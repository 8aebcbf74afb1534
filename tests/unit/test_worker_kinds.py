"""A version reloaded as the other kind on a graph-serving worker (`--cpu-graphs`, the GPU
worker's path on the CPU EP): max_batch_size 0 is never graph-served, so a config change to or
from it moves the version between a GraphModel and a plain session. The old instance must go,
or calls keep finding it first and run the old files and config."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from test_direct_channels import MODEL, assert_dense, front, infer, load
from worker_thread import serving_worker

from runtime.ipc.protocol import Code, LoadModel, ModelSignature
from runtime.settings import WorkerSettings

KEY = ("dense", 1)
X = np.full((1, 256), 2.0, dtype=np.float32)


def plain(request_id: int, revision: str) -> LoadModel:
    """dense version 1 with max_batch_size 0, no batching: a plain session."""
    return LoadModel(
        request_id, "dense", 1, str(MODEL), 0, ModelSignature((), ()), revision=revision
    )


def test_a_graph_version_reloaded_with_max_batch_size_0_is_served_plain(tmp_path: Path) -> None:
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", cpu_graphs=True)

    async def scenario() -> None:
        with serving_worker(settings) as worker:
            async with front(worker, 1) as a:
                assert (await a.load(load(revision="r1"))).code == Code.OK
                old = worker.graph_models[KEY]
                assert_dense(await infer(a, X), X)
                done = await a.load(plain(2, "r2"))
                assert done.code == Code.OK, done.message
                assert KEY not in worker.graph_models and KEY in worker.models
                batches = old.batcher.stats().batches
                assert_dense(await infer(a, X), X)
                assert old.batcher.stats().batches == batches  # not run by the old instance

    asyncio.run(scenario())


def test_a_plain_version_reloaded_with_batching_is_graph_served(tmp_path: Path) -> None:
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", cpu_graphs=True)

    async def scenario() -> None:
        with serving_worker(settings) as worker:
            async with front(worker, 1) as a:
                assert (await a.load(plain(1, "r1"))).code == Code.OK
                assert KEY in worker.models
                assert (await a.load(load(2, revision="r2"))).code == Code.OK
                assert KEY not in worker.models and KEY in worker.graph_models
                assert_dense(await infer(a, X), X)

    asyncio.run(scenario())
