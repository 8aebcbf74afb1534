"""`--model-control-mode poll` follows a model file written over in place.

A version directory keeps its number while its model.onnx is replaced (a retrained model
copied over the old one): the poll sees the file change and reloads that version, hot, while
requests keep flowing; none fails and the answers move to the new model. A model file that
does not parse, written over a serving one, leaves the old instance serving and is tried once,
not at every poll.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from harness import IR_VERSION, OPSET, running_server
from onnx import TensorProto, helper

CONFIG = """name: "plus"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [ { name: "X" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""


def plus_model(c: float) -> bytes:
    """Y = X + c."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["X", "C"], ["Y"])],
        "plus",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor("C", TensorProto.FLOAT, [4], [c] * 4)],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model.SerializeToString()


ARGS = ("--model-control-mode", "poll", "--repository-poll-s", "0.3")
X = np.arange(8, dtype=np.float32).reshape(2, 4)


def plus_repository(root: Path) -> Path:
    """A repository of `plus` version 1 (Y = X + 1) under `root`; returns its model file."""
    model_file = root / "plus" / "1" / "model.onnx"
    model_file.parent.mkdir(parents=True)
    model_file.write_bytes(plus_model(1.0))
    (root / "plus" / "config.pbtxt").write_text(CONFIG)
    return model_file


def added(c: grpcclient.InferenceServerClient) -> float:
    """What `plus` adds to X as served now (the same to every element)."""
    inp = grpcclient.InferInput("X", [2, 4], "FP32")
    inp.set_data_from_numpy(X)
    y = c.infer("plus", [inp]).as_numpy("Y")
    assert y is not None
    diffs = set((y - X).ravel().tolist())
    assert len(diffs) == 1, y
    return diffs.pop()


def replace(path: Path, content: bytes) -> None:
    """Write a new file and rename it over the old one, as a deployment tool does (rsync
    writes a hidden temporary file beside it, which the poll leaves out)."""
    tmp = path.with_name(".model.onnx.incoming")
    tmp.write_bytes(content)
    os.replace(tmp, path)


def test_a_model_file_written_over_is_reloaded_hot(tmp_path: Path) -> None:
    model_file = plus_repository(tmp_path / "models")
    with running_server(tmp_path / "models", tmp_path / "server", ARGS) as s:
        seen: list[float] = []  # Y - X of each answer, in order
        errors: list[str] = []
        stop = threading.Event()

        def traffic() -> None:
            with grpcclient.InferenceServerClient(s.url) as c:
                while not stop.is_set():
                    try:
                        seen.append(added(c))
                    except Exception as exc:  # every failure is reported
                        errors.append(str(exc))

        worker = threading.Thread(target=traffic)
        worker.start()
        try:
            time.sleep(0.5)
            replace(model_file, plus_model(2.0))
            deadline = time.monotonic() + 20
            while not seen or seen[-1] != 2.0:
                assert time.monotonic() < deadline and not errors, (errors, s.log()[-3000:])
                time.sleep(0.05)
            n = len(seen)
            replace(model_file, b"this is not an onnx model")
            while s.log().count("model plus version 1: ") < 1:  # the failed reload's line
                assert time.monotonic() < deadline, s.log()[-3000:]
                time.sleep(0.05)
            time.sleep(1.5)  # five polls more
        finally:
            stop.set()
            worker.join(30)
        assert errors == []
        assert seen[0] == 1.0 and set(seen) == {1.0, 2.0}
        assert seen.index(2.0) > 0 and 2.0 not in seen[: seen.index(2.0)]
        assert set(seen[seen.index(2.0) :]) == {2.0}  # never back to the old model
        assert len(seen) > n  # the broken file left version 1 (+2) serving
        log = s.log()
        assert log.count("loaded plus version 1 in") == 2, log[-3000:]
        assert log.count("model plus version 1: ") == 1, log[-3000:]  # tried once, not per poll


def test_a_slow_copy_in_place_is_loaded_once_whole(tmp_path: Path) -> None:
    """`cp` over the model file, slowly (a large model, a network file system): the polls during
    the copy leave the half-written file alone; the whole one is loaded once, after it."""
    model_file = plus_repository(tmp_path / "models")
    with running_server(tmp_path / "models", tmp_path / "server", ARGS) as s:
        new = plus_model(3.0)
        with model_file.open("wb") as f:  # truncates, then writes over 1.5 s: five polls
            for i in range(10):
                f.write(new[i * len(new) // 10 : (i + 1) * len(new) // 10])
                f.flush()
                time.sleep(0.15)
        deadline = time.monotonic() + 20
        with grpcclient.InferenceServerClient(s.url) as c:
            while added(c) != 3.0:
                assert time.monotonic() < deadline, s.log()[-3000:]
                time.sleep(0.05)
        log = s.log()
        assert "model plus version 1: " not in log, log[-3000:]  # no half-written file tried
        assert log.count("loaded plus version 1 in") == 2, log[-3000:]


def test_a_config_written_in_place_is_applied_once_whole(tmp_path: Path) -> None:
    """config.pbtxt rewritten in place by a slow writer (an editor, `cp`, `kubectl cp`): a poll
    read it as it was being written, and its first bytes (here none: truncated) parsed as a
    config of their own. The default policy (latest 1) unloaded version 1, and requests for
    it failed until the write ended. The polls now wait for the whole file, as for a model
    file, and apply it once."""
    root = tmp_path / "models"
    for v in (1, 2):
        (root / "plus" / str(v)).mkdir(parents=True)
        (root / "plus" / str(v) / "model.onnx").write_bytes(plus_model(float(v)))
    config = root / "plus" / "config.pbtxt"
    config.write_text(CONFIG + "version_policy: { all { } }\n")
    os.utime(config, (time.time() - 60, time.time() - 60))  # written long before the server
    with running_server(root, tmp_path / "server", ARGS) as s:
        errors: list[str] = []
        stop = threading.Event()

        def pinned_traffic() -> None:
            with grpcclient.InferenceServerClient(s.url) as c:
                inp = grpcclient.InferInput("X", [2, 4], "FP32")
                inp.set_data_from_numpy(X)
                while not stop.is_set():
                    try:
                        c.infer("plus", [inp], model_version="1")
                    except Exception as exc:  # every failure is reported
                        errors.append(str(exc))

        worker = threading.Thread(target=pinned_traffic)
        worker.start()
        try:
            with config.open("w") as f:  # truncates, then writes 0.6 s later: two polls
                f.flush()
                time.sleep(0.6)
                f.write(CONFIG.replace("max_batch_size: 8", "max_batch_size: 4"))
                f.write("version_policy: { all { } }\n")
            deadline = time.monotonic() + 20
            with grpcclient.InferenceServerClient(s.url) as c:
                while c.get_model_config("plus").config.max_batch_size != 4:
                    assert time.monotonic() < deadline, s.log()[-3000:]
                    time.sleep(0.05)
        finally:
            stop.set()
            worker.join(30)
        assert errors == [], errors[:3]
        log = s.log()
        assert "unloaded plus version" not in log, log[-3000:]
        assert log.count("loaded plus version 1 in") == 2, log[-3000:]  # start, then once
