"""What a gRPC registration adds, recorded instead of served.

A generated `add_*_to_server(servicer, server)` (or grpc-reflection's `enable_server_reflection`)
registers a service's method table and a generic handler built from it. `Registrations` stands
in for the server so that the caller can change the table before the real server gets it:
server.rpc.servicer swaps ModelInfer's handler for one that takes serialized bytes, and
server.telemetry.tracing wraps each method once with the OpenTelemetry instrumentation.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import grpc

__all__ = ["Registrations", "decoding_in_handler"]


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


def decoding_in_handler(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler`, taking its request serialized and decoding it itself: a request that does not
    parse answers INVALID_ARGUMENT. (Left to grpc, its deserializer's failure answers UNKNOWN
    with the exception's text and logs a traceback; on a stream it ends the stream.) A handler
    that already takes bytes (ModelInfer, ModelStreamInfer) is returned as it is."""
    decode = handler.request_deserializer
    if decode is None:
        return handler
    what = _message_name(decode)

    async def request(raw: bytes, context: grpc.aio.ServicerContext) -> Any:
        try:
            return decode(raw)
        except Exception:  # whatever fails to parse is the client's doing
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid {what} message"
            )

    async def requests(raws: Any, context: grpc.aio.ServicerContext) -> Any:
        async for raw in raws:
            yield await request(raw, context)

    inner: Any
    arg: Any
    if handler.request_streaming:
        inner = handler.stream_stream or handler.stream_unary

        async def arg(raws: Any, context: grpc.aio.ServicerContext) -> Any:
            return requests(raws, context)
    else:
        inner = handler.unary_stream or handler.unary_unary
        arg = request

    behavior: Any
    if not (inspect.iscoroutinefunction(inner) or inspect.isasyncgenfunction(inner)):
        return handler  # (a synchronous handler: grpc runs it on a thread; none here)
    if inspect.isasyncgenfunction(inner):

        async def behavior(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            async for response in inner(await arg(raw, context), context):
                yield response
    else:  # a coroutine: one response, or a stream written with context.write()

        async def behavior(raw: Any, context: grpc.aio.ServicerContext) -> Any:
            return await inner(await arg(raw, context), context)

    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]
    return handler._replace(request_deserializer=None, **{kind: behavior})


def _message_name(decode: Any) -> str:
    """The protobuf message a deserializer (a generated `Message.FromString`) reads."""
    descriptor = getattr(getattr(decode, "__self__", None), "DESCRIPTOR", None)
    return str(getattr(descriptor, "name", "request"))
