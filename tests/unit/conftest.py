"""Fixtures shared by the unit tests that run a real worker on a thread."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.settings import WorkerSettings
from runtime.worker import Worker
from tests.unit.worker_thread import serving_worker


@pytest.fixture(params=["graphs", "batcher"])
def worker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Worker]:
    """A CPU worker on each batching path: versions served from a graph set (`cpu_graphs`: the
    GPU worker's path on the CPU EP), or a plain session's batcher. A module that needs
    another worker defines its own `worker`."""
    graphs = request.param == "graphs"
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", cpu_graphs=graphs)
    with serving_worker(settings) as w:
        yield w
