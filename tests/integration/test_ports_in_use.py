"""A port another process holds: the server stops at start with EXIT_CONFIG and one line
naming it (the metrics port and the gRPC port: a lone front and a supervisor alike, a second
supervisor on the first one's port among them). The supervisor used to start its worker and
fronts first, then fail outside its clean-up: it waited for its fronts at exit for ever and no
longer heard SIGTERM; a lone front ended with a traceback."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2
from harness import ROOT, Server, ServerExited

EXIT_CONFIG = 78
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_metrics_port_in_use_stops_the_server_at_start(
    model_repository: Path, tmp_path: Path, busy_port: int, frontends: str
) -> None:
    with pytest.raises(ServerExited) as info:
        Server(
            model_repository,
            tmp_path,
            extra_args=("--frontends", frontends, "--metrics-port", str(busy_port)),
            start_timeout=60,
        )
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert f"cannot serve metrics on port {busy_port}: [Errno 98] Address already in use" in text
    assert "Traceback" not in text


def test_a_grpc_port_in_use_stops_a_lone_front_with_one_line(
    model_repository: Path, tmp_path: Path, busy_port: int
) -> None:
    """(It ended with grpc's RuntimeError traceback and exit code 1.)"""
    with pytest.raises(ServerExited) as info:
        Server(model_repository, tmp_path, extra_args=("--grpc-port", str(busy_port)))
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert f"cannot listen on 127.0.0.1:{busy_port}: the address is in use" in text
    assert "Traceback" not in text


def test_a_grpc_port_in_use_stops_a_supervisor_with_one_line(
    model_repository: Path, tmp_path: Path, busy_port: int
) -> None:
    """(The supervisor raised an OSError traceback.)"""
    with pytest.raises(ServerExited) as info:
        Server(
            model_repository,
            tmp_path,
            extra_args=("--frontends", "2", "--grpc-port", str(busy_port)),
        )
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert f"cannot listen on 127.0.0.1:{busy_port}: Address already in use" in text
    assert "Traceback" not in text


def test_a_second_supervisor_on_the_port_stops_instead_of_sharing_it(
    model_repository: Path, tmp_path: Path
) -> None:
    """Both would bind with SO_REUSEPORT, and the kernel would spread the clients' connections
    over the two servers' fronts without a word."""
    for d in ("first", "second"):
        (tmp_path / d).mkdir()
    first = Server(model_repository, tmp_path / "first", extra_args=("--frontends", "2"))
    try:
        try:
            second = Server(
                model_repository,
                tmp_path / "second",
                extra_args=("--frontends", "2", "--grpc-port", str(first.port)),
            )
        except ServerExited as exc:
            text = str(exc)
        else:
            second.stop(check=False)
            pytest.fail("a second supervisor started on the port: they share its connections")
        assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
        assert (
            f"cannot listen on 127.0.0.1:{first.port}: another microtune server serves it"
        ) in text
        first.wait_health("readiness", SERVING, 10)
    finally:
        first.stop()


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_worker_that_cannot_start_stops_the_server_with_one_line(
    model_repository: Path, tmp_path: Path, frontends: str
) -> None:
    """(A worker that exited or was late at start-up ended a lone front with a traceback and
    exit code 1, and left its run directory behind.)"""
    args = ("--worker-start-timeout-s", "0.01", "--frontends", frontends)
    with pytest.raises(ServerExited) as info:
        Server(model_repository, tmp_path, extra_args=args)
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert "cannot start: the runtime worker did not listen within 0.01 s" in text
    assert "Traceback" not in text


# Makes onnxruntime (and onnx) unimportable, as after a plain `pip install .`: they come with
# the cpu or gpu extra.
_NO_ONNXRUNTIME = """
import sys
class _Missing:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnxruntime", "onnx"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _Missing())
"""


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_worker_without_onnxruntime_names_the_extra_to_install(
    model_repository: Path, tmp_path: Path, frontends: str
) -> None:
    """(The worker died with a ModuleNotFoundError traceback, and the server said only that
    it exited with code 1 during start-up.)"""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(_NO_ONNXRUNTIME)
    path = f"PYTHONPATH={site}{os.pathsep}{ROOT}"
    with pytest.raises(ServerExited) as info:
        Server(model_repository, tmp_path, extra_args=("--frontends", frontends),
               prefix=("env", path))  # fmt: skip
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert (
        "cannot start: onnxruntime is not installed: install microtune with its cpu extra "
        "(pip install '.[cpu]'), or gpu on a CUDA machine ('.[gpu]')"
    ) in text
    assert "the runtime worker exited with code 78 during start-up (see its error above)" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_port_file_that_cannot_be_written_stops_the_server_with_one_line(
    model_repository: Path, tmp_path: Path, frontends: str
) -> None:
    """(A lone front ended with a traceback and exit code 1; under the supervisor, front 0
    crash-looped to the restart limit, or hung in its stop and went on accepting
    connections after SIGTERM.) /proc/x: a file in a directory that nobody can write."""
    args = ("--frontends", frontends, "--port-file", "/proc/x")  # (the last --port-file wins)
    with pytest.raises(ServerExited) as info:
        Server(model_repository, tmp_path, extra_args=args, start_timeout=60)
    text = str(info.value)
    assert f"server exited with code {EXIT_CONFIG}" in text, text[-3000:]
    assert "cannot start: cannot write the port file /proc/x:" in text
    assert "Traceback" not in text
