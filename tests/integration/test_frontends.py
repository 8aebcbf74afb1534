"""`--frontends 2`: two front processes share the gRPC port (SO_REUSEPORT) and one worker.

The kernel hands every listener of the port its share of new connections, so a front must
not listen before it can serve: a front that listened while still loading its models answered
its share NOT_FOUND ("unknown model") or UNAVAILABLE while the other front could have served
them. Here, on a repository of many models (so that a front's loading takes a while), every
request on a fresh connection succeeds:

- right after the server reports ready (the second front may still be loading);
- while a SIGKILLed front is being replaced (the supervisor restarts it; the replacement
  joins the port only once loaded).

The killed front's arena leaves /dev/shm, and stopping the server leaves no process and no
arena of any front behind.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import DEMO, SHM, Server, children_of, pid_alive
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

COPIES = 48  # of the demo's `simple`: a front's load of the repository takes a while


@pytest.fixture(scope="module")
def many_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fronts") / "models"
    config = (DEMO / "simple" / "config.pbtxt").read_text()
    model = (DEMO / "simple" / "1" / "model.onnx").read_bytes()
    for i in range(COPIES):
        name = f"simple_{i:02d}"
        (root / name / "1").mkdir(parents=True)
        (root / name / "1" / "model.onnx").write_bytes(model)
        (root / name / "config.pbtxt").write_text(
            re.sub(r'^name: "simple"', f'name: "{name}"', config, flags=re.M)
        )
    return root


def fronts_of(supervisor: int) -> list[int]:
    """The supervisor's front processes: its children that own a shared-memory arena."""
    return sorted(p for p in children_of(supervisor) if list(SHM.glob(f"microtune-{p}-*")))


def infer_on_fresh_connections(url: str, seconds: float) -> collections.Counter[str]:
    """One ModelInfer per new channel (so the kernel picks a listener each time), for
    `seconds`: the status codes seen, with each failure's message."""
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    codes: collections.Counter[str] = collections.Counter()
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        req = pb.ModelInferRequest(model_name=f"simple_{i % COPIES:02d}")
        for name in ("INPUT0", "INPUT1"):
            req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
            req.raw_input_contents.append(a.tobytes())
        with grpc.insecure_channel(url) as ch:
            try:
                resp = service_pb2_grpc.GRPCInferenceServiceStub(ch).ModelInfer(req, timeout=10)
                out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
                codes["OK" if (out == a.ravel() * 2).all() else "WRONG"] += 1
            except grpc.RpcError as exc:
                codes[f"{exc.code().name}: {exc.details()}"] += 1
        i += 1
    return codes


def test_a_front_serves_only_once_loaded(many_models: Path, tmp_path: Path) -> None:
    s = Server(many_models, tmp_path, extra_args=("--frontends", "2"))
    every_front: set[int] = set()
    try:
        first = infer_on_fresh_connections(s.url, 1.5)
        assert set(first) == {"OK"}, dict(first)

        deadline = time.monotonic() + 60
        while len(fronts := fronts_of(s.pid)) < 2:
            assert time.monotonic() < deadline, f"two fronts never came up:\n{s.log()[-4000:]}"
            time.sleep(0.05)
        every_front.update(fronts)
        victim, survivor = fronts
        victim_arenas = list(SHM.glob(f"microtune-{victim}-*"))
        ready_lines = s.log().count("microtune ready")

        os.kill(victim, signal.SIGKILL)
        while pid_alive(victim):  # its listening socket is closed once it is gone
            assert time.monotonic() < deadline
            time.sleep(0.01)
        during = collections.Counter[str]()
        while s.log().count("microtune ready") <= ready_lines:  # the replacement is loading
            assert time.monotonic() < deadline, f"no replacement front:\n{s.log()[-4000:]}"
            during.update(infer_on_fresh_connections(s.url, 0.2))
        during.update(infer_on_fresh_connections(s.url, 1.0))  # and once it serves
        assert set(during) == {"OK"}, dict(during)
        assert during["OK"] > 20, dict(during)

        fronts = fronts_of(s.pid)
        every_front.update(fronts)
        assert survivor in fronts and victim not in fronts and len(fronts) == 2, fronts
        assert re.search(r"front \d died \(exit code -9\); restarting", s.log()), s.log()[-3000:]
        assert not [p for p in victim_arenas if p.exists()], victim_arenas
    finally:
        s.stop()
    left = [p.name for f in every_front for p in SHM.glob(f"microtune-{f}-*")]
    assert not left, left
    assert not [f for f in every_front if pid_alive(f)]
