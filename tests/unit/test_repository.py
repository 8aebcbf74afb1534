"""server.repository: scanning a model repository on disk (tmp directories, no onnx needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.repository import ScannedModel, scan_model, scan_repository
from server.settings import DEMO_REPOSITORY
from server.types import ModelSpec, VersionPolicy


def make_model(
    root: Path,
    name: str,
    versions: list[str],
    config: str | None = None,
    *,
    model_file: str = "model.onnx",
    without_file: tuple[str, ...] = (),
) -> Path:
    d = root / name
    d.mkdir(parents=True)
    if config is not None:
        (d / "config.pbtxt").write_text(config)
    for v in versions:
        (d / v).mkdir()
        if v not in without_file:
            (d / v / model_file).write_bytes(b"onnx")
    return d


@pytest.mark.parametrize(
    ("dirs", "selected"),
    [
        (["1", "2", "3"], [3]),
        (["1", "2", "10"], [10]),  # numeric, not lexicographic
        (["1", "01", "002"], [1]),  # leading zeros are ignored
        (["0", "1"], [1]),  # "0" starts with a zero
        (["3", "abc", "v4", "4a", "-5", "+6", " 7"], [3]),  # non-numeric ignored
        (["2", "²", "٣"], [2]),  # non-ASCII digits are not version numbers
        # past int64 (Triton's versions): an OverflowError stopped the server at start-up
        (["4", str(2**63), "9" * 250], [4]),
        ([str(2**63 - 1)], [2**63 - 1]),
    ],
    ids=[
        "plain",
        "numeric-order",
        "leading-zero",
        "zero",
        "non-numeric",
        "unicode-digits",
        "past-int64",
        "int64-max",
    ],
)
def test_version_directory_rules(tmp_path: Path, dirs: list[str], selected: list[int]) -> None:
    make_model(tmp_path, "m", dirs)
    (tmp_path / "m" / "9").write_text("a file, not a directory")
    scanned = scan_model(tmp_path, "m")
    assert scanned.reason == ""
    assert sorted(scanned.versions) == selected
    assert scanned.versions[selected[-1]] == tmp_path / "m" / str(selected[-1]) / "model.onnx"


@pytest.mark.parametrize(
    ("policy", "selected"),
    [
        ("", [5]),
        ("version_policy: { latest: { num_versions: 2 } }", [3, 5]),
        ("version_policy: { latest: { num_versions: 10 } }", [1, 2, 3, 5]),
        ("version_policy: { all: {} }", [1, 2, 3, 5]),
        ("version_policy: { specific: { versions: [ 2, 5, 7 ] } }", [2, 5]),
    ],
    ids=["default", "latest-2", "latest-more-than-there", "all", "specific"],
)
def test_policy_selection(tmp_path: Path, policy: str, selected: list[int]) -> None:
    make_model(tmp_path, "m", ["1", "2", "3", "5"], policy)
    scanned = scan_model(tmp_path, "m")
    assert scanned.reason == ""
    assert list(scanned.versions) == selected
    assert scanned.version_errors == {}


@pytest.mark.parametrize(
    ("select", "message"),
    [
        ([], "[1, 2]"),
        ([7], "[1, 2]"),
    ],
)
def test_policy_selecting_nothing(tmp_path: Path, select: list[int], message: str) -> None:
    versions = ", ".join(str(v) for v in select)
    make_model(
        tmp_path, "m", ["1", "2"], f"version_policy: {{ specific: {{ versions: [ {versions} ] }} }}"
    )
    scanned = scan_model(tmp_path, "m")
    assert scanned.spec is not None
    assert scanned.versions == {}
    assert scanned.reason == (
        f"model 'm' has no version directory selected by its version policy (found: {message})"
    )


def test_no_version_directories(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["abc"])
    scanned = scan_model(tmp_path, "m")
    assert scanned.reason == (
        "model 'm' has no version directory selected by its version policy (found: none)"
    )


def test_missing_model_file_is_a_version_error(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["1", "2"], "version_policy: { all: {} }", without_file=("2",))
    scanned = scan_model(tmp_path, "m")
    assert scanned.reason == ""
    assert scanned.versions == {1: tmp_path / "m" / "1" / "model.onnx"}
    assert scanned.version_errors == {2: "version 2 has no model.onnx"}


def test_default_model_filename(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["1"], 'default_model_filename: "net.onnx"', model_file="net.onnx")
    make_model(tmp_path, "n", ["1"], 'default_model_filename: "net.onnx"')  # has model.onnx
    assert scan_model(tmp_path, "m").versions == {1: tmp_path / "m" / "1" / "net.onnx"}
    n = scan_model(tmp_path, "n")
    assert n.versions == {}
    assert n.version_errors == {1: "version 1 has no net.onnx"}


def test_model_file_that_is_a_directory_is_missing(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["1"], without_file=("1",))
    (tmp_path / "m" / "1" / "model.onnx").mkdir()
    assert scan_model(tmp_path, "m").version_errors == {1: "version 1 has no model.onnx"}


def test_bad_config_is_a_model_reason(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["1"], "max_batch_size: -3")
    scanned = scan_model(tmp_path, "m")
    assert scanned == ScannedModel(
        "m", None, "model 'm': max_batch_size must be >= 0", config_files=scanned.config_files
    )
    # (its config file is fingerprinted all the same: poll mode waits for one being written)
    assert [(name, size) for name, size, _ in scanned.config_files] == [("config.pbtxt", 18)]


def test_explicit_spec_replaces_the_config_file(tmp_path: Path) -> None:
    make_model(tmp_path, "m", ["1", "2"], "this does not parse")
    spec = ModelSpec(name="m", version_policy=VersionPolicy("all"))
    scanned = scan_model(tmp_path, "m", spec)
    assert scanned.spec is spec
    assert sorted(scanned.versions) == [1, 2]


def test_unknown_model_directory(tmp_path: Path) -> None:
    assert scan_model(tmp_path, "nope") == ScannedModel(
        "nope", None, "model 'nope' is not in the repository"
    )


def test_scan_repository(tmp_path: Path) -> None:
    make_model(tmp_path, "b", ["1"])
    make_model(tmp_path, "a", ["1", "2"], 'name: "wrong"')
    make_model(tmp_path, "c", ["x"])
    make_model(tmp_path, ".hidden", ["1"])
    make_model(tmp_path, "_private", ["1"])
    (tmp_path / "README.md").write_text("not a model")
    scanned = scan_repository(tmp_path)
    assert [s.name for s in scanned] == ["a", "b", "c"]
    a, b, c = scanned
    assert a.reason == "config name 'wrong' differs from its directory 'a'"
    assert b.reason == "" and list(b.versions) == [1]
    assert c.reason.startswith("model 'c' has no version directory")


def test_one_broken_model_does_not_stop_the_scan(tmp_path: Path) -> None:
    make_model(tmp_path, "bad", ["1"], 'input { name: "x" data_type: 77 dims: [ 1 ] }')
    (tmp_path / "worse").mkdir()
    (tmp_path / "worse" / "config.pbtxt").mkdir()
    make_model(tmp_path, "good", ["1"])
    scanned = {s.name: s for s in scan_repository(tmp_path)}
    assert scanned["bad"].reason == "model 'bad': input 'x' has unsupported type 77"
    assert scanned["worse"].reason.startswith("config of model 'worse' does not parse")
    assert list(scanned["good"].versions) == [1]


def test_scan_repository_needs_a_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        scan_repository(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        scan_repository(tmp_path / "file")


def test_demo_repository_scans_clean() -> None:
    scanned = {s.name: s for s in scan_repository(DEMO_REPOSITORY)}
    assert all(s.reason == "" and not s.version_errors for s in scanned.values())
    assert sorted(scanned["dense"].versions) == [1, 2]
    assert sorted(scanned["simple"].versions) == [1]


@pytest.mark.parametrize(
    ("policy", "available", "want"),
    [
        (VersionPolicy(), [3, 1, 2], [3]),
        (VersionPolicy("latest", 2), [3, 1, 2], [2, 3]),
        (VersionPolicy("latest", 0), [1, 2], []),
        (VersionPolicy("all"), [3, 1], [1, 3]),
        (VersionPolicy("specific", versions=(1, 4)), [1, 2, 3], [1]),
        (VersionPolicy(), [], []),
    ],
)
def test_version_policy_select(
    policy: VersionPolicy, available: list[int], want: list[int]
) -> None:
    assert policy.select(available) == want
