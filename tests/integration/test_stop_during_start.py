"""SIGTERM while the models still load (a pod deleted, or scaled down, while it starts): the
server stops at once, not after every model has loaded; before, a lone front acted on it only
once start-up was done, and the kubelet would SIGKILL it at the end of the grace period. The
model "slow" takes a minute to load in the worker (slow_load/sitecustomize.py, test-only)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from harness import DEMO, ROOT

SLOW_S = 60.0


def test_sigterm_while_a_model_loads_stops_the_server_at_once(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(DEMO / "identity_fp32", repo / "slow")
    config = repo / "slow" / "config.pbtxt"
    config.write_text(config.read_text().replace('"identity_fp32"', '"slow"'))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROTUNE_")}
    path = [str(Path(__file__).parent / "slow_load"), os.environ.get("PYTHONPATH", ""), str(ROOT)]
    env.update(PYTHONPATH=os.pathsep.join(p for p in path if p), SLOW_LOAD_TEST_S=str(SLOW_S))
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "server", "serve", "--model-repository", str(repo),
           "--grpc-host", "127.0.0.1", "--grpc-port", "0", "--port-file", str(port_file),
           "--metrics-port", "-1", "--device", "cpu", "--log-level", "INFO"]  # fmt: skip
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 60
            while not port_file.exists():  # a lone front listens first, then loads
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
            time.sleep(1.0)  # "slow" is loading in the worker
            assert proc.poll() is None
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(SLOW_S / 2)  # TimeoutExpired: it waited for the load
            took = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = (tmp_path / "server.log").read_text()
    assert code == 0, text[-3000:]
    assert took < SLOW_S / 2, text[-3000:]
    assert "shutting down" in text
