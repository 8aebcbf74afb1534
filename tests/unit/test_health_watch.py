"""grpc.health.v1 Watch: every watcher of a service hears every change, whoever else comes and
goes. grpcio-health-checking's servicer shares one condition per service among its watchers and
drops it when any of them leaves, so the others heard nothing more (grpc/grpc#43403): gRPC's
client-side health checking watches, and went on sending to a server that was draining."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.rpc.health import HealthState

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_watcher_that_leaves_does_not_silence_the_others() -> None:
    async def scenario() -> list[int]:
        state = HealthState()
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(state.servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await state.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = health_pb2_grpc.HealthStub(ch)
                req = health_pb2.HealthCheckRequest(service="readiness")
                staying, leaving = stub.Watch(req), stub.Watch(req)
                seen = [(await staying.read()).status]
                assert (await leaving.read()).status == NOT_SERVING
                leaving.cancel()
                await asyncio.sleep(0.2)  # its handler has ended
                for ready in (True, False, True):
                    await state.set_ready(ready)
                    seen.append((await asyncio.wait_for(staying.read(), 5)).status)
                staying.cancel()
                return seen
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == [NOT_SERVING, SERVING, NOT_SERVING, SERVING]
