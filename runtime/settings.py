"""Settings of the runtime worker process: a frozen struct handed over by the front at spawn
(the worker reads no environment of its own)."""

from __future__ import annotations

import msgspec

__all__ = ["WorkerSettings"]


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True):
    socket_path: str
    """Unix socket the worker listens on; front processes connect to it."""
    device: str = "auto"
    """"auto" (CUDA when onnxruntime-gpu and a GPU are present, else CPU), "cpu" or "cuda:N"."""
    exec_threads: int = 2
    """Threads of a plain version's lane (runtime.lanes) when its config has no instance_group:
    calls of the version that run at once (onnxruntime releases the GIL while it computes)."""
    log_level: str = "INFO"
    cpu_graphs: bool = False
    """Serve batched models through the CUDA-graph executor on the CPU EP (graph ids accepted
    and ignored): runs the GPU code path in CPU-only tests. No use in production."""
    fake_cuda_ipc: bool = False
    """Accept CUDA shared-memory registrations on a CPU worker, with a POSIX shm object standing
    in for device memory (runtime.engine.regions.fake_opener): runs the CUDA shared-memory
    path in CPU-only tests. No use in production."""
    parent_pid: int = 0
    """Exit when this process disappears (so a SIGKILLed front leaves no orphan worker)."""

    def encode(self) -> bytes:
        return msgspec.json.encode(self)

    @staticmethod
    def decode(data: bytes) -> WorkerSettings:
        return msgspec.json.decode(data, type=WorkerSettings)
