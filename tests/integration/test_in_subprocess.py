"""Runs tests/integration in a child pytest process. Collected only when the session also
collects tests outside this directory (see conftest.py: tritonclient and server._proto cannot
share a process); a standalone `pytest tests/integration` skips this file and runs the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
LIMIT_S = 540


@pytest.mark.timeout(LIMIT_S + 30)
def test_integration_suite(pytestconfig: pytest.Config) -> None:
    args = [sys.executable, "-m", "pytest", str(HERE), "-q", "-p", "no:cacheprovider"]
    markexpr = pytestconfig.getoption("markexpr", default="")
    if markexpr:
        args += ["-m", markexpr]
    if pytestconfig.getoption("exitfirst", default=False):
        args.append("-x")
    try:
        proc = subprocess.run(
            args, cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S, check=False
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"tests/integration took longer than {LIMIT_S}s:\n{exc.stdout or ''}")
    summary = proc.stdout.strip().splitlines()[-1:] or ["(no output)"]
    # 5: every test deselected (e.g. -m gpu); nothing ran, nothing failed.
    if proc.returncode not in (0, 5):
        pytest.fail(
            f"tests/integration failed (exit {proc.returncode}): {summary[0]}\n"
            f"{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}",
            pytrace=False,
        )
    print(f"tests/integration: {summary[0]}")
