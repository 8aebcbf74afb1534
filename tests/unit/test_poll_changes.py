"""Poll mode follows the repository's files, not only its directories and configs.

ModelManager runs over an in-memory fake of its WorkerLink that answers each load at once and
fails those whose model file holds b"broken". A version whose files change (a new model.onnx
written over the old one) is reloaded, alone; a version that failed to load is tried again once
its files change, not at every poll; a config that stops parsing leaves what is loaded serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from fake_worker_link import SIGNATURE, FakeWorkerLink

from runtime.ipc.protocol import Code, LoadDone, LoadModel
from server.lifecycle import ModelManager
from server.models import ModelTable
from server.poll_policy import CONFIG as CONFIG_KEY
from server.poll_policy import config_unsettled, next_poll_in, poll_work, seen_since, unsettled
from server.repository import ScannedModel, fingerprint, scan_model
from server.types import ModelState

CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 0
version_policy: { all { } }
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
EARLIER, LATER = 10**18, 15 * 10**17  # mtimes (2001, 2017): settled, as a copy long done


class FileLink(FakeWorkerLink):
    """Loads read the model file, as the worker does; one that holds b"broken" fails."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list[tuple[str, int, bytes]] = []  # (model, version, file content) tried
        self.unloads: list[tuple[str, int]] = []

    async def load(self, msg: LoadModel) -> LoadDone:
        content = await asyncio.to_thread(Path(msg.path).read_bytes)
        self.loads.append((msg.name, msg.version, content))
        if content == b"broken":
            return LoadDone(msg.request_id, Code.BAD_INPUT, "model file does not parse")
        return LoadDone(msg.request_id, Code.OK, signature=SIGNATURE)

    async def unload(self, name: str, version: int) -> None:
        self.unloads.append((name, version))


def write(path: Path, content: bytes, mtime_ns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    os.utime(path, ns=(mtime_ns, mtime_ns))  # (a coarse clock could give two writes one mtime)


def write_config(model: Path, text: str) -> None:
    """`model`'s config.pbtxt, written long before the scans: settled (`unsettled`)."""
    write(model / "config.pbtxt", text.encode(), EARLIER)


def repository(root: Path, **versions: bytes) -> Path:
    (root / "m").mkdir(parents=True)
    write_config(root / "m", CONFIG)
    for v, content in versions.items():
        write(root / "m" / v.lstrip("v") / "model.onnx", content, EARLIER)
    return root


def manager_over(root: Path) -> tuple[ModelManager, FileLink, ModelTable]:
    link = FileLink()
    table = ModelTable()
    return ModelManager(root, link, table, 1, mode="poll"), link, table  # type: ignore[arg-type]


def states(table: ModelTable) -> dict[int, ModelState]:
    return {v: ve.state for v, ve in table.models["m"].versions.items()}


def test_a_version_whose_file_changed_is_reloaded_alone(tmp_path: Path) -> None:
    root = repository(tmp_path, v1=b"one", v2=b"two")
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        assert sorted(link.loads) == [("m", 1, b"one"), ("m", 2, b"two")]
        await manager.poll_once()
        assert len(link.loads) == 2  # nothing changed: nothing loaded
        write(root / "m" / "2" / "model.onnx", b"two, retrained", LATER)
        await manager.poll_once()
        assert link.loads[2:] == [("m", 2, b"two, retrained")]
        await manager.poll_once()
        assert len(link.loads) == 3

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY, 2: ModelState.READY}


def test_a_failed_load_is_tried_again_once_its_files_change(tmp_path: Path) -> None:
    root = repository(tmp_path, v1=b"one", v2=b"broken")
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        assert states(table) == {1: ModelState.READY, 2: ModelState.UNAVAILABLE}
        for _ in range(3):
            await manager.poll_once()
        assert len(link.loads) == 2  # not once more per poll
        write(root / "m" / "2" / "model.onnx", b"fixed", LATER)
        await manager.poll_once()
        assert link.loads[2:] == [("m", 2, b"fixed")]

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY, 2: ModelState.READY}


def test_a_failed_reload_leaves_the_old_instance_serving_and_is_not_retried(
    tmp_path: Path,
) -> None:
    root = repository(tmp_path, v1=b"one")
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        write(root / "m" / "1" / "model.onnx", b"broken", LATER)
        await manager.poll_once()
        await manager.poll_once()

    asyncio.run(scenario())
    assert link.loads == [("m", 1, b"one"), ("m", 1, b"broken")]
    assert states(table) == {1: ModelState.READY}
    assert [(e.state, e.reason) for e in table.index(ready_only=False)] == [
        ("READY", "reload failed, serving the instance loaded before: model file does not parse")
    ]


def test_a_config_that_stops_parsing_leaves_the_model_serving(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = repository(tmp_path, v1=b"one")
    manager, link, table = manager_over(root)
    (root / "broken").mkdir()
    write_config(root / "broken", "max_batch_size: -3")

    async def scenario() -> None:
        await manager.load_repository()
        write_config(root / "m", CONFIG.replace("max_batch_size: 0", "nonsense"))
        # A model added meanwhile, scanned after "m": the broken config must not stop the poll
        # before it (an AssertionError ended every poll there).
        (root / "n").mkdir()
        write_config(root / "n", CONFIG.replace('"m"', '"n"'))
        write(root / "n" / "1" / "model.onnx", b"n", EARLIER)
        with caplog.at_level(logging.ERROR, logger="server.lifecycle"):
            for _ in range(3):
                await manager.poll_once()
        assert table.models["n"].versions[1].state is ModelState.READY
        (m,) = [e for e in table.index(ready_only=True) if e.name == "m"]
        assert m.state == "READY" and m.reason.startswith("config of model 'm' does not parse"), m
        write_config(root / "m", CONFIG)
        await manager.poll_once()

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY}
    assert [load[:2] for load in link.loads] == [("m", 1), ("n", 1)]
    said = [r.getMessage() for r in caplog.records if "model 'm'" in r.getMessage()]
    assert len(said) == 1, said  # once, not at every poll
    assert table.models["m"].reason == ""  # parses again
    assert [(e.name, e.reason) for e in table.index(ready_only=True)] == [("m", ""), ("n", "")]
    assert table.models["broken"].reason == "model 'broken': max_batch_size must be >= 0"


def test_a_version_unloaded_by_request_is_loaded_again_by_the_poll(tmp_path: Path) -> None:
    root = repository(tmp_path, v1=b"one")
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        await manager.unload("m")
        assert states(table) == {1: ModelState.UNAVAILABLE}
        await manager.poll_once()

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY}
    assert len(link.loads) == 2


def test_poll_work_is_none_for_an_unchanged_model(tmp_path: Path) -> None:
    root = repository(tmp_path, v1=b"one", v2=b"two")
    manager, _, table = manager_over(root)
    asyncio.run(manager.load_repository())
    s = scan_model(root, "m")
    assert poll_work(table.models["m"], s) is None
    assert poll_work(None, s) == {1, 2}
    shutil.rmtree(root / "m" / "2")  # a removed version: nothing to load, one to unload
    assert poll_work(table.models["m"], scan_model(root, "m")) == frozenset()


def test_fingerprint_sees_content_size_and_nested_files(tmp_path: Path) -> None:
    d = tmp_path / "1"
    write(d / "model.onnx", b"abc", 10**18)
    first = fingerprint(d)
    assert first == (("model.onnx", 3, 10**18),)
    write(d / "model.onnx", b"abd", 10**18)  # same size and mtime: the same files to a poll
    assert fingerprint(d) == first
    write(d / "model.onnx", b"abd", 10**18 + 1)
    assert fingerprint(d) != first
    write(d / "weights" / "w.bin", b"x" * 10, 10**18)
    (d / "gone").symlink_to(d / "nowhere")  # a dangling link is skipped, not an error
    write(d / ".model.onnx.Xy12", b"partial", 10**18)  # a copy tool's temporary file
    write(d / ".cache" / "x", b"x", 10**18)
    assert [f[0] for f in fingerprint(d)] == ["model.onnx", "weights/w.bin"]
    (d / "weights" / "up").symlink_to(d)  # a cycle: walked once
    (d / "shared").symlink_to(d / "weights")  # a directory reached twice: walked once, under
    assert [f[0] for f in fingerprint(d)] == ["model.onnx", "shared/w.bin"]  # its first name


def test_fronts_started_apart_poll_at_the_same_instants() -> None:
    period = 15.0
    starts = [1_000_000.3, 1_000_002.9, 1_000_004.99]  # three fronts, seconds apart
    assert [now + next_poll_in(now, period) for now in starts] == pytest.approx([1_000_005.0] * 3)
    # One that starts later joins the others' schedule: their second poll is its first.
    assert 1_000_007.9 + next_poll_in(1_000_007.9, period) == pytest.approx(1_000_020.0)
    assert next_poll_in(1_000_005.0, period) == pytest.approx(period)  # on an instant: the next
    assert 0 < next_poll_in(123.456, 0.3) <= 0.3


def test_a_copy_in_place_is_loaded_once_it_has_settled(tmp_path: Path) -> None:
    """A model.onnx being written (its mtime moving, within SETTLE_S of the scan) waits: the
    half-written file is never tried, not even when the writer pauses across two scans of a
    short period. Once scans have found it unchanged for SETTLE_S it loads, whatever its
    mtime (a clock ahead of ours)."""
    root = repository(tmp_path, v1=b"one")
    manager, link, table = manager_over(root)
    now = 2_000_000_000.0  # the scans' wall clock (2033), files written "just now"
    manager.wall_clock = lambda: now
    model = root / "m" / "1" / "model.onnx"
    just_now = int(now * 1e9) - 100_000_000

    async def scenario() -> None:
        nonlocal now
        await manager.load_repository()
        write(model, b"one, retr", just_now)  # the copy under way
        await manager.poll_once()
        write(model, b"one, retrained", just_now + 50_000_000)  # still under way
        now += 0.3
        await manager.poll_once()
        now += 0.3
        await manager.poll_once()  # unchanged, but for 0.3 s only: the writer may go on
        assert link.loads == [("m", 1, b"one")]  # no half was tried
        now += 0.8
        await manager.poll_once()  # unchanged for 1.1 s of scans: settled
        assert link.loads == [("m", 1, b"one"), ("m", 1, b"one, retrained")]
        now += 0.3
        await manager.poll_once()
        assert len(link.loads) == 2

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY}


def test_a_model_still_being_copied_in_appears_once_settled(tmp_path: Path) -> None:
    root = repository(tmp_path, v1=b"one")
    manager, link, table = manager_over(root)
    now = 2_000_000_000.0
    manager.wall_clock = lambda: now

    async def scenario() -> None:
        await manager.load_repository()
        (root / "n").mkdir()
        write_config(root / "n", CONFIG.replace('"m"', '"n"'))
        write(root / "n" / "1" / "model.onnx", b"n, half", int(now * 1e9))
        await manager.poll_once()
        assert "n" not in table.models
        write(root / "n" / "1" / "model.onnx", b"n, whole", int(now * 1e9) - 5 * 10**9)
        await manager.poll_once()  # written 5 s before the scan: settled at once

    asyncio.run(scenario())
    assert table.models["n"].versions[1].state is ModelState.READY
    assert link.loads[-1] == ("n", 1, b"n, whole") and len(link.loads) == 2


def test_unsettled_is_young_and_not_yet_seen_unchanged_for_settle_s() -> None:
    s = scan_model_files({1: (("model.onnx", 5, 10 * 10**9),), 2: (("model.onnx", 5, 1),)})
    now = 10 * 10**9 + 500_000_000  # 0.5 s after version 1's last write
    first = seen_since(s, now, {})
    assert first == {1: (s.files[1], now), 2: (s.files[2], now)}
    assert unsettled(s, now, first) == {1}
    later = now + 300_000_000  # the next scan of a 0.3 s period: unchanged, not for long
    assert seen_since(s, later, first) == first
    assert unsettled(s, later, first) == {1}
    assert unsettled(s, now + 10**9, first) == frozenset()  # unchanged for SETTLE_S of scans
    assert unsettled(s, now + 2 * 10**9, {}) == frozenset()  # written SETTLE_S before the scan
    changed = scan_model_files({1: (("model.onnx", 6, 10 * 10**9),)})
    assert seen_since(changed, later, first) == {1: (changed.files[1], later)}
    stepped_back = seen_since(s, now - 10**9, first)  # the wall clock went back: start again
    assert stepped_back[1] == (s.files[1], now - 10**9)
    ahead = scan_model_files({1: (("model.onnx", 5, now + 3600 * 10**9),)})  # a clock ahead
    assert unsettled(ahead, now, seen_since(ahead, now, {})) == {1}
    assert unsettled(ahead, now + 10**9, {1: (ahead.files[1], now)}) == frozenset()


@pytest.mark.parametrize("half", ["", 'name: "m"\nplatform: "onnx'], ids=["empty", "cut-short"])
def test_a_config_written_in_place_is_applied_once_whole(
    tmp_path: Path, half: str, caplog: pytest.LogCaptureFixture
) -> None:
    """config.pbtxt being written in place (truncated, then written: an editor, `cp`): a poll
    in between read what was there. An empty file parsed as the default config (latest 1:
    version 1 drained and unloaded, and its requests failed, until the write ended); a file
    cut short was reported as a config that does not parse. The model now waits whole until
    the config file has settled, as for a version's files, then the change loads once."""
    root = repository(tmp_path, v1=b"one", v2=b"two")
    manager, link, table = manager_over(root)
    now = 2_000_000_000.0  # the scans' wall clock (2033), files written "just now"
    manager.wall_clock = lambda: now
    config = root / "m" / "config.pbtxt"
    just_now = int(now * 1e9) - 100_000_000

    async def scenario() -> None:
        nonlocal now
        await manager.load_repository()
        write(config, half.encode(), just_now)  # the write under way
        with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
            await manager.poll_once()
            write(config, CONFIG.replace("[ 4 ]", "[ -1 ]").encode(), just_now + 50_000_000)
            for step in (0.3, 0.3):
                now += step
                await manager.poll_once()  # the whole file, but unchanged for 0.3 s only
            assert caplog.records == []
        assert len(link.loads) == 2 and table.models["m"].reason == ""
        now += 0.8
        await manager.poll_once()  # unchanged for 1.1 s of scans: settled

    asyncio.run(scenario())
    assert sorted(link.loads[2:]) == [("m", 1, b"one"), ("m", 2, b"two")]
    assert link.unloads == []
    assert states(table) == {1: ModelState.READY, 2: ModelState.READY}


def test_a_config_file_is_unsettled_as_a_versions_files_are() -> None:
    young = (("config.pbtxt", 5, 10 * 10**9),)
    s = ScannedModel("m", None, "", {}, {}, {}, young)
    now = 10 * 10**9 + 500_000_000
    first = seen_since(s, now, {})
    assert first == {CONFIG_KEY: (young, now)}
    assert config_unsettled(s, now, first)
    assert not config_unsettled(s, now + 10**9, first)  # unchanged for SETTLE_S of scans
    assert not config_unsettled(s, now + 2 * 10**9, {})  # written SETTLE_S before the scan
    assert not config_unsettled(ScannedModel("m", None), now, {})  # no config file


def scan_model_files(files: dict[int, tuple[tuple[str, int, int], ...]]) -> ScannedModel:
    return ScannedModel("m", None, "", {v: Path(f"/r/m/{v}/model.onnx") for v in files}, {}, files)


LATEST = CONFIG.replace("version_policy: { all { } }\n", "")  # Triton's default: latest 1


def test_latest_keeps_the_old_version_until_the_new_one_serves(tmp_path: Path) -> None:
    """With the default policy a new version 2 replaces 1. The poll unloaded 1 whatever became
    of 2: while 2 was still being copied in (held back until settled), or when it failed to
    load, the model had no READY version (UNAVAILABLE for every request; for good in the
    second case). 1 now goes only once 2 serves."""
    root = repository(tmp_path, v1=b"one")
    write_config(root / "m", LATEST)
    manager, link, table = manager_over(root)
    now = 2_000_000_000.0  # the scans' wall clock (2033)
    manager.wall_clock = lambda: now

    async def scenario() -> None:
        await manager.load_repository()
        assert states(table) == {1: ModelState.READY}
        write(root / "m" / "2" / "model.onnx", b"two, half-cop", int(now * 1e9) - 10**8)
        await manager.poll_once()  # 2 is still being written: left for a later poll
        assert states(table) == {1: ModelState.READY}
        write(root / "m" / "2" / "model.onnx", b"broken", LATER)
        await manager.poll_once()  # 2 fails to load
        assert states(table) == {1: ModelState.READY, 2: ModelState.UNAVAILABLE}
        write(root / "m" / "2" / "model.onnx", b"two", LATER + 1)
        await manager.poll_once()  # 2 serves: 1 goes

    asyncio.run(scenario())
    assert table.models["m"].ready_versions() == [2]
    assert link.unloads == [("m", 1)]


def test_a_serving_version_whose_file_went_serves_on(tmp_path: Path) -> None:
    """Its directory stays, its model.onnx is gone: the READY entry was replaced by an
    UNAVAILABLE one without a drain or an unload (the worker kept the session for good)."""
    root = repository(tmp_path, v1=b"one", v2=b"two")
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        (root / "m" / "2" / "model.onnx").unlink()
        await manager.poll_once()

    asyncio.run(scenario())
    v2 = table.models["m"].versions[2]
    assert (v2.state, v2.reason) == (ModelState.READY, "version 2 has no model.onnx")
    assert link.unloads == []


def test_a_config_change_waits_for_a_version_still_being_copied(tmp_path: Path) -> None:
    """A deploy that rewrites config.pbtxt while 2/model.onnx is still being copied loaded the
    half-written file: a config change skipped the settling wait."""
    root = repository(tmp_path, v1=b"one", v2=b"two")
    manager, link, _table = manager_over(root)
    now = 2_000_000_000.0
    manager.wall_clock = lambda: now

    async def scenario() -> None:
        await manager.load_repository()
        write(root / "m" / "2" / "model.onnx", b"two, half-cop", int(now * 1e9) - 10**8)
        write_config(root / "m", CONFIG.replace("[ 4 ]", "[ -1 ]"))
        loads = len(link.loads)
        await manager.poll_once()
        assert len(link.loads) == loads  # nothing loaded while 2 is being written
        write(root / "m" / "2" / "model.onnx", b"two, whole", LATER)
        await manager.poll_once()
        assert sorted(link.loads[loads:]) == [("m", 1, b"one"), ("m", 2, b"two, whole")]

    asyncio.run(scenario())


def test_a_failed_version_whose_directory_went_is_forgotten(tmp_path: Path) -> None:
    """A broken version 2 was pushed, then deleted: its failed entry stayed in the table, so
    the server stayed unready (--strict-readiness) and the index listed the failure, for
    good, though version 1 served all along."""
    root = repository(tmp_path, v1=b"one")
    write_config(root / "m", LATEST)
    manager, _link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        write(root / "m" / "2" / "model.onnx", b"broken", LATER)
        await manager.poll_once()
        assert states(table) == {1: ModelState.READY, 2: ModelState.UNAVAILABLE}
        assert table.failed()
        shutil.rmtree(root / "m" / "2")
        await manager.poll_once()

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY}
    assert not table.failed()


def test_a_failed_version_deselected_by_a_load_is_forgotten(tmp_path: Path) -> None:
    """Explicit mode: a load whose new policy no longer selects the version that failed
    leaves only what it selected."""
    root = repository(tmp_path, v1=b"one", v2=b"broken")
    table = ModelTable()
    link = FileLink()
    manager = ModelManager(root, link, table, 1, mode="explicit")  # type: ignore[arg-type]
    only_1 = {
        "name": "m",
        "platform": "onnxruntime_onnx",
        "version_policy": {"specific": {"versions": [1]}},
        "input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [4]}],
    }

    async def scenario() -> None:
        await manager.load_repository()
        assert states(table) == {1: ModelState.READY, 2: ModelState.UNAVAILABLE}
        await manager.load("m", json.dumps(only_1))

    asyncio.run(scenario())
    assert states(table) == {1: ModelState.READY}
    assert not table.failed()


@pytest.mark.parametrize("case", ["new-version-fails", "serving-file-went"])
def test_what_a_poll_left_serving_is_said_once_not_at_every_poll(
    tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A new version that fails (the old one kept serving), or a serving version whose file
    went: the first poll says so; the later ones, with nothing changed, neither load again
    nor log again. Every poll used to take the kept version for a change and redo both."""
    root = repository(tmp_path, v1=b"one")
    if case == "new-version-fails":
        write_config(root / "m", LATEST)
    manager, link, table = manager_over(root)

    async def scenario() -> None:
        await manager.load_repository()
        if case == "new-version-fails":
            write(root / "m" / "2" / "model.onnx", b"broken", LATER)
        else:
            (root / "m" / "1" / "model.onnx").unlink()
        with caplog.at_level(logging.WARNING, logger="server.lifecycle"):
            await manager.poll_once()
            first = len(caplog.records)
            assert first > 0
            for _ in range(3):
                await manager.poll_once()
            assert len(caplog.records) == first, [r.getMessage() for r in caplog.records]

    asyncio.run(scenario())
    assert table.models["m"].ready_versions() == [1]
    assert len(link.loads) == (2 if case == "new-version-fails" else 1)  # start (+ 2 once)
    assert link.unloads == []
