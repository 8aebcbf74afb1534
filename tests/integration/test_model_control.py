"""Model control in explicit mode (issue 3): the golden self-test gates a version before it is
routable, and tritonclient's own `simple_grpc_model_control.py` passes unchanged against the
demo repository, and so do its inference examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from harness import DEMO, ROOT, Server, running_server
from routing_support import copy_dense, dense_input, write_golden
from tritonclient.utils import InferenceServerException

EXAMPLES = ROOT / ".cache" / "triton-examples"
GOLDEN_FAILED = re.compile(
    r"golden self-test failed: output 'OUTPUT0' differs by [0-9.e+-]+ \(atol 1e-05\)"
)


def reference_output(model_file: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    return sess.run(["OUTPUT0"], {"INPUT0": x})[0]


def index(c: grpcclient.InferenceServerClient, name: str) -> dict[str, tuple[str, str]]:
    return {
        m.version: (m.state, m.reason)
        for m in c.get_model_repository_index().models
        if m.name == name
    }


def served(c: grpcclient.InferenceServerClient, version: str = "") -> str:
    inp = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
    inp.set_data_from_numpy(dense_input(3))
    return c.infer("dense", [inp], model_version=version).get_response().model_version


@pytest.fixture(scope="module")
def golden_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    repo = tmp_path_factory.mktemp("golden-repo")
    model = copy_dense(repo, versions={1: 1})
    x = dense_input(11)
    write_golden(model, 1, x, reference_output(model / "1" / "model.onnx", x))
    args = ("--model-control-mode", "explicit", "--load-model", "dense")
    with running_server(repo, tmp_path_factory.mktemp("golden-server"), args) as s:
        yield s, model


def test_golden_self_test_gates_a_version(golden_server: tuple[Server, Path]) -> None:
    server, model = golden_server
    c = grpcclient.InferenceServerClient(server.url)
    try:
        # Version 1 passed its golden at start-up.
        assert index(c, "dense") == {"1": ("READY", "")} and served(c) == "1"
        # Version 2 with a golden answer that is not its own (version 1's): not routable, with
        # the reason; version 1 keeps serving.
        shutil.copytree(DEMO / "dense" / "2", model / "2")
        x = dense_input(12)
        wrong = reference_output(model / "1" / "model.onnx", x)
        write_golden(model, 2, x, wrong)
        with pytest.raises(InferenceServerException) as ei:
            c.load_model("dense")
        assert ei.value.status() == "StatusCode.INTERNAL"
        msg = ei.value.message() or ""
        assert msg.startswith("failed to load 'dense': version 2: golden self-test failed"), msg
        assert GOLDEN_FAILED.search(msg), msg
        state, reason = index(c, "dense")["2"]
        assert state == "UNAVAILABLE" and GOLDEN_FAILED.fullmatch(reason), reason
        assert index(c, "dense")["1"] == ("READY", "")
        assert not c.is_model_ready("dense", "2")
        assert served(c) == "1"
        with pytest.raises(InferenceServerException) as ei:
            served(c, "2")
        assert ei.value.status() == "StatusCode.UNAVAILABLE"
        assert ei.value.message() == f"model 'dense' version 2 is unavailable: {reason}"

        # Its own golden answer: it loads, and takes the traffic (the highest ready version).
        write_golden(model, 2, x, reference_output(model / "2" / "model.onnx", x))
        c.load_model("dense")
        assert index(c, "dense") == {"1": ("READY", ""), "2": ("READY", "")}
        assert served(c) == "2"

        # A reload of a ready version that now fails its golden keeps the old instance serving.
        write_golden(model, 1, x, wrong + 1.0)
        with pytest.raises(InferenceServerException) as ei:
            c.load_model("dense")
        assert "version 1: golden self-test failed" in (ei.value.message() or "")
        assert index(c, "dense")["1"][0] == "READY" and served(c, "1") == "1"
    finally:
        c.close()


def run_examples(url: str, *names: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "run_triton_examples.py"),
            "--examples-dir",
            str(EXAMPLES),
            "--url",
            url,
            "--show-output",
            "all",
            *names,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


# Every example of the default set but model control (it needs explicit mode): inference over
# raw and typed contents, strings, compression, deadlines, keepalive, system shared memory.
# Those that cannot run here (a CUDA client, tritonclient.http) report SKIP, not failure.
INFER_EXAMPLES = (
    "simple_grpc_health_metadata",
    "simple_grpc_infer_client",
    "simple_grpc_async_infer_client",
    "simple_grpc_aio_infer_client",
    "simple_grpc_string_infer_client",
    "grpc_explicit_int_content_client",
    "grpc_explicit_int8_content_client",
    "grpc_explicit_byte_content_client",
    "simple_grpc_custom_args_client",
    "simple_grpc_keepalive_client",
    "simple_grpc_shm_client",
    "simple_grpc_shm_string_client",
    "simple_grpc_infer_client[gzip]",
    "simple_grpc_infer_client[deflate]",
    "simple_grpc_aio_infer_client[gzip]",
    "simple_grpc_infer_client[timeout]",
)


@pytest.mark.skipif(
    not (EXAMPLES / "simple_grpc_shm_client.py").is_file(),
    reason=f"tritonclient's example programs are not in {EXAMPLES} (CI has no network to fetch "
    "them; see scripts/run_triton_examples.py)",
)
def test_tritonclient_inference_examples(tmp_path: Path) -> None:
    """tritonclient's gRPC example programs, unchanged, against the demo repository with client
    shared memory allowed: each must print its own PASS line."""
    with running_server(DEMO, tmp_path, ("--allow-client-shm", "true")) as s:
        proc = run_examples(s.url, *INFER_EXAMPLES)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out + "\n--- server log ---\n" + s.log()[-4000:]
        assert f"{len(INFER_EXAMPLES)} passed, 0 failed" in out, out


@pytest.mark.skipif(
    not (EXAMPLES / "simple_grpc_model_control.py").is_file(),
    reason=f"tritonclient's example programs are not in {EXAMPLES} (CI has no network to fetch "
    "them; see scripts/run_triton_examples.py)",
)
def test_tritonclient_model_control_example(tmp_path: Path) -> None:
    """simple_grpc_model_control.py, unchanged, against the demo repository (8 versions in the
    index: it checks the count) served with --model-control-mode explicit --load-model '*'."""
    args = ("--model-control-mode", "explicit", "--load-model", "*")
    with running_server(DEMO, tmp_path, args) as s:
        proc = run_examples(s.url, "simple_grpc_model_control")
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out + "\n--- server log ---\n" + s.log()[-4000:]
        assert "PASS: model control" in out, out


def test_a_specific_version_without_its_directory_is_logged(tmp_path: Path) -> None:
    """docs/routing.md's "load version 3 beside 2" on the demo repository, which has no version
    3: the load answers OK and serves 2, as in Triton, which logs the missing version at ERROR;
    it was skipped without a word."""
    repo = tmp_path / "models"
    copy_dense(repo)
    args = ("--model-control-mode", "explicit", "--load-model", "dense", "--log-format", "text")
    with running_server(repo, tmp_path / "server", args) as s:
        c = grpcclient.InferenceServerClient(s.url)
        try:
            cfg = {"max_batch_size": 8, "version_policy": {"specific": {"versions": [2, 3]}}}
            c.load_model("dense", config=json.dumps(cfg))
            assert index(c, "dense") == {"1": ("UNAVAILABLE", "unloaded"), "2": ("READY", "")}
        finally:
            c.close()
        missing = [line for line in s.log().splitlines() if "version directory" in line]
    assert len(missing) == 1, missing
    assert missing[0].endswith(
        f"ERROR server.lifecycle[{s.pid}] version 3 is specified for model 'dense', but the "
        "version directory is not present"
    ), missing
