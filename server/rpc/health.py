"""grpc.health.v1 wiring. Services:

- "liveness": SERVING while the process and its event loop run.
- "" (overall), "readiness", "startup", "inference.GRPCInferenceService": SERVING only when the
  worker is up and no model is still loading (what ServerReady says). Kubernetes probes use these.
An unknown service name answers NOT_FOUND (grpcio-health-checking's behaviour).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

__all__ = ["READINESS_SERVICES", "HealthState"]

READINESS_SERVICES = ("", "readiness", "startup", "inference.GRPCInferenceService")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Servicer(health_aio.HealthServicer):
    """grpcio-health-checking's servicer (pinned, <1.82), with a Watch that leaves the other
    watchers of its service watching. The library's watchers share one condition per service,
    and each deletes it as it ends: the others were never notified again (grpc/grpc#43403), so
    a client's gRPC health checking (which watches) kept sending to a draining server once any
    other watcher had come and gone. Here the condition goes with the service's last watcher."""

    def __init__(self) -> None:
        super().__init__()
        self._watching: Counter[str] = Counter()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        service = request.service
        self._watching[service] += 1
        condition = self._server_watchers[service]  # (a defaultdict: made for the first)
        try:
            async with condition:
                last = None
                while True:
                    status = self._server_status.get(
                        service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
                    )
                    if status != last:  # (only the latest of quick changes: as the library)
                        await context.write(health_pb2.HealthCheckResponse(status=status))
                    last = status
                    await condition.wait()
        finally:
            self._watching[service] -= 1
            if not self._watching[service]:
                del self._watching[service]
                self._server_watchers.pop(service, None)


class HealthState:
    def __init__(self) -> None:
        self.servicer = _Servicer()
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
