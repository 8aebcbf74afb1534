"""A rejected routing table, end to end: the table it would have replaced keeps serving and the
rejection is reported (docs/routing.md, "The routing table").

One explicit-mode server on a copy of the demo `dense` model (versions 1 and 2):
  dense_file  named by the routing file, which starts as JSON nested too deeply to parse
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import Server, running_server
from routing_support import (
    AdminStub,
    admin_stub,
    apb,
    copy_dense,
)

DEEP = "[" * 100_000  # beyond Python's recursion limit for json
# The routing file is polled every second.
APPLY_WITHIN_S = 3.0


def write_routing_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def routing_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("routing") / "routing.json"
    write_routing_file(path, DEEP)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, routing_file: Path) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("repo")
    copy_dense(repo, "dense_file")
    args = (
        "--model-control-mode", "explicit", "--load-model", "dense_file",
        "--routing-file", str(routing_file),
    )  # fmt: skip
    with running_server(repo, tmp_path_factory.mktemp("server"), args) as s:
        yield s


@pytest.fixture(scope="module")
def channel(server: Server) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.url) as ch:
        yield ch


@pytest.fixture(scope="module")
def admin(channel: grpc.Channel) -> AdminStub:
    return admin_stub(channel)


def routing(admin: AdminStub, model: str) -> apb.RoutingStatus:
    return admin.GetRouting(apb.GetRoutingRequest(model=model))


def weights(status: apb.RoutingStatus) -> dict[str, Any] | None:
    return json.loads(status.table_json)["weights"] if status.table_json else None


def test_a_routing_file_nested_too_deeply_is_reported_from_start_up(
    admin: AdminStub, routing_file: Path
) -> None:
    """At start-up it killed the server with a RecursionError traceback; while serving, the
    error was never reported (`file_error` stayed empty)."""
    deep_error = (
        f"{routing_file}: routing file is refused: its JSON is nested too deeply; "
        "the previous tables keep serving"
    )
    status = routing(admin, "dense_file")
    assert status.source == "none" and status.file_error == deep_error

    table = {"weights": {"1": 0, "2": 10000}}
    write_routing_file(routing_file, json.dumps({"models": {"dense_file": table}}))
    start = time.monotonic()
    while (status := routing(admin, "dense_file")).source != "file":
        assert time.monotonic() - start < APPLY_WITHIN_S, status
        time.sleep(0.05)
    assert status.file_error == ""

    write_routing_file(routing_file, DEEP)
    start = time.monotonic()
    while not (status := routing(admin, "dense_file")).file_error:
        assert time.monotonic() - start < APPLY_WITHIN_S, status
        time.sleep(0.05)
    assert status.file_error == deep_error
    time.sleep(1.5)  # the next polls, the same bytes: still reported
    status = routing(admin, "dense_file")
    assert status.file_error == deep_error
    assert status.source == "file" and weights(status) == {"1": 0, "2": 10000}
