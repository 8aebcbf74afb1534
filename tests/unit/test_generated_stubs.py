"""The committed stubs in server/_proto are what proto/ generates, and they are wire-compatible
with tritonclient's copy of Triton's protos.

tritonclient registers the same protobuf names as server._proto, so the two descriptor sets are
dumped by tests/unit/_dump_descriptors.py in separate subprocesses: nothing here imports either.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DUMP = ROOT / "tests" / "unit" / "_dump_descriptors.py"
GEN = ROOT / "scripts" / "gen_proto.py"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


# ----------------------------------------------------------------------------- regeneration


def test_committed_stubs_are_up_to_date() -> None:
    proc = subprocess.run(
        [sys.executable, str(GEN), "--check"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_detects_stale_stubs(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    shutil.copytree(ROOT / "proto", tmp_path / "proto")
    (tmp_path / "scripts").mkdir()
    shutil.copy(GEN, tmp_path / "scripts" / "gen_proto.py")
    shutil.copytree(
        ROOT / "server" / "_proto",
        tmp_path / "server" / "_proto",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    stub = tmp_path / "server" / "_proto" / "inference" / "grpc_service_pb2.py"
    stub.write_text(stub.read_text() + "\n# edited by hand\n")
    (tmp_path / "server" / "_proto" / "inference" / "stray.py").write_text("")
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "scripts" / "gen_proto.py"), "--check"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert "generated stubs are stale:" in proc.stderr
    assert "grpc_service_pb2.py" in proc.stderr
    assert "stray.py" in proc.stderr


# ----------------------------------------------------------------------------- wire compatibility


@cache
def _dumps() -> tuple[dict[str, Any], dict[str, Any]]:
    procs = [
        subprocess.Popen(
            [sys.executable, str(DUMP), which],
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for which in ("ours", "triton")
    ]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out[0], out[1]


@pytest.fixture(scope="module")
def tables() -> tuple[dict[str, Any], dict[str, Any]]:
    if importlib.util.find_spec("tritonclient") is None:
        pytest.skip("tritonclient is not installed")
    return _dumps()


def _messages(t: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in t.items() if not k.startswith("__")}


def test_dumps_do_not_share_a_process() -> None:
    assert "tritonclient" not in sys.modules


def test_every_message_and_field_exists_in_triton(
    tables: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    ours, triton = tables
    problems: list[str] = []
    for message, fields in _messages(ours).items():
        theirs = triton.get(message)
        if theirs is None:
            problems.append(f"message {message} is not in Triton's protos")
            continue
        for field, (number, ftype, repeated, type_name) in fields.items():
            other = theirs.get(field)
            if other is None:
                problems.append(f"{message}.{field} is not in Triton's {message}")
            elif other != [number, ftype, repeated, type_name]:
                problems.append(
                    f"{message}.{field}: ours (number, type, repeated, type name) = "
                    f"{[number, ftype, repeated, type_name]}, Triton's = {other}"
                )
    assert problems == []


def test_the_inference_messages_are_complete(
    tables: tuple[dict[str, Any], dict[str, Any]],
) -> None:
    """The request/response messages of the service carry every field Triton's do (a field we
    lack would be dropped silently when a Triton client sends it)."""
    ours, triton = tables
    service_types = {t for sig in triton["__service__"].values() for t in sig[:2]}
    incomplete = {
        m: sorted(set(triton[m]) - set(ours.get(m, {})))
        for m in service_types
        if set(triton[m]) - set(ours.get(m, {}))
    }
    assert incomplete == {}


def test_the_model_config_is_complete(tables: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """ModelConfig and every message under it carry every field Triton's do, so any config
    written for Triton parses (a subset refused `response_cache`, `sequence_batching`,
    `optimization { priority }`, `instance_group { host_policy }`... as "does not parse";
    server/model_config.py decides what microtune does with each field)."""
    ours, triton = tables
    seen, todo = set(), ["inference.ModelConfig"]
    while todo:
        message = todo.pop()
        if message in seen or message not in triton:  # (enums: compared below)
            continue
        seen.add(message)
        todo.extend(type_name for *_, type_name in triton[message].values() if type_name)
    incomplete = {
        m: sorted(set(triton[m]) - set(ours.get(m, {})))
        for m in sorted(seen)
        if set(triton[m]) - set(ours.get(m, {}))
    }
    assert incomplete == {}
    assert len(seen) > 30  # (the walk went down the nested messages)


def test_enums_match_triton(tables: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, triton = tables
    assert "inference.DataType" in ours["__enums__"]
    for enum, values in ours["__enums__"].items():
        assert enum in triton["__enums__"], enum
        assert values == {k: triton["__enums__"][enum][k] for k in values}, enum
        assert set(values) == set(triton["__enums__"][enum]), enum


def test_service_has_the_same_20_methods(tables: tuple[dict[str, Any], dict[str, Any]]) -> None:
    ours, triton = tables
    assert len(ours["__service__"]) == 20
    assert ours["__service__"] == triton["__service__"]
    # [request type, response type, client streaming, server streaming]
    assert ours["__service__"]["ModelStreamInfer"] == [
        "inference.ModelInferRequest",
        "inference.ModelStreamInferResponse",
        True,
        True,
    ]
    assert ours["__service__"]["ModelInfer"] == [
        "inference.ModelInferRequest",
        "inference.ModelInferResponse",
        False,
        False,
    ]
