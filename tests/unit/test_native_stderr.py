"""runtime.native_stderr: native lines on fd 2 become log records, and sessions log nothing raw.

The routing test runs in a subprocess: it takes over file descriptor 2, which pytest's capture
owns in this process.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from runtime.engine.session import ORT_LOG_SEVERITY, make_session
from runtime.native_stderr import ORT_LOGGER, OTHER_LOGGER, parse_line
from server.settings import DEMO_REPOSITORY

ROOT = Path(__file__).resolve().parents[2]
ORT_ERROR = (
    b"\x1b[1;31m2026-11-22 01:58:43.741488579 [E:onnxruntime:, sequential_executor.cc:677 "
    b"ExecuteKernel] Non-zero status code returned while running Cast node.\x1b[m\n"
)


def test_parse_line_reads_onnxruntime_severity_and_strips_colour() -> None:
    name, level, msg, where = parse_line(ORT_ERROR) or ("", 0, "", "")
    assert (name, level) == (ORT_LOGGER, logging.ERROR)
    assert msg == "Non-zero status code returned while running Cast node."
    assert where == "sequential_executor.cc:677 ExecuteKernel"
    warn = b"2026-01-05 10:12:03.441 [W:onnxruntime:Default, provider_bridge_ort.cc:12 F] no GPU\n"
    where = "provider_bridge_ort.cc:12 F"
    assert parse_line(warn) == (ORT_LOGGER, logging.WARNING, "no GPU", where)
    assert parse_line(b"libcudnn: something\n") == (
        OTHER_LOGGER,
        logging.WARNING,
        "libcudnn: something",
        "",
    )
    assert parse_line(b"\x1b[m\n") is None
    assert parse_line(b"\xff\n") == (OTHER_LOGGER, logging.WARNING, "\\xff", "")


ROUTED = """
import logging, os, sys
import numpy as np, onnxruntime as ort
from runtime.native_stderr import route_native_stderr
from server.telemetry.logs import setup_logging

setup_logging("INFO", "json")
native = route_native_stderr()
os.write(2, {ort_error!r})
os.write(2, b"plain native text\\n")
logging.getLogger("microtune.test").warning("from python")
print("via sys.stderr", file=sys.stderr)
# A real onnxruntime error line (a session that logs ERROR, as sessions did before): the native
# logger writes it to fd 2, now the pipe.
so = ort.SessionOptions()
so.log_severity_level = 3
sess = ort.InferenceSession({model!r}, so, providers=["CPUExecutionProvider"])
x = np.array([["abc"] * 16], dtype=object)
try:
    sess.run(None, {{"INPUT0": x, "INPUT1": x}})
except Exception:
    pass
native.close()
"""


def test_native_lines_become_json_records(tmp_path: Path) -> None:
    model = str(DEMO_REPOSITORY / "simple_string" / "1" / "model.onnx")
    code = textwrap.dedent(ROUTED).format(ort_error=ORT_ERROR, model=model)
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    lines = [ln for ln in proc.stderr.decode().splitlines() if ln.strip()]
    non_json = [ln for ln in lines if not ln.startswith("{")]
    assert non_json == ["via sys.stderr"]  # Python's own stderr still reaches the real one
    records = [json.loads(ln) for ln in lines if ln.startswith("{")]
    by_msg = {r["msg"]: r for r in records}
    ort_line = by_msg["Non-zero status code returned while running Cast node."]
    assert ort_line["logger"] == "onnxruntime" and ort_line["level"] == "ERROR"
    assert ort_line["native_source"] == "sequential_executor.cc:677 ExecuteKernel"
    plain = by_msg["plain native text"]
    assert plain["logger"] == "microtune.worker.stderr" and plain["level"] == "WARNING"
    assert by_msg["from python"]["logger"] == "microtune.test"
    real = [r for r in records if "Cast node" in r["msg"] and r is not ort_line]
    assert len(real) == 1 and real[0]["logger"] == "onnxruntime", records


def test_sessions_log_nothing_below_fatal(capfd: pytest.CaptureFixture[str]) -> None:
    sess = make_session(str(DEMO_REPOSITORY / "simple_string" / "1" / "model.onnx"), "cpu", 1)
    assert sess.get_session_options().log_severity_level == ORT_LOG_SEVERITY
    x = np.array([["abc"] * 16], dtype=object)
    try:
        sess.run(None, {"INPUT0": x, "INPUT1": x})
    except Exception as exc:
        assert "Cast" in str(exc)  # the error still reaches us, as an exception
    else:
        raise AssertionError("the run should have failed")
    assert "onnxruntime" not in capfd.readouterr().err  # and nothing raw on fd 2
