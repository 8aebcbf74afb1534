"""server.router.Router over a real ModelTable: errors for versions that are not ready say why,
and the canary guard (injected clock) rolls the canary back once on a breach, while a new
stable/canary pairing (or rule) starts a fresh window."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_fakes import GUARD, Clock

from server.errors import NotFound, NotReady
from server.models import ModelEntry, ModelTable, VersionEntry
from server.router import RouteHints, Router
from server.routing import VersionNotReady, resolve
from server.types import ModelSpec, ModelState


def router(versions: tuple[int, ...] = (1, 2, 3)) -> tuple[Router, Clock, list[str]]:
    table = ModelTable()
    entry = table.models["m"] = ModelEntry("m", None)
    for v in versions:
        entry.versions[v] = VersionEntry("m", v, ModelState.READY)
    clock, rolled = Clock(), []
    r = Router(table, clock=clock, on_rollback=lambda m, v, why: rolled.append(f"{m}:{v}"))
    return r, clock, rolled


def set_table(r: Router, stable: int, canary: int, canary_bp: int = 3000) -> None:
    weights = {str(stable): 10_000 - canary_bp, str(canary): canary_bp}
    labels = {"stable": stable, "canary": canary}
    r.set_admin("m", json.dumps({"weights": weights, "labels": labels, "guard": GUARD}))


def traffic(r: Router, clock: Clock, version: int, n: int, ok: bool) -> None:
    for _ in range(n):
        clock.now += 0.01
        r.observe("m", version, 0.001, ok)


def test_breach_rolls_back_once() -> None:
    r, clock, rolled = router()
    set_table(r, 1, 2)
    traffic(r, clock, 1, 30, ok=True)
    traffic(r, clock, 2, 30, ok=False)
    assert rolled == ["m:2"]
    view = r.view("m")
    assert view.rollbacks == 1 and view.source == "admin"
    assert view.table is not None and view.table["weights"] == {"1": 10_000, "2": 0}
    assert "error rate 100.00%" in view.last_rollback
    assert r.models.models["m"].versions[2].reason.startswith("canary rolled back by the guard")
    traffic(r, clock, 2, 30, ok=False)  # weight 0: nothing more to roll back
    assert rolled == ["m:2"]


def test_a_new_canary_starts_a_fresh_window() -> None:
    r, clock, rolled = router()
    set_table(r, 1, 2)
    # Version 3 fails while it is only pinned (e.g. tried by hand before a fixed reload): the
    # guard samples every version, but these errors must not judge it once it is the canary.
    traffic(r, clock, 1, 30, ok=True)
    traffic(r, clock, 3, 30, ok=False)
    assert rolled == []
    set_table(r, 1, 3)
    traffic(r, clock, 1, 30, ok=True)
    traffic(r, clock, 3, 30, ok=True)
    assert rolled == [] and r.view("m").rollbacks == 0


def test_a_pinned_version_that_is_not_ready_says_why() -> None:
    r, _, _ = router((1, 2))
    r.models.models["m"].versions[2] = VersionEntry(
        "m", 2, ModelState.UNAVAILABLE, "golden self-test failed: output 'Y' differs by 1 (atol 0)"
    )
    why = "model 'm' version 2 is unavailable: golden self-test failed: output 'Y' differs by 1"
    for version, hints in (("2", RouteHints()), ("", RouteHints(header_version="2"))):
        with pytest.raises(NotReady) as ei:
            r.route("m", version, hints)
        assert ei.value.message == why + " (atol 0)"
    with pytest.raises(NotFound) as nf:
        r.route("m", "", RouteHints(header_version="7"))
    assert nf.value.message == "model 'm' has no version 7 (versions: 1, 2)"
    assert r.route("m", "", RouteHints()).version == 1  # unpinned: what is ready serves


def test_no_ready_version_says_why() -> None:
    r, _, _ = router((1,))
    r.models.models["m"].versions[1].state = ModelState.LOADING
    with pytest.raises(NotReady) as ei:
        r.route("m", "", RouteHints(routing_key="k"))
    assert ei.value.message == "model 'm' is loading"


@settings(max_examples=200, deadline=None)
@given(
    states=st.dictionaries(st.integers(1, 9), st.sampled_from(list(ModelState)), max_size=5),
    key=st.none() | st.text(max_size=4),
    weight=st.none() | st.sampled_from(["30%", "5000", "bad"]),
)
def test_an_unpinned_request_without_a_table_routes_as_resolve_says(
    states: dict[int, ModelState], key: str | None, weight: str | None
) -> None:
    # Router.route answers this, the usual request, without calling resolve(): same answer.
    r, _, _ = router(())
    for v, state in states.items():
        r.models.models["m"].versions[v] = VersionEntry("m", v, state)
    hints = RouteHints(routing_key=key, canary_weight=weight)
    ready = frozenset(v for v, s in states.items() if s is ModelState.READY)
    try:
        want = resolve(request_version="", header_version=None, routing_key=key, table=None,
                       ready_versions=ready, rng=r.rng, canary_weight_header=weight, model="m",
                       known_versions=frozenset(states))  # fmt: skip
    except VersionNotReady:
        with pytest.raises(NotReady):
            r.route("m", "", hints)
        return
    except Exception as exc:  # e.g. x-canary-weight without a table
        with pytest.raises(type(exc)) as ei:
            r.route("m", "", hints)
        assert str(ei.value) == str(exc)
        return
    assert r.route("m", "", hints) == want


# ------------------------------------------------------------------------------ routing file


def file_table(stable: int, canary: int) -> str:
    weights = {str(stable): 9000, str(canary): 1000}
    return json.dumps({"models": {"m": {"weights": weights}}})


def rewrite_in_place(path: Path, text: str) -> None:
    """Truncate and write, as `>` does, within one tick of a coarse file clock (a kernel before
    6.13 stamps files once per jiffy): the mtime stays what it was."""
    before = path.stat()
    path.write_text(text)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_the_routing_file_is_reread_when_rewritten_within_one_tick(tmp_path: Path) -> None:
    r, _, _ = router()
    path = tmp_path / "routing.json"
    path.write_text(file_table(1, 2))
    assert r.reload_file(path)
    rewrite_in_place(path, file_table(1, 3))  # the same size, another table
    assert r.reload_file(path)
    assert r.view("m").table["weights"] == {"1": 9000, "3": 1000}  # type: ignore[index]
    assert not r.reload_file(path)  # unchanged: not applied again


def test_a_poll_between_truncate_and_write_does_not_stick(tmp_path: Path) -> None:
    r, _, _ = router()
    path = tmp_path / "routing.json"
    path.write_text(file_table(1, 2))
    assert r.reload_file(path)
    rewrite_in_place(path, "")  # the poll sees the truncated file ...
    assert not r.reload_file(path)
    assert r.file_error.endswith("the previous tables keep serving")
    rewrite_in_place(path, file_table(2, 3))  # ... and the writer finishes in the same tick
    assert r.reload_file(path)
    assert r.file_error == ""
    assert r.view("m").table["weights"] == {"2": 9000, "3": 1000}  # type: ignore[index]


def test_a_routing_file_that_comes_back_unchanged_clears_the_error(tmp_path: Path) -> None:
    r, _, _ = router()
    path = tmp_path / "routing.json"
    path.write_text(file_table(1, 2))
    assert r.reload_file(path)
    path.rename(tmp_path / "away.json")
    assert not r.reload_file(path)
    assert r.file_error.startswith(f"cannot read {path}")
    (tmp_path / "away.json").rename(path)
    assert r.reload_file(path)
    assert r.file_error == ""


def test_a_routing_file_that_cannot_be_read_is_logged_once_per_change(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """(Only GetRouting's file_error said so: a typo'd --routing-file or a volume not mounted
    left the server ready without its tables and nothing in the log.)"""
    r, _, _ = router()
    path = tmp_path / "routing.json"
    with caplog.at_level("ERROR", logger="server.router"):
        for _ in range(3):  # polls, once a second
            assert not r.reload_file(path)
    assert caplog.messages == [
        f"routing file rejected: cannot read {path}: No such file or directory"
    ]
    assert r.file_error == f"cannot read {path}: No such file or directory"
    caplog.clear()
    path.mkdir()  # another error: said too
    with caplog.at_level("ERROR", logger="server.router"):
        assert not r.reload_file(path)
        assert not r.reload_file(path)
    assert caplog.messages == [f"routing file rejected: cannot read {path}: Is a directory"]
    path.rmdir()
    path.write_text(file_table(1, 2))
    assert r.reload_file(path)
    assert r.file_error == ""


def test_a_canary_given_a_share_again_is_not_judged_on_its_rolled_back_errors() -> None:
    """After a rollback, requests pinned to the broken canary kept filling the window of the
    same (stable, canary, rule); the operator fixed and reloaded it and sent the pairing again
    (docs/routing.md's retry), and those old errors rolled the fixed canary back at once."""
    r, clock, rolled = router()
    set_table(r, 1, 2)
    traffic(r, clock, 1, 30, ok=True)
    traffic(r, clock, 2, 30, ok=False)
    assert rolled == ["m:2"]
    traffic(r, clock, 2, 30, ok=False)  # reproduced by hand: x-model-version: 2
    clock.now += 1  # (within the guard's 5 s window)
    set_table(r, 1, 2)  # fixed and reloaded: the canary gets its share again
    traffic(r, clock, 1, 30, ok=True)
    traffic(r, clock, 2, 30, ok=True)
    assert rolled == ["m:2"]


def test_a_routing_file_rejected_for_a_version_not_ready_yet_applies_once_it_is(
    tmp_path: Path,
) -> None:
    """Whether the file is valid depends on the server too: it was never read again (the
    bytes had not changed), so a file naming a version still loading at start-up never
    took effect, and label requests got NOT_FOUND until someone edited it."""
    r, _clock, _rolled = router((1,))
    entry = r.models.models["m"]
    entry.versions[2] = VersionEntry("m", 2, ModelState.LOADING)
    path = tmp_path / "routing.json"
    tables = {"m": {"weights": {"1": 5000, "2": 5000}, "labels": {"stable": 1, "canary": 2}}}
    path.write_text(json.dumps({"models": tables}))
    assert not r.reload_file(path)
    assert "version 2" in r.file_error
    entry.versions[2].state = ModelState.READY
    assert r.reload_file(path)  # the next poll, the same bytes
    assert r.file_error == "" and r.view("m").source == "file"
    assert not r.reload_file(path)  # applied: nothing more to do until it changes


# ------------------------------------------------------------------------------ config table


def test_a_rejected_config_table_leaves_the_previous_one_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A config whose table was rejected (a typo in a weight; or a load that failed, whose new
    config names the version that did not load) dropped the table that was serving: a 90/10
    split became 100% for the highest ready version, the canary."""
    r, _, _ = router((1, 2))
    r.models.models["m"].versions[3] = VersionEntry("m", 3, ModelState.UNAVAILABLE, "bad file")
    good = {"weights": {"1": 9000, "2": 1000}, "labels": {"stable": 1, "canary": 2}}
    r.set_config_table("m", json.dumps(good))
    assert r.view("m").source == "config"
    for bad, why in (
        ({**good, "weights": {"1": 9000, "2": 500}}, "weights must sum to 10000 basis points"),
        ({**good, "weights": {"1": 9000, "3": 1000}}, "weights name version 3, which is not"),
    ):
        caplog.clear()
        r.set_config_table("m", json.dumps(bad))
        view = r.view("m")
        assert view.source == "config"
        assert view.table is not None and view.table["weights"] == {"1": 9000, "2": 1000}
        assert r.route("m", "", RouteHints(routing_key="user-1")).version in (1, 2)
        assert (
            "model m: the routing table in its config is rejected (the previous one keeps "
            f"serving): invalid routing table: {why}"
        ) in caplog.text
    r.set_config_table("m", None)  # a config without a routing entry: no config table
    assert r.view("m").source == "none"
    caplog.clear()
    r.set_config_table("m", "{")
    assert r.view("m").source == "none" and "rejected (none keeps serving)" in caplog.text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, "routing file is refused: its JSON is nested too deeply"),
        ('{"models": {"m": {"weights": {"' + "1" * 5000 + '": 10000}}}}',
         "model 'm': weights: version '11111111111111111...111111111111111111' is out of range "
         "(int64)"),
    ],
    ids=["deep", "huge-version"],
)  # fmt: skip
def test_a_routing_file_beyond_json_limits_is_reported_and_keeps_the_previous_tables(
    tmp_path: Path, text: str, message: str
) -> None:
    """Read at start-up, the deep file killed the server (RecursionError); read while serving,
    it was recorded as read before it failed, so the next poll skipped it and `file_error`
    stayed empty, claiming the file in force was the last one written."""
    r, _, _ = router()
    path = tmp_path / "routing.json"
    path.write_text(file_table(1, 2))
    assert r.reload_file(path)
    path.write_text(text)
    for _ in range(2):  # the next poll (the same bytes) still reports it
        assert not r.reload_file(path)
        assert r.file_error == f"{path}: {message}; the previous tables keep serving"
        assert r.view("m").source == "file"
        assert r.view("m").table["weights"] == {"1": 9000, "2": 1000}  # type: ignore[index]


def test_a_rejected_routing_file_names_the_model_of_each_problem(tmp_path: Path) -> None:
    """Validation errors came without their model: GetRouting of every model showed "weights
    name version 2, which is not loaded", also for a model whose table names only version 1;
    and only the first model's problems were listed."""
    r, _, _ = router((1,))
    r.models.models["b"] = ModelEntry("b", None)  # in the repository, not loaded
    path = tmp_path / "routing.json"
    tables = {
        "m": {"weights": {"1": 10000}},
        "b": {"weights": {"2": 10000}},
        "gone": {"labels": {"stable": 1}},
    }
    path.write_text(json.dumps({"models": tables}))
    assert not r.reload_file(path)
    assert r.file_error == (
        f"{path}: model 'b': invalid routing table: weights name version 2, which is not "
        "loaded (loaded: none); model 'gone': no such model in the repository; the previous "
        "tables keep serving"
    )
    assert r.view("m").file_error == r.view("b").file_error == r.file_error


def test_a_model_is_not_routed_before_its_config_table_applies() -> None:
    """At start-up a model's versions become READY one by one, and its config's routing table
    applies once they all have: meanwhile an unpinned request went to the highest ready one,
    whatever the table said (thousands of requests to a version the table gave none). Now
    such a request is UNAVAILABLE ("loading") until the table has been applied or refused;
    a pinned one is served, and so is a model whose config has no table."""
    table_json = json.dumps({"weights": {"1": 10_000}, "labels": {"stable": 1}})
    r, _, _ = router((1, 2))
    r.models.models["m"].spec = ModelSpec("m", parameters={"routing": table_json})
    with pytest.raises(VersionNotReady, match="model 'm' is loading: its routing table"):
        r.route("m", "", RouteHints())
    assert r.route("m", "2", RouteHints()).version == 2
    assert r.route("m", "", RouteHints(header_version="2")).version == 2
    r.set_config_table("m", table_json)
    assert {r.route("m", "", RouteHints(routing_key=str(k))).version for k in range(50)} == {1}

    plain, _, _ = router((1, 2))
    plain.models.models["m"].spec = ModelSpec("m")
    assert plain.route("m", "", RouteHints()).version == 2


def test_a_model_unloaded_is_routed_as_at_start_up_once_loaded_again() -> None:
    """After an unload (or a removal from the repository) the model's config table stayed in
    force and the model counted as routed by it: loaded again, its first READY version (the
    canary, with no share) took every unpinned request until the table applied again.
    Forgotten, the table gates the next load as at start-up; meanwhile the unloaded model says
    why it does not serve, not that it is loading."""
    table_json = json.dumps({"weights": {"1": 10_000, "2": 0}, "labels": {"stable": 1}})
    r, _, _ = router((1, 2))
    entry = r.models.models["m"]
    entry.spec = ModelSpec("m", parameters={"routing": table_json})
    r.set_config_table("m", table_json)
    assert r.route("m", "", RouteHints()).version == 1

    for ve in entry.versions.values():
        ve.state, ve.reason = ModelState.UNAVAILABLE, "unloaded"
    entry.reason, entry.requested = "unloaded", False
    r.forget_config("m")
    assert r.view("m").source == "none"
    with pytest.raises(VersionNotReady, match="model 'm' is not available: unloaded"):
        r.route("m", "", RouteHints())

    entry.reason, entry.requested = "", True  # loaded again: 2 is READY first
    entry.versions[1].state = ModelState.LOADING
    entry.versions[2].state = ModelState.READY
    with pytest.raises(VersionNotReady, match="model 'm' is loading: its routing table"):
        r.route("m", "", RouteHints())
    assert r.route("m", "2", RouteHints()).version == 2
    entry.versions[1].state = ModelState.READY
    r.set_config_table("m", table_json)
    assert r.route("m", "", RouteHints()).version == 1
