"""Telemetry fixtures: a Metrics with two declared models, and promtool from the Debian package.

promtool comes from `scripts/install_prometheus.sh` (apt-get download + dpkg-deb -x into the
git-ignored .cache/prometheus/, no root service); tests that need it skip, saying why, when it
cannot be installed (no apt, no network, not Debian).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.telemetry.metrics import Metrics
from server.types import ModelState

REPO = Path(__file__).resolve().parents[3]
INSTALL = REPO / "scripts" / "install_prometheus.sh"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def metrics(clock: FakeClock) -> Metrics:
    m = Metrics(clock=clock)
    m.set_model_state("dense", 1, ModelState.READY)
    m.set_model_state("dense", 2, ModelState.LOADING)
    m.set_model_state("simple", 1, ModelState.READY)
    return m


@pytest.fixture(scope="session")
def promtool() -> Path:
    if shutil.which("dpkg-deb") is None:
        pytest.skip("promtool: dpkg-deb not found (scripts/install_prometheus.sh needs Debian)")
    try:
        proc = subprocess.run(
            [str(INSTALL)], capture_output=True, text=True, timeout=180, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("promtool: scripts/install_prometheus.sh timed out (no network?)")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"promtool could not be installed by scripts/install_prometheus.sh: {tail}")
    tool = Path(proc.stdout.strip().splitlines()[-1]) / "promtool"
    if not tool.is_file():
        pytest.skip(f"promtool: {tool} missing after install")
    return tool


@pytest.fixture
def check_metrics(promtool: Path) -> Callable[[bytes], None]:
    """Returns an assertion: `promtool check metrics` finds no problem in an exposition."""

    def check(exposition: bytes) -> None:
        proc = subprocess.run(
            [str(promtool), "check", "metrics"], input=exposition, capture_output=True, timeout=30
        )
        report = (proc.stdout + proc.stderr).decode()
        assert proc.returncode == 0 and not report.strip(), report

    return check


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_samples(exposition: bytes) -> Samples:
    """{(sample name, labels): value} as a scraper reads them from a text exposition."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(exposition.decode())
        for s in fam.samples
    }


@pytest.fixture
def scrape() -> Callable[[CollectorRegistry], Samples]:
    return lambda registry: parse_samples(generate_latest(registry))


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.fixture
def k() -> Callable[..., tuple[str, frozenset[tuple[str, str]]]]:
    """k(name, **labels): the key of one sample in `scrape`'s result."""
    return key
