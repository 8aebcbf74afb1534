"""Observability fixtures (helpers in obs_support.py): the session's model repository, one
in-process server tracing into an in-memory exporter, and the Prometheus binaries."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from obs_support import INSTALL_PROMETHEUS, ROOT, InProcess, build_repository, in_process_app
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("obs-repo") / "models")


@pytest.fixture(scope="session")
def traced(model_repository: Path) -> Iterator[InProcess]:
    """One in-process server for the session, tracing every request into an in-memory exporter."""
    with in_process_app(model_repository, InMemorySpanExporter(), tracing="console") as srv:
        yield srv


@pytest.fixture(scope="session")
def prometheus_bin() -> Path:
    """The directory holding `prometheus` and `promtool` (scripts/install_prometheus.sh: the
    Debian package unpacked into .cache/prometheus, no root service). Skips, saying why, only
    when they cannot be installed here."""
    if shutil.which("dpkg-deb") is None and not (ROOT / ".cache/prometheus/bin/promtool").exists():
        pytest.skip("prometheus: dpkg-deb not found (scripts/install_prometheus.sh needs Debian)")
    try:
        proc = subprocess.run(
            [str(INSTALL_PROMETHEUS)], capture_output=True, text=True, timeout=300, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("prometheus: scripts/install_prometheus.sh timed out (no network?)")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"prometheus could not be installed by scripts/install_prometheus.sh: {tail}")
    bin_dir = Path(proc.stdout.strip().splitlines()[-1])
    for tool in ("prometheus", "promtool"):
        if not (bin_dir / tool).is_file():
            pytest.skip(f"prometheus: {bin_dir / tool} missing after install")
    return bin_dir
