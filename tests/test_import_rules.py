"""The front never imports onnxruntime or CUDA (cupy): models run only in the runtime worker.

Each check runs in a fresh interpreter, so that what this test process already imported does not
count. The static rules are in .importlinter (checked here with `lint-imports` when installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = (
    "onnxruntime",
    "cupy",
    "runtime.engine",
    "runtime.worker",
    "runtime.worker_connection",
)

PROBE = """
import importlib, json, pkgutil, sys
names = {names!r}
for pkg in {walk!r}:
    mod = importlib.import_module(pkg)
    names += [m.name for m in pkgutil.walk_packages(mod.__path__, pkg + ".")
              if not m.name.endswith("__main__")]
for name in names:
    importlib.import_module(name)
forbidden = {forbidden!r}
loaded = sorted(m for m in sys.modules if any(m == f or m.startswith(f + ".") for f in forbidden))
print(json.dumps({{"imported": names, "loaded": loaded}}))
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _probe(names: list[str], walk: list[str] | None = None) -> dict[str, list[str]]:
    proc = _python(PROBE.format(names=list(names), walk=list(walk or []), forbidden=FORBIDDEN))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    ("names", "walk"),
    [
        (["server.app", "server.cli", "server.handler"], []),
        ([], ["server"]),  # every module of the front
        (["runtime.client", "runtime.process", "runtime.settings"], ["runtime.ipc"]),
    ],
    ids=["entry-points", "all-of-server", "front-side-runtime"],
)
def test_front_never_imports_models(names: list[str], walk: list[str]) -> None:
    result = _probe(names, walk)
    assert result["imported"]
    assert result["loaded"] == [], f"imported {result['loaded']}"


def test_the_probe_sees_onnxruntime_when_it_is_imported() -> None:
    """Control: the worker does import onnxruntime, and the probe notices."""
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed")
    result = _probe(["runtime.worker"])
    assert "onnxruntime" in result["loaded"]


def test_starting_the_worker_does_not_import_it_into_the_front() -> None:
    """WorkerProcess.start hands `spawn` a target that imports runtime.worker in the child only."""
    code = textwrap.dedent(
        """
        import json, pickle, sys
        import multiprocessing.context as ctx
        targets = []
        ctx.SpawnProcess.start = lambda self: targets.append(self._target)  # no real process
        from runtime.process import WorkerProcess
        from runtime.settings import WorkerSettings
        WorkerProcess(WorkerSettings(socket_path="/nonexistent/dir/w.sock")).start()
        (target,) = targets
        pickle.dumps(target)  # spawn pickles the target by reference
        loaded = sorted(m for m in sys.modules
                        if m.split(".")[0] in ("onnxruntime", "cupy")
                        or m.startswith(("runtime.engine", "runtime.worker")))
        print(json.dumps({"target": f"{target.__module__}.{target.__qualname__}",
                          "loaded": loaded}))
        """
    )
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["loaded"] == []
    assert result["target"].startswith("runtime.process.")


def _lint_imports() -> str | None:
    exe = Path(sys.executable).parent / "lint-imports"
    if exe.exists():
        return str(exe)
    return shutil.which("lint-imports")


def test_import_contracts() -> None:
    exe = _lint_imports()
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    proc = subprocess.run(
        [exe, "--no-cache", "--config", str(ROOT / ".importlinter")],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout
