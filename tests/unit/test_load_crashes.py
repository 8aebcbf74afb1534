"""A version whose load kills the runtime worker (a crash in onnxruntime or CUDA, say a graph
capture that goes wrong) must not take every model down with it, restart after restart.

ModelManager runs over an in-memory fake of its WorkerLink: loads answer OK, except that a load
of the model "poison" kills the fake worker. A death fails every load in flight (the others'
too), then the link restarts the worker and calls `reload_all`, as server.worker_link does.
After a death, the versions that were loading are loaded one at a time, so the second death
has "poison" loading alone: it is left UNAVAILABLE, saying why, and every other model serves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from fake_worker_link import SIGNATURE, FakeWorkerLink

from runtime.client import WorkerGone
from runtime.ipc.protocol import Code, LoadDone, LoadModel
from server.errors import LoadInterrupted
from server.lifecycle import RESTARTED, RESTARTING, ModelManager
from server.models import ModelTable
from server.rpc.status import status_of
from server.types import ModelState

CONFIG = """name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: 0
input [ {{ name: "X" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "Y" data_type: TYPE_FP32 dims: [ 4 ] }} ]
"""


class PoisonLink(FakeWorkerLink):
    """Loads answer OK after 20 ms; a load of "poison" kills the worker first."""

    def __init__(self) -> None:
        super().__init__()
        self.deaths = 0
        self.loaded: list[str] = []  # successful loads, in order
        self._in_flight: list[asyncio.Future[LoadDone]] = []
        self.restarting: asyncio.Task[None] | None = None

    async def load(self, msg: LoadModel) -> LoadDone:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[LoadDone] = loop.create_future()
        self._in_flight.append(fut)
        if msg.name == "poison" and self.deaths < 5:  # (bounded: without the fix, for ever)
            loop.call_later(0.01, self._die)
        else:
            loop.call_later(0.02, self._answer, fut, msg)
        try:
            return await fut
        finally:
            self._in_flight.remove(fut)

    def _answer(self, fut: asyncio.Future[LoadDone], msg: LoadModel) -> None:
        if not fut.done():
            self.loaded.append(msg.name)
            fut.set_result(LoadDone(msg.request_id, Code.OK, signature=SIGNATURE))

    def _die(self) -> None:
        self.deaths += 1
        for fut in self._in_flight:
            if not fut.done():
                fut.set_exception(WorkerGone("worker process exited"))
        assert self.on_lost is not None and self.on_restart is not None
        self.on_lost()
        self.restarting = asyncio.get_running_loop().create_task(self.on_restart())


def test_a_version_that_kills_the_worker_at_load_is_left_out(tmp_path: Path) -> None:
    names = ["alpha", "beta", "poison", "gamma"]
    for name in names:
        (tmp_path / name / "1").mkdir(parents=True)
        (tmp_path / name / "1" / "model.onnx").write_bytes(b"onnx")
        (tmp_path / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    link = PoisonLink()
    table = ModelTable()
    manager = ModelManager(tmp_path, link, table, 1)  # type: ignore[arg-type]

    async def settle() -> None:
        while link.restarting is not None and not link.restarting.done():
            await asyncio.wait_for(link.restarting, 10)  # a restart may lead to another

    async def scenario() -> None:
        await manager.load_repository()
        await settle()
        await manager.poll_once()  # the repository is unchanged: "poison" is not tried again
        await settle()

    asyncio.run(asyncio.wait_for(scenario(), 30))

    states = {n: table.models[n].versions[1].state for n in names}
    assert states == {
        "alpha": ModelState.READY,
        "beta": ModelState.READY,
        "poison": ModelState.UNAVAILABLE,
        "gamma": ModelState.READY,
    }
    assert (
        table.models["poison"]
        .versions[1]
        .reason.startswith("the runtime worker died twice while loading this version")
    )
    # Once with everything loading at start, once with "poison" loading alone; not again at
    # the next repository poll.
    assert link.deaths == 2
    assert all(table.models[n].versions[1].load_crashes == 0 for n in names if n != "poison")


class RestartingLink(FakeWorkerLink):
    """A worker that is restarting (`require` raises), or that dies during every load."""

    def __init__(self, down: bool) -> None:
        super().__init__()
        self.down = down

    def require(self) -> FakeWorkerLink:
        if self.down:
            raise WorkerGone("the runtime worker is restarting")
        return self

    async def load(self, msg: LoadModel) -> LoadDone:
        raise WorkerGone("worker process exited")


@pytest.mark.parametrize("down", [True, False], ids=["restarting", "dies-during-the-load"])
def test_a_load_that_meets_only_a_restarting_worker_is_retryable(
    tmp_path: Path, down: bool
) -> None:
    # Nothing is wrong with the model, and the load resumes once the worker is back: the
    # client is told UNAVAILABLE (retry), not INTERNAL (the model failed).
    (tmp_path / "alpha" / "1").mkdir(parents=True)
    (tmp_path / "alpha" / "1" / "model.onnx").write_bytes(b"onnx")
    (tmp_path / "alpha" / "config.pbtxt").write_text(CONFIG.format(name="alpha"))
    link = RestartingLink(down)
    manager = ModelManager(tmp_path, link, ModelTable(), 1, mode="explicit", startup="")  # type: ignore[arg-type]
    with pytest.raises(LoadInterrupted) as err:
        asyncio.run(asyncio.wait_for(manager.load("alpha"), 10))
    assert status_of(err.value) is grpc.StatusCode.UNAVAILABLE
    reason = RESTARTING if down else RESTARTED
    assert err.value.message == f"failed to load 'alpha': {reason}; retry"
