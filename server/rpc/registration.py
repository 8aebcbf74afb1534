"""What a gRPC registration adds, recorded instead of served.

A generated `add_*_to_server(servicer, server)` (or grpc-reflection's `enable_server_reflection`)
registers a service's method table and a generic handler built from it. `Registrations` stands
in for the server so that the caller can change the table before the real server gets it:
server.rpc.servicer swaps ModelInfer's handler for one that takes serialized bytes, and
server.telemetry.tracing wraps each method once with the OpenTelemetry instrumentation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["Registrations"]


class Registrations(grpc.aio.Server):
    """Records what registrations add. A grpc.aio.Server because grpc-reflection picks its
    asyncio servicer by `isinstance(server, grpc.aio.Server)`; serving methods raise."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        self.generic: list[grpc.GenericRpcHandler] = []

    def add_generic_rpc_handlers(self, generic_rpc_handlers: Sequence[Any]) -> None:
        self.generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str, method_handlers: Any) -> None:
        self.tables[service_name] = dict(method_handlers)

    def untabled(self) -> list[grpc.GenericRpcHandler]:
        """Generic handlers of services that came without a method table."""
        return [
            g for g in self.generic
            if getattr(g, "service_name", lambda: None)() not in self.tables
        ]  # fmt: skip

    def add_insecure_port(self, address: str) -> int:
        raise NotImplementedError

    def add_secure_port(self, address: str, server_credentials: Any) -> int:
        raise NotImplementedError

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self, grace: float | None) -> None:
        raise NotImplementedError

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        raise NotImplementedError
