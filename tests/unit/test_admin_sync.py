"""Routing admin tables of the pod (server.admin_sync): two Routers, each over its own
ModelTable and AdminSync on one directory, stand for two fronts. What one front sets, clears
or rolls back, the other routes by after a poll; a front that starts applies them all; a table
that does not validate yet is applied once it does; SetRouting and ClearRouting (`settled`) wait
until the other front has applied them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from routing_fakes import GUARD, Clock

from server.admin_sync import AdminSync
from server.models import ModelEntry, ModelTable, VersionEntry
from server.router import RouteHints, Router
from server.types import ModelState


def front(
    directory: Path, versions: tuple[int, ...] = (1, 2), index: int = 0, timeout_s: float = 10.0
) -> tuple[Router, AdminSync]:
    table = ModelTable()
    entry = table.models["m"] = ModelEntry("m", None)
    for v in versions:
        entry.versions[v] = VersionEntry("m", v, ModelState.READY)
    router = Router(table, clock=Clock())
    sync = AdminSync(directory, router, index, 2, ack_timeout_s=timeout_s)
    router.on_admin = sync.publish
    return router, sync


def table_json(stable: int, canary: int, canary_bp: int, guard: bool = False) -> str:
    weights = {str(stable): 10_000 - canary_bp, str(canary): canary_bp}
    doc = {"weights": weights, "labels": {"stable": stable, "canary": canary}}
    return json.dumps({**doc, "guard": GUARD} if guard else doc)


def weights(r: Router) -> dict[str, int] | None:
    t = r.view("m").table
    return None if t is None else dict(t["weights"])  # type: ignore[arg-type]


def test_set_and_clear_on_one_front_reach_the_other(tmp_path: Path) -> None:
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path, index=1)
    a.set_admin("m", table_json(1, 2, 10_000))  # everything to version 2
    assert weights(b) is None
    sync_b.poll()
    assert weights(b) == {"1": 0, "2": 10_000} and b.view("m").source == "admin"
    assert b.route("m", "", RouteHints()).version == 2
    sync_a.poll()  # its own record is not applied again
    a.clear_admin("m")
    sync_b.poll()
    assert b.view("m").source != "admin" and weights(b) is None
    assert b.route("m", "", RouteHints()).version == 2  # the highest ready: plain stable


def test_a_guard_rollback_is_the_pods(tmp_path: Path) -> None:
    (a, _), (b, sync_b) = front(tmp_path), front(tmp_path, index=1)
    a.set_admin("m", table_json(1, 2, 3000, guard=True))
    sync_b.poll()
    clock = a.clock
    assert isinstance(clock, Clock)
    for version, ok in ((1, True), (2, False)):
        for _ in range(30):
            clock.now += 0.01
            a.observe("m", version, 0.001, ok)
    assert weights(a) == {"1": 10_000, "2": 0}
    sync_b.poll()
    assert weights(b) == {"1": 10_000, "2": 0}
    view = b.view("m")
    assert view.rollbacks == 1 and "error rate" in view.last_rollback
    assert b.models.models["m"].versions[2].reason.startswith("canary rolled back by the guard")


def test_a_starting_front_applies_once_its_versions_are_ready(tmp_path: Path) -> None:
    a, _ = front(tmp_path)
    a.set_admin("m", table_json(1, 2, 5000))
    late, sync = front(tmp_path, versions=(1,), index=1)  # version 2 not loaded here yet
    sync.poll()
    assert weights(late) is None  # not valid here yet: not applied, and not forgotten
    late.models.models["m"].versions[2] = VersionEntry("m", 2, ModelState.READY)
    sync.poll()
    assert weights(late) == {"1": 5000, "2": 5000}


def test_last_writer_wins(tmp_path: Path) -> None:
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path, index=1)
    a.set_admin("m", table_json(1, 2, 1000))
    b.set_admin("m", table_json(1, 2, 9000))
    sync_a.poll()
    sync_b.poll()
    assert weights(a) == weights(b) == {"1": 1000, "2": 9000}


def test_a_cleared_table_stays_cleared_for_a_front_that_starts_later(tmp_path: Path) -> None:
    a, _ = front(tmp_path)
    a.set_admin("m", table_json(1, 2, 5000))
    a.clear_admin("m")
    late, sync = front(tmp_path, index=1)
    sync.poll()
    assert weights(late) is None and late.view("m").source != "admin"


def test_settled_returns_once_the_other_front_applied_the_table(tmp_path: Path) -> None:
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path, index=1)

    async def scenario() -> list[str]:
        order: list[str] = []

        async def b_polls_later() -> None:
            await asyncio.sleep(0.2)
            sync_b.poll()
            order.append(f"b applied {weights(b)}")

        for change in (
            lambda: a.set_admin("m", table_json(1, 2, 2500)),
            lambda: a.clear_admin("m"),
        ):
            poller = asyncio.create_task(b_polls_later())
            change()
            await sync_a.settled("m")
            order.append("a answered")
            await poller
        return order

    assert asyncio.run(scenario()) == [
        "b applied {'1': 7500, '2': 2500}", "a answered", "b applied None", "a answered",
    ]  # fmt: skip


def test_settled_waits_for_a_version_the_other_front_still_loads(tmp_path: Path) -> None:
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path, versions=(1,), index=1)

    async def scenario() -> bool:
        a.set_admin("m", table_json(1, 2, 5000))
        waiting = asyncio.create_task(sync_a.settled("m"))
        sync_b.poll()  # not valid on b yet: not acknowledged
        await asyncio.sleep(0.2)
        was_waiting = not waiting.done()
        b.models.models["m"].versions[2] = VersionEntry("m", 2, ModelState.READY)
        sync_b.poll()
        await asyncio.wait_for(waiting, 5)
        return was_waiting

    assert asyncio.run(scenario())
    assert weights(b) == {"1": 5000, "2": 5000}


def test_settled_gives_up_on_a_silent_front(tmp_path: Path) -> None:
    a, sync_a = front(tmp_path, timeout_s=0.3)

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        a.set_admin("m", table_json(1, 2, 5000))
        await sync_a.settled("m")
        return loop.time() - t0

    assert 0.3 <= asyncio.run(scenario()) < 3
