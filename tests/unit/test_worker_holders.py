"""Which fronts hold a version in the worker, and a load's answer: a front that leaves while
its load is still running holds nothing once it ends (the version is unloaded when the fronts
that remain let it go), and a load whose set-up fails after the session loaded is still
answered (the front's load has no timeout, and holds the model's lock meanwhile)."""

from __future__ import annotations

import asyncio
import errno

import pytest
from test_direct_channels import front, load

import runtime.channels
from runtime.ipc.protocol import Code
from runtime.worker import Worker

KEY = ("dense", 1)


def test_a_front_that_leaves_during_its_load_holds_nothing(worker: Worker) -> None:
    async def scenario() -> None:
        async with front(worker, 1) as a:
            assert (await a.load(load(revision="r1"))).code == Code.OK
            async with front(worker, 2) as b:
                # b reloads (a new revision: a real load) and leaves before its LoadDone
                reload = asyncio.create_task(b.load(load(2, revision="r2")))
                await asyncio.sleep(0.001)
            await asyncio.sleep(1.0)  # b's load ends after b left
            reload.cancel()
            assert worker.holders(*KEY) == 1
            await a.unload(*KEY)
            assert KEY not in worker.graph_models and KEY not in worker.models

    asyncio.run(scenario())


def test_a_load_whose_set_up_fails_is_answered(
    worker: Worker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No descriptor left for the batch thread's wake-up pipe, after the session loaded."""

    def no_descriptors() -> tuple[int, int]:
        raise OSError(errno.EMFILE, "Too many open files")

    async def scenario() -> None:
        async with front(worker, 1) as a:
            monkeypatch.setattr(runtime.channels.os, "pipe", no_descriptors)
            done = await asyncio.wait_for(a.load(load()), 30)
            monkeypatch.undo()
            assert done.code == Code.INTERNAL
            assert done.message == "OSError: [Errno 24] Too many open files"

    asyncio.run(scenario())
