"""grpc.health.v1 wiring. Services:

- "liveness": SERVING while the process and its event loop run.
- "" (overall), "readiness", "startup", "inference.GRPCInferenceService": SERVING only when the
  worker is up and no model is still loading (what ServerReady says). Kubernetes probes use these.
An unknown service name answers NOT_FOUND (grpcio-health-checking's behaviour).
"""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["READINESS_SERVICES", "HealthState"]

READINESS_SERVICES = ("", "readiness", "startup", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthState:
    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self._ready: bool | None = None

    async def start(self) -> None:
        await self.servicer.set("liveness", SERVING)
        await self.set_ready(False)

    async def set_ready(self, ready: bool) -> None:
        if ready == self._ready:
            return
        self._ready = ready
        for name in READINESS_SERVICES:
            await self.servicer.set(name, SERVING if ready else NOT_SERVING)

    async def shutdown(self) -> None:
        await self.servicer.enter_graceful_shutdown()
