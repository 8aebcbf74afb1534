"""A real runtime worker serving its Unix socket on a thread of the test process, for tests
that drive it through real fronts' RuntimeClients (no server, no spawn)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.settings import WorkerSettings
from runtime.worker import Worker


@contextmanager
def serving_worker(settings: WorkerSettings, listen_s: float = 30) -> Iterator[Worker]:
    """The worker, once its socket exists; stopped (and its channels closed) on exit."""
    sock = Path(settings.socket_path)
    w = Worker(settings)
    server = threading.Thread(target=w.serve_forever, daemon=True)
    server.start()
    deadline = time.monotonic() + listen_s
    while not sock.exists():
        assert time.monotonic() < deadline, "the worker never listened"
        time.sleep(0.01)
    try:
        yield w
    finally:
        w.stopping.set()
        server.join(10)
        w.pool.shutdown()
