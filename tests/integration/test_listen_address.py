"""The address given to --grpc-host as users write it: a bare IPv6 literal (`::1`, `::`) is
served like its bracketed form."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from harness import ROOT

SERVING = health_pb2.HealthCheckResponse.SERVING


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("frontends", ["1", "2"])
def test_a_bare_ipv6_host_is_served(model_repository: Path, tmp_path: Path, frontends: str) -> None:
    """`--grpc-host ::1` (no brackets): gRPC read "::1:PORT" as [::0.1.0.0]:443 and the server
    stopped saying the address was in use. It is now bracketed, as "[::1]" always worked."""
    port_file = tmp_path / "port"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROTUNE_")}
    env.update(PYTHONPATH=str(ROOT))
    with (tmp_path / "log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve", "--model-repository", str(model_repository),
             "--grpc-host", "::1", "--grpc-port", "0", "--port-file", str(port_file),
             "--metrics-port", "-1", "--frontends", frontends, "--strict-readiness", "false"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
            assert time.monotonic() < deadline, "no port file"
            time.sleep(0.05)
        with grpc.insecure_channel(f"[::1]:{port_file.read_text().strip()}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="readiness")
            while stub.Check(request, timeout=5, wait_for_ready=True).status != SERVING:
                assert time.monotonic() < deadline, "never ready"
                time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
