"""The Makefile keeps one onnxruntime in .venv (README: "never both in one environment").

onnxruntime and onnxruntime-gpu install the same `onnxruntime` module; pip lets both in, and
the second silently wins. `make serve EXTRAS=gpu,test` on a .venv set up for the CPU installed
onnxruntime-gpu beside onnxruntime. Here a real venv holds stand-ins for both distributions
(dist-info records written by hand, so that nothing is downloaded) and `make one-onnxruntime`,
the step the install runs first, is run for real.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def _make(workdir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-f", str(ROOT / "Makefile"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _site_packages(venv: Path) -> Path:
    (site,) = venv.glob("lib/python3.*/site-packages")
    return site


def _fake_install(venv: Path, dist: str) -> None:
    """`dist` as pip sees an installed distribution, with the module both variants share."""
    site = _site_packages(venv)
    module = site / "onnxruntime"
    module.mkdir(exist_ok=True)
    (module / "__init__.py").write_text(f"variant = {dist!r}\n")
    info = site / f"{dist.replace('-', '_')}-1.20.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.20.0\n")
    (info / "INSTALLER").write_text("pip\n")
    files = ["onnxruntime/__init__.py", *(f"{info.name}/{n}" for n in ("METADATA", "INSTALLER"))]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in [*files, f"{info.name}/RECORD"]))


def _installed(venv: Path, dist: str) -> bool:
    probe = [str(venv / "bin" / "python"), "-m", "pip", "show", "-q", dist]
    return subprocess.run(probe, capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("make")
    subprocess.run([sys.executable, "-m", "venv", str(d / ".venv")], check=True, timeout=120)
    return d


def test_switching_to_gpu_removes_the_cpu_onnxruntime_first(workdir: Path) -> None:
    venv = workdir / ".venv"
    _fake_install(venv, "onnxruntime")
    _fake_install(venv, "onnxruntime-gpu")  # (what the old Makefile left: both)
    proc = _make(workdir, "one-onnxruntime", "EXTRAS=gpu,test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "EXTRAS=gpu,test wants onnxruntime-gpu, not onnxruntime: uninstalling both" in (
        proc.stdout
    )
    # Both: the files they share are gone, and the install then brings onnxruntime-gpu whole.
    assert not _installed(venv, "onnxruntime")
    assert not _installed(venv, "onnxruntime-gpu")
    assert not (_site_packages(venv) / "onnxruntime").exists()


def test_the_variant_asked_for_is_left_alone(workdir: Path) -> None:
    venv = workdir / ".venv"
    _fake_install(venv, "onnxruntime")
    for extras in ("cpu,test", "cpu", "test"):  # ("test": neither variant asked for)
        proc = _make(workdir, "one-onnxruntime", f"EXTRAS={extras}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout == ""
        assert _installed(venv, "onnxruntime")
    proc = _make(workdir, "one-onnxruntime", "EXTRAS=gpu")
    assert not _installed(venv, "onnxruntime")  # and back the other way


def test_cpu_and_gpu_together_are_refused(workdir: Path) -> None:
    proc = _make(workdir, "one-onnxruntime", "EXTRAS=cpu,gpu,test")
    assert proc.returncode != 0
    assert "EXTRAS=cpu,gpu,test: cpu and gpu exclude each other (one onnxruntime)" in proc.stdout


def test_the_install_runs_it_before_pip_install(tmp_path: Path) -> None:
    """`make -n` on a .venv set up for the CPU (the stamp of other EXTRAS)."""
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").symlink_to(sys.executable)
    (tmp_path / ".venv" / ".installed-cpu-test").touch()
    proc = _make(tmp_path, "-n", "setup", "EXTRAS=gpu,test")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    uninstall = next(i for i, x in enumerate(lines) if "pip uninstall -q -y onnxruntime " in x)
    install = next(i for i, x in enumerate(lines) if 'pip install -q -e ".[gpu,test]"' in x)
    assert uninstall < install
