"""Model control of the pod (server.control_sync) with in-memory fake managers standing for two
fronts' ModelManagers: an action is replayed by the other front and acknowledged, the RPC's
publish returns only then, a newer action on the model releases the older one's wait, and a
front that never answers is given up on after the timeout."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from pathlib import Path

import pytest

from server.control_sync import ControlSync


class FakeManager:
    def __init__(self) -> None:
        self.replayed: list[tuple[str, str]] = []

    async def replay(
        self, name: str, action: str, config_json: str | None, root: Path, token: str,
        latest: Callable[[], bool] = lambda: True,
    ) -> None:  # fmt: skip
        self.replayed.append((name, action))


async def act(sync: ControlSync, name: str, action: str, root: Path, token: str) -> None:
    """What ModelManager does for an RPC: publish (under its lock), then wait until settled."""
    written = sync.publish(name, action, None, root, token)
    await sync.settled(name, action, token, written)


def fronts(tmp_path: Path, timeout_s: float = 10.0) -> list[tuple[ControlSync, FakeManager]]:
    out = []
    for i in range(2):
        m = FakeManager()
        out.append((ControlSync(tmp_path, m, i, 2, ack_timeout_s=timeout_s), m))  # type: ignore[arg-type]
    return out


def test_publish_returns_once_the_other_front_has_replayed(tmp_path: Path) -> None:
    (a, ma), (b, mb) = fronts(tmp_path)

    async def scenario() -> list[str]:
        order: list[str] = []

        async def b_polls_later() -> None:
            await asyncio.sleep(0.2)
            await b.poll()
            order.append("b replayed")

        poller = asyncio.create_task(b_polls_later())
        await act(a, "m", "load", tmp_path, "t1")
        order.append("a answered")
        await poller
        await a.poll()  # its own action is not replayed by itself
        return order

    assert asyncio.run(scenario()) == ["b replayed", "a answered"]
    assert mb.replayed == [("m", "load")] and ma.replayed == []


def test_a_newer_action_releases_the_older_wait(tmp_path: Path) -> None:
    (a, _), (b, _) = fronts(tmp_path)

    async def scenario() -> None:
        waiting = asyncio.create_task(act(a, "m", "load", tmp_path, "t2"))
        await asyncio.sleep(0.05)
        # b's unload overwrites the record before b ever polled a's load; a's poll acks it.
        unload = asyncio.create_task(act(b, "m", "unload", tmp_path, "t3"))
        await asyncio.wait_for(waiting, 5)
        await a.poll()
        await asyncio.wait_for(unload, 5)

    asyncio.run(scenario())


def test_a_silent_front_is_given_up_on(tmp_path: Path) -> None:
    (a, _), _ = fronts(tmp_path, timeout_s=0.3)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await act(a, "m", "unload", tmp_path, "t4")
        return loop.time() - t0

    assert 0.3 <= asyncio.run(scenario()) < 3


def test_a_poll_that_fails_once_does_not_stop_the_fronts_polling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Front B's poll hits a full disk writing its ack (once): the app's loop (server.app's
    `_every`, as for the pod poll) logs it and goes on, so B replays and acknowledges what
    comes later (before, the loop ended there: B never replayed anything again)."""
    from server import pod_records
    from server.app import _every

    (a, _), (b, mb) = fronts(tmp_path, timeout_s=1.0)
    real_write = pod_records.os.write
    acks = {"t1": 0}

    def write(fd: int, data: bytes) -> int:
        if data == b"t1":
            acks["t1"] += 1
            if acks["t1"] == 2:  # A acks its own action first; then B's ack fails
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(pod_records.os, "write", write)

    async def scenario() -> None:
        loop = asyncio.create_task(_every(0.02, "pod poll", b.poll))
        await act(a, "m1", "load", tmp_path, "t1")  # B's ack never came: 1 s
        await act(a, "m2", "load", tmp_path, "t2")
        loop.cancel()

    asyncio.run(scenario())
    assert mb.replayed == [("m1", "load"), ("m2", "load")]
    assert "pod poll failed; retrying every 0.02 s" in caplog.text
