"""Model control with several fronts, end to end in memory: two ModelManagers over one fake
worker each (`FileLink`: a load reads the model file; missing or "broken" fails) and two
ControlSyncs over one pod directory stand for two fronts. Actions that overlap on two fronts
end alike on both, a load that fails is done (and fails) on every front, and the files an
upload left serving survive a later upload that fails."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from fake_worker_link import SIGNATURE, FakeWorkerLink

from runtime.ipc.protocol import Code, LoadDone, LoadModel
from server.control_sync import ControlSync
from server.errors import LoadFailed
from server.lifecycle import ModelManager
from server.models import ModelTable
from server.types import ModelState

CONFIG = (
    'name: "m"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n'
    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
)
CONFIG_JSON = json.dumps(
    {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "max_batch_size": 0,
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [4]}],
    }
)


class FileLink(FakeWorkerLink):
    """As the worker: reads the file; a missing or "broken" one fails. Loads take a while."""

    async def load(self, msg: LoadModel) -> LoadDone:
        await asyncio.sleep(0.05)
        if not _loads(msg.path):
            return LoadDone(msg.request_id, Code.BAD_INPUT, f"cannot load {msg.path}")
        return LoadDone(msg.request_id, Code.OK, signature=SIGNATURE)


def _loads(path: str) -> bool:
    p = Path(path)
    return p.exists() and p.read_bytes() != b"broken"


Front = tuple[ModelManager, ControlSync, ModelTable]


def two_fronts(tmp_path: Path) -> tuple[Front, Front]:
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text(CONFIG)
    (repo / "m" / "1" / "model.onnx").write_bytes(b"ok")
    pod = tmp_path / "pod"
    pod.mkdir()
    fronts = []
    for i in range(2):
        table = ModelTable()
        manager = ModelManager(repo, FileLink(), table, 1, mode="explicit")  # type: ignore[arg-type]
        sync = ControlSync(pod, manager, i, 2, ack_timeout_s=5)
        manager.control = sync
        manager.overrides.directory = pod
        fronts.append((manager, sync, table))
    return fronts[0], fronts[1]


def ready(table: ModelTable) -> list[int]:
    return ready_versions(table, "m")


def ready_versions(table: ModelTable, name: str) -> list[int]:
    entry = table.models.get(name)
    if entry is None:
        return []
    return sorted(v for v, ve in entry.versions.items() if ve.state is ModelState.READY)


async def polling(*syncs: ControlSync) -> list[asyncio.Task[None]]:
    async def poll(sync: ControlSync) -> None:  # App's pod poll
        while True:
            await sync.poll()
            await asyncio.sleep(0.02)

    return [asyncio.create_task(poll(s)) for s in syncs]


def test_a_load_and_an_unload_on_two_fronts_at_once_end_alike(tmp_path: Path) -> None:
    """B's load holds B's lock while B's poll has read A's unload and waits for it: the
    unload, older than B's load, must not be applied after it on B."""
    (a, sa, ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sa, sb)
        load_b = asyncio.create_task(b.load("m"))
        await asyncio.sleep(0.01)
        await a.unload("m")
        await load_b
        await asyncio.sleep(0.5)
        for p in pollers:
            p.cancel()

    asyncio.run(scenario())
    assert ready(ta) == ready(tb)


def test_a_front_that_stops_answers_without_the_others(tmp_path: Path) -> None:
    """The pod is stopping: the other front no longer polls (its poll was cancelled, or it
    is gone), so its acknowledgement never comes. A load in flight on the front that got the
    RPC waited for it until the timeout (ACK_TIMEOUT_S, 120 s, cut short by the shutdown's
    grace, which then answered UNAVAILABLE a load that was done); once that front stops, the
    load answers as soon as it is done there."""
    (a, sa, ta), (b, _sb, _tb) = two_fronts(tmp_path)  # B never polls

    async def scenario() -> float:
        await asyncio.gather(a.load_repository(), b.load_repository())
        load = asyncio.create_task(a.load("m"))
        await asyncio.sleep(0.3)  # done here (a load takes 0.05 s), waiting for B
        assert not load.done()
        start = asyncio.get_running_loop().time()
        sa.stop_waiting()  # App.stop
        await asyncio.wait_for(load, 1)
        return asyncio.get_running_loop().time() - start

    assert asyncio.run(scenario()) < 0.5
    assert ready(ta) == [1]


def test_a_load_that_fails_is_done_on_every_front(tmp_path: Path) -> None:
    """Version 2 only, from an upload that does not load: the front that got the RPC failed,
    and so does the other; both keep serving version 1 (no longer selected, but the load that
    would replace it failed: it went before, leaving nothing READY)."""
    (a, _sa, ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sb)
        with pytest.raises(LoadFailed, match="failed to load 'm'"):
            await a.load("m", CONFIG_JSON, {"file:2/model.onnx": b"broken"})
        for p in pollers:
            p.cancel()

    asyncio.run(scenario())
    assert ready(ta) == ready(tb) == [1]


def test_an_upload_that_fails_keeps_the_files_of_the_serving_version(tmp_path: Path) -> None:
    """A restarted worker reloads the serving version from where it was loaded."""
    (a, _sa, ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sb)
        await a.load("m", CONFIG_JSON, {"file:1/model.onnx": b"ok"})
        with pytest.raises(LoadFailed):
            await a.load("m", CONFIG_JSON, {"file:1/model.onnx": b"broken"})
        for p in pollers:
            p.cancel()
        await asyncio.gather(a.reload_all(), b.reload_all())  # the worker restarted

    asyncio.run(scenario())
    assert ready(ta) == ready(tb) == [1]
    assert Path(ta.models["m"].versions[1].path).exists()


def test_uploads_no_version_is_served_from_are_removed(tmp_path: Path) -> None:
    (a, sa, _ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sa, sb)
        for manager in (a, b, a, b, a, b):
            await manager.load("m", CONFIG_JSON, {"file:1/model.onnx": b"ok"})
        await asyncio.sleep(0.2)
        for p in pollers:
            p.cancel()

    asyncio.run(scenario())
    left = list((tmp_path / "pod").glob("override-*"))
    assert [Path(tb.models["m"].versions[1].path).is_relative_to(d) for d in left] == [True]


def test_a_lone_front_removes_the_files_of_a_failed_upload(tmp_path: Path) -> None:
    """No other front replays a lone front's load: a failed upload's files went only when the
    model was unloaded (five failed 20 MB uploads kept 100 MB)."""
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "config.pbtxt").write_text(CONFIG)
    manager = ModelManager(repo, FileLink(), ModelTable(), 1, mode="explicit", startup="")  # type: ignore[arg-type]
    made: list[Path] = []
    write = manager.overrides.write

    def recording(name: str, files: dict[str, bytes]) -> Path:
        made.append(write(name, files))
        return made[-1]

    manager.overrides.write = recording  # type: ignore[method-assign]

    async def scenario() -> None:
        await manager.load("m", CONFIG_JSON, {"file:1/model.onnx": b"ok"})
        for _ in range(3):
            with pytest.raises(LoadFailed):
                await manager.load("m", CONFIG_JSON, {"file:1/model.onnx": b"broken"})

    asyncio.run(scenario())
    assert [p.exists() for p in made] == [True, False, False, False]  # the one served stays


def records(tmp_path: Path) -> list[str]:
    """The model-control records and acknowledgements in the pod's directory."""
    pod = tmp_path / "pod"
    return sorted(p.name for p in pod.iterdir() if p.name.startswith(("control-", "ack-")))


def test_loads_of_names_not_in_the_repository_leave_nothing_to_replay(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A mistyped name changes nothing: it was published all the same, so every such name left
    a record and an acknowledgement per front in the pod's directory for ever (each front
    scanned them all four times a second), and each other front replayed it and logged the
    client's mistake at ERROR. B never polls here: the load answers without waiting for it."""
    (a, _sa, _ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        for i in range(20):
            with pytest.raises(LoadFailed, match=f"model 'typo{i}' is not in the repository"):
                await asyncio.wait_for(a.load(f"typo{i}"), 1)
        await sb.poll()

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert records(tmp_path) == []
    assert set(tb.models) == {"m"}
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_failed_replay_logs_an_error_only_where_the_outcome_differs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A load that failed on the front that did it, and fails alike on the other, is the
    client's answer: not an ERROR on every other front."""
    (a, _sa, _ta), (b, sb, _tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sb)
        with pytest.raises(LoadFailed):
            await a.load("m", CONFIG_JSON, {"file:2/model.onnx": b"broken"})
        for p in pollers:
            p.cancel()

    with caplog.at_level(logging.DEBUG, logger="server.control_sync"):
        asyncio.run(scenario())
    replays = [r for r in caplog.records if "by another front failed here" in r.message]
    assert [r.levelno for r in replays] == [logging.DEBUG]


def test_records_of_uploaded_models_go_once_unloaded_everywhere(tmp_path: Path) -> None:
    """One model per tenant or per build, uploaded and later unloaded: each name left its
    record and an acknowledgement per front for ever. A front that starts does not load them,
    so once every front has unloaded one, nothing needs its record."""
    (a, sa, _ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> None:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sa, sb)
        for i in range(5):
            config = CONFIG_JSON.replace('"m"', f'"t{i}"')
            for _ in range(2):  # the same name again: still one record
                await a.load(f"t{i}", config, {"file:1/model.onnx": b"ok"})
            assert len(records(tmp_path)) == 3  # t{i}'s record, each front's ack
            await b.unload(f"t{i}")
            assert records(tmp_path) == []
        for p in pollers:
            p.cancel()

    asyncio.run(scenario())
    assert [n for n in tb.models if ready_versions(tb, n)] == ["m"]
    assert list((tmp_path / "pod").glob("override-*")) == []


def test_a_front_that_starts_later_catches_up_on_an_unloaded_repository_model(
    tmp_path: Path,
) -> None:
    """A starting front loads the repository's models: the unload of one must stay on record
    for it."""
    (a, _sa, ta), (b, sb, tb) = two_fronts(tmp_path)

    async def scenario() -> ModelTable:
        await asyncio.gather(a.load_repository(), b.load_repository())
        pollers = await polling(sb)
        await a.unload("m")
        for p in pollers:
            p.cancel()
        table = ModelTable()  # front B restarted
        manager = ModelManager(tmp_path / "repo", FileLink(), table, 1, mode="explicit")  # type: ignore[arg-type]
        sync = ControlSync(tmp_path / "pod", manager, 1, 2, ack_timeout_s=5)
        manager.control = sync
        await manager.load_repository()
        await sync.poll()  # App.start: before it listens
        return table

    table = asyncio.run(scenario())
    assert ready(ta) == ready(tb) == ready(table) == []
