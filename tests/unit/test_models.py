"""server.models.ModelTable: resolving (model, version string) and the repository index."""

from __future__ import annotations

import pytest

from server.errors import InvalidInput, NotFound, NotReady
from server.handler import InferenceHandler
from server.models import NOT_LOADED, ModelEntry, ModelTable, VersionEntry
from server.types import ModelIndexEntry, ModelSpec, ModelState
from server.versions import parse_version

READY, LOADING, UNAVAILABLE, UNLOADING = (
    ModelState.READY,
    ModelState.LOADING,
    ModelState.UNAVAILABLE,
    ModelState.UNLOADING,
)


def table(**models: dict[int, tuple[ModelState, str]] | str) -> ModelTable:
    """table(m={1: (READY, ""), 2: (LOADING, "")}, broken="bad config")"""
    t = ModelTable()
    for name, spec in models.items():
        if isinstance(spec, str):
            t.models[name] = ModelEntry(name, None, reason=spec)
            continue
        entry = ModelEntry(name, ModelSpec(name=name))
        for v, (state, reason) in spec.items():
            entry.versions[v] = VersionEntry(name, v, state, reason)
        t.models[name] = entry
    return t


def test_unknown_model() -> None:
    with pytest.raises(NotFound) as info:
        table().resolve("nope", "")
    assert "Request for unknown model" in info.value.message
    assert info.value.message == "Request for unknown model: 'nope' is not found"
    with pytest.raises(NotFound, match="Request for unknown model"):
        table().get("nope")


@pytest.mark.parametrize("version", ["abc", "0", "-1", "+1", " 1", "1.0", "01x", "²", "٣", "00"])
def test_bad_version_string(version: str) -> None:
    t = table(m={1: (READY, "")})
    with pytest.raises(InvalidInput) as info:
        t.resolve("m", version)
    assert info.value.message == (
        f"failed to get model version from specified version string '{version}': "
        "version should be an integral value > 0"
    )
    assert "failed to get model version from specified version string" in info.value.message


@pytest.mark.parametrize(("version", "value"), [("1", 1), ("01", 1), ("42", 42)])
def test_parse_version(version: str, value: int) -> None:
    assert parse_version(version) == value


def test_unknown_version() -> None:
    t = table(m={1: (READY, ""), 3: (UNAVAILABLE, "x")}, empty={})
    with pytest.raises(NotFound) as info:
        t.resolve("m", "2")
    assert info.value.message == "model 'm' has no version 2 (versions: 1, 3)"
    with pytest.raises(NotFound, match=r"model 'empty' has no version 1 \(versions: none\)"):
        t.resolve("empty", "1")


def test_default_is_the_highest_ready_version() -> None:
    t = table(m={1: (READY, ""), 2: (READY, ""), 3: (LOADING, ""), 4: (UNAVAILABLE, "boom")})
    ve = t.resolve("m", "")
    assert (ve.model, ve.version) == ("m", 2)
    assert t.resolve("m", "1").version == 1
    assert t.models["m"].ready_versions() == [1, 2]


@pytest.mark.parametrize(
    ("state", "reason", "message"),
    [
        (LOADING, "", "model 'm' version 2 is loading"),
        (UNAVAILABLE, "", "model 'm' version 2 is unavailable"),
        (
            UNAVAILABLE,
            "onnxruntime: bad graph",
            "model 'm' version 2 is unavailable: onnxruntime: bad graph",
        ),
        (UNLOADING, "", "model 'm' version 2 is unloading"),
    ],
)
def test_explicit_version_not_ready(state: ModelState, reason: str, message: str) -> None:
    t = table(m={1: (READY, ""), 2: (state, reason)})
    with pytest.raises(NotReady) as info:
        t.resolve("m", "2")
    assert info.value.message == message
    assert not t.is_ready("m", "2")
    assert t.is_ready("m", "1") and t.is_ready("m", "")


@pytest.mark.parametrize(
    ("versions", "message"),
    [
        ({1: (LOADING, ""), 2: (UNAVAILABLE, "x")}, "model 'm' is loading"),
        (
            {1: (UNAVAILABLE, "bad graph"), 2: (UNAVAILABLE, "")},
            "model 'm' version 1 is unavailable: bad graph; model 'm' version 2 is unavailable",
        ),
        ({}, "model 'm' has no ready version"),
    ],
    ids=["loading", "all-unavailable", "no-versions"],
)
def test_default_version_not_ready(
    versions: dict[int, tuple[ModelState, str]], message: str
) -> None:
    t = table(m=versions)
    with pytest.raises(NotReady) as info:
        t.resolve("m", "")
    assert info.value.message == message


def test_model_level_reason() -> None:
    t = table(broken="config name 'x' differs from its directory 'broken'")
    with pytest.raises(NotReady) as info:
        t.resolve("broken", "")
    assert info.value.message == (
        "model 'broken' is not available: config name 'x' differs from its directory 'broken'"
    )


@pytest.mark.parametrize(
    ("name", "version", "ready"),
    [("m", "", True), ("m", "1", True), ("m", "2", False), ("m", "9", False),
     ("nope", "", False), ("broken", "", False)],
)  # fmt: skip
def test_is_ready(name: str, version: str, ready: bool) -> None:
    t = table(m={1: (READY, ""), 2: (LOADING, "")}, broken="bad")
    assert t.is_ready(name, version) is ready


def test_is_ready_of_a_version_string_that_is_none() -> None:
    """As in Triton, ModelReady refuses it (INVALID_ARGUMENT) rather than saying not ready."""
    with pytest.raises(InvalidInput, match="failed to get model version"):
        table(m={1: (READY, "")}).is_ready("m", "x")


def test_index() -> None:
    t = table(
        b={2: (READY, ""), 1: (UNAVAILABLE, "boom"), 3: (LOADING, "")},
        a={1: (READY, "")},
        broken="bad config",
    )
    assert t.index(ready_only=False) == [
        ModelIndexEntry("a", "1", "READY", ""),
        ModelIndexEntry("b", "1", "UNAVAILABLE", "boom"),
        ModelIndexEntry("b", "2", "READY", ""),
        ModelIndexEntry("b", "3", "LOADING", ""),
        ModelIndexEntry("broken", "", "UNAVAILABLE", "bad config"),
    ]
    assert t.index(ready_only=True) == [
        ModelIndexEntry("a", "1", "READY", ""),
        ModelIndexEntry("b", "2", "READY", ""),
    ]
    assert t.loading()
    t.models["b"].versions[3].state = READY
    assert not t.loading()


def test_index_says_a_model_reason_beside_the_versions_own() -> None:
    """A config that stopped parsing (poll mode) was hidden on a version that already had a
    reason of its own (an earlier failed reload): both are said now, the model's first."""
    t = table(m={1: (READY, "reload failed, serving the instance loaded before: x")})
    t.models["m"].reason = "config.pbtxt does not parse"
    assert t.index(ready_only=False) == [
        ModelIndexEntry(
            "m",
            "1",
            "READY",
            "config.pbtxt does not parse; reload failed, serving the instance loaded before: x",
        )
    ]
    t.models["m"].versions[1].reason = "config.pbtxt does not parse"
    assert t.index(ready_only=False)[0].reason == "config.pbtxt does not parse"  # (said once)


def test_a_model_level_failure_counts_unless_versions_serve_on() -> None:
    """--strict-readiness: a model asked for again after an unload, whose config no longer
    parses, has only its unloaded versions' entries (and its old config): it failed. One
    whose versions loaded before serve on (a config that stopped parsing in poll mode) has
    not, and neither has one nobody asks for."""
    t = table(m={1: (UNAVAILABLE, "unloaded")})
    for ve in t.models["m"].versions.values():
        ve.unloaded = True
    t.models["m"].reason = "config of model 'm' does not parse"
    assert t.failed()
    t.models["m"].versions[1].state = READY
    assert not t.failed()
    t.models["m"].versions[1].state = UNAVAILABLE
    t.models["m"].requested = False
    assert not t.failed()


def test_index_lists_a_model_never_loaded_by_its_name_only() -> None:
    """As Triton: a model of the repository not loaded (explicit mode) has no version, state or
    reason in the index; it was listed UNAVAILABLE, "not loaded", as if a load had failed."""
    t = table(m={1: (READY, "")})
    t.models["later"] = ModelEntry("later", ModelSpec(name="later"), NOT_LOADED, requested=False)
    on_disk = frozenset({"m", "later", "new"})
    assert t.index(ready_only=False, on_disk=on_disk) == [
        ModelIndexEntry("later", "", "", ""),
        ModelIndexEntry("m", "1", "READY", ""),
        ModelIndexEntry("new", "", "", ""),
    ]
    assert t.index(ready_only=False, on_disk=frozenset({"m"})) == [  # "later" removed
        ModelIndexEntry("m", "1", "READY", "")
    ]
    assert t.index(ready_only=True, on_disk=on_disk) == [ModelIndexEntry("m", "1", "READY", "")]


def test_index_of_an_empty_table() -> None:
    assert table().index(ready_only=False) == []
    assert not table().loading()


# ----------------------------------------------------------------------------- statistics rows


def _stats_handler(t: ModelTable) -> InferenceHandler:
    h = InferenceHandler.__new__(InferenceHandler)  # _own_statistics() reads only the table
    h.table = t
    return h


@pytest.mark.parametrize(
    ("name", "version", "rows"),
    [
        ("", "", [("a", 1), ("m", 1), ("m", 2)]),  # every ready version of every model
        ("m", "", [("m", 1), ("m", 2)]),
        ("m", "3", [("m", 3)]),  # an explicit version, ready or not
    ],
)
def test_statistics_rows(name: str, version: str, rows: list[tuple[str, int]]) -> None:
    t = table(m={1: (READY, ""), 2: (READY, ""), 3: (UNAVAILABLE, "x")}, a={1: (READY, "")})
    got = _stats_handler(t)._own_statistics(name, version)
    assert sorted((r.name, r.version) for r in got) == rows


def test_statistics_unknown_version() -> None:
    t = table(m={1: (READY, "")})
    with pytest.raises(NotFound) as info:
        _stats_handler(t)._own_statistics("m", "9")
    assert info.value.message == "model 'm' has no version 9"


@pytest.mark.parametrize("version", ["x", "²", "-1", "0", str(2**63), "9" * 5000])
def test_statistics_of_a_version_string_that_is_none(version: str) -> None:
    """As in Triton: INVALID_ARGUMENT in its wording (a 5000-digit one was INTERNAL: int())."""
    with pytest.raises(InvalidInput) as info:
        _stats_handler(table(m={1: (READY, "")}))._own_statistics("m", version)
    assert info.value.message == (
        f"failed to get model version from specified version string '{version[:64]}': "
        "version should be an integral value > 0"
    )


def test_statistics_unknown_model() -> None:
    with pytest.raises(NotFound, match="Request for unknown model"):
        _stats_handler(table())._own_statistics("nope", "")
