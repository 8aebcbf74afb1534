"""Routing admin tables of the pod (server.admin_sync): two Routers, each over its own
ModelTable and AdminSync on one directory, stand for two fronts. What one front sets, clears
or rolls back, the other routes by after a poll; a front that starts applies them all; a table
that does not validate yet is applied once it does."""

from __future__ import annotations

import json
from pathlib import Path

from routing_fakes import GUARD, Clock

from server.admin_sync import AdminSync
from server.models import ModelEntry, ModelTable, VersionEntry
from server.router import RouteHints, Router
from server.types import ModelState


def front(directory: Path, versions: tuple[int, ...] = (1, 2)) -> tuple[Router, AdminSync]:
    table = ModelTable()
    entry = table.models["m"] = ModelEntry("m", None)
    for v in versions:
        entry.versions[v] = VersionEntry("m", v, ModelState.READY)
    router = Router(table, clock=Clock())
    sync = AdminSync(directory, router)
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
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path)
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
    (a, _), (b, sync_b) = front(tmp_path), front(tmp_path)
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
    late, sync = front(tmp_path, versions=(1,))  # version 2 not loaded here yet
    sync.poll()
    assert weights(late) is None  # not valid here yet: not applied, and not forgotten
    late.models.models["m"].versions[2] = VersionEntry("m", 2, ModelState.READY)
    sync.poll()
    assert weights(late) == {"1": 5000, "2": 5000}


def test_last_writer_wins(tmp_path: Path) -> None:
    (a, sync_a), (b, sync_b) = front(tmp_path), front(tmp_path)
    a.set_admin("m", table_json(1, 2, 1000))
    b.set_admin("m", table_json(1, 2, 9000))
    sync_a.poll()
    sync_b.poll()
    assert weights(a) == weights(b) == {"1": 1000, "2": 9000}
