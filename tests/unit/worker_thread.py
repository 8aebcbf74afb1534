"""A real runtime worker serving its Unix socket on a thread of the test process, for tests
that drive it through real fronts' RuntimeClients (no server, no spawn)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.ipc.protocol import UnloadModel
from runtime.settings import WorkerSettings
from runtime.worker import Worker


@contextmanager
def serving_worker(settings: WorkerSettings, listen_s: float = 30) -> Iterator[Worker]:
    """The worker, once its socket exists; on exit stopped, its channels closed and what is
    still loaded unloaded (serving threads ended, sessions and captured graphs freed: a GPU
    worker's must not outlive its test, beside the next tests' captures)."""
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
        for name, version in {*w.graph_models, *w.models}:
            w._unload(UnloadModel(0, name, version))  # whoever still holds it
        w.close_lanes()
