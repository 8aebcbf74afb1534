"""`inference.GRPCInferenceService`: each method decodes, makes one handler call, encodes.

No logic lives here: decisions are in server.handler, conversions in server.rpc.codec (and
server.rpc.wire for ModelInfer, which takes its request's bytes: `add_to_server`), and
@rpc_errors maps every exception to a status (tests check that every RPC is wrapped).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import MicrotuneError
from server.handler import InferenceHandler
from server.router import RouteHints
from server.routing import HEADER_CANARY_WEIGHT, HEADER_MODEL_VERSION, HEADER_ROUTING_KEY
from server.rpc import codec
from server.rpc.registration import Registrations
from server.rpc.status import (
    clip_details,
    ensure_not_ended,
    internal_error,
    rpc_errors,
    status_of,
)
from server.rpc.wire import InferDecoder, encode_response, request_head
from server.telemetry.infer_trace import InferTrace
from server.telemetry.logs import LOG_SPAN

__all__ = ["InferenceServicer", "add_to_server"]


Ctx = grpc.aio.ServicerContext
Metadata = tuple[tuple[str, str | bytes], ...]


ROUTE_REASON_KEY = "x-route-reason"
# Requests of one ModelStreamInfer in progress at once (see InferenceServicer.ModelStreamInfer).
STREAM_WINDOW = 64
# Set true on every stream response (errors included): Triton's stream says so of each
# response that completes its request, and clients loop until they see it. A model that is not
# decoupled answers each request with one response, so every one is final.
FINAL_FLAG = "triton_final_response"
_NO_HINTS = RouteHints()
_OK = grpc.StatusCode.OK  # (an Enum member read through its class costs ~1k instructions)


def _hints(md: Metadata | None) -> RouteHints:
    """Routing hints from gRPC metadata (x-model-version, x-routing-key, x-canary-weight)."""
    if not md:
        return _NO_HINTS
    found: dict[str, str] = {}
    for key, value in md:
        if key in (HEADER_MODEL_VERSION, HEADER_ROUTING_KEY, HEADER_CANARY_WEIGHT):
            found[key] = value if isinstance(value, str) else value.decode()
    if not found:
        return _NO_HINTS
    return RouteHints(
        found.get(HEADER_MODEL_VERSION),
        found.get(HEADER_ROUTING_KEY),
        found.get(HEADER_CANARY_WEIGHT),
    )


def _deadline(context: Ctx) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, handler: InferenceHandler) -> None:
        self.h = handler
        self.decoder = InferDecoder()

    @rpc_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Ctx
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.h.live())

    @rpc_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Ctx
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.h.ready())

    @rpc_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Ctx
    ) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.h.model_ready(request.name, request.version))

    @rpc_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Ctx
    ) -> pb.ServerMetadataResponse:
        name, version, extensions = self.h.server_metadata()
        return pb.ServerMetadataResponse(name=name, version=version, extensions=extensions)

    @rpc_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Ctx
    ) -> pb.ModelMetadataResponse:
        return codec.encode_metadata(self.h.model_view(request.name, request.version))

    @rpc_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Ctx
    ) -> pb.ModelConfigResponse:
        return codec.encode_config(self.h.model_view(request.name, request.version))

    async def ModelInfer(self, request: bytes, context: Ctx) -> bytes:
        # The server span of ModelInfer is ours, not the interceptor's (server.telemetry.tracing);
        # it ends with the status @rpc_errors answered with.
        tracer = self.h.tracer
        md = context.invocation_metadata()  # read once: each call builds it anew
        span = None if tracer is None else tracer.begin(context, md)
        answer = self._model_infer(request, context, span, md)
        # An abort's AbortError holds this frame until a cyclic GC: not the request's bytes
        # (server.rpc.status._abort).
        del request
        if span is None:
            return await answer
        assert tracer is not None
        LOG_SPAN.set(span.ref)  # this RPC's task only (see its comment)
        try:
            response = await answer
        except grpc.aio.AbortError:
            tracer.end(span, context.code() or grpc.StatusCode.UNKNOWN, context.details() or "")
            raise
        except asyncio.CancelledError:
            # grpc cancels the handler when the call's deadline passes: the client sees
            # DEADLINE_EXCEEDED, and so does the span.
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            tracer.end(
                span, grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
            )
            raise
        tracer.end(span, _OK)
        return response

    ModelInfer.__rpc_errors__ = True  # type: ignore[attr-defined]  # _model_infer is wrapped

    @rpc_errors
    async def _model_infer(
        self,
        request: bytes,
        context: Ctx,
        span: InferTrace | None,
        md: Metadata | None,
    ) -> bytes:
        hints = _hints(md)
        start = time.perf_counter_ns()
        try:
            decoded = self.decoder.decode(request)
        except MicrotuneError as exc:
            self.h.refused(_model_name_of(request), exc, start)
            raise
        result = await self.h.infer(decoded, _deadline(context), hints, span)
        context.set_trailing_metadata(((ROUTE_REASON_KEY, result.route_reason),))
        return encode_response(result)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[bytes], context: Ctx
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        """Each request runs as soon as it arrives, beside the stream's earlier ones (so they
        batch together, as separate ModelInfer calls would), and the responses go back in the
        order of the requests, as Triton's stream does for a model that is not decoupled.
        At most STREAM_WINDOW requests are in progress: past that, the stream is read no
        further until the oldest is answered (gRPC's flow control then holds the client)."""
        hints = _hints(context.invocation_metadata())
        deadline = _deadline(context)
        window = asyncio.Semaphore(STREAM_WINDOW)
        answers: asyncio.Queue[asyncio.Task[pb.ModelStreamInferResponse] | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await window.acquire()
                    answers.put_nowait(
                        asyncio.create_task(self._stream_one(request, deadline, hints))
                    )
            finally:
                answers.put_nowait(None)

        reader = asyncio.create_task(read())
        try:
            while (task := await answers.get()) is not None:
                try:
                    response = await task
                    ensure_not_ended(context)
                    await _write(context, response)
                finally:
                    window.release()
            await reader  # a read that failed (the client's stream broke) fails the call
            ensure_not_ended(context)  # (grpc then sends the stream's status)
        finally:
            reader.cancel()
            while not answers.empty():
                if (left := answers.get_nowait()) is not None:
                    left.cancel()

        # It writes its responses itself (`_write`) but stays an async generator, yielding
        # nothing: opentelemetry-instrumentation-grpc's stream wrapper iterates it.
        if False:  # pragma: no cover
            yield

    async def _stream_one(
        self, request: bytes, deadline: float | None, hints: RouteHints
    ) -> pb.ModelStreamInferResponse:
        # Errors of one request travel in error_message and the stream goes on (Triton's form),
        # a message that is no ModelInferRequest included: the stream's framing is gRPC's, so
        # the next message is read as if nothing happened.
        tracer = self.h.tracer
        # The stream's server span is the interceptor's; each request adds its inner spans.
        span = None if tracer is None else tracer.begin_inner()
        try:
            start = time.perf_counter_ns()
            try:
                decoded = self.decoder.decode(request)
            except MicrotuneError as exc:
                self.h.refused(_model_name_of(request), exc, start)
                raise
            result = await self.h.infer(decoded, deadline, hints, span)
            if span is not None:
                tracer.end(span, grpc.StatusCode.OK)  # type: ignore[union-attr]
            response = codec.encode_infer(result)
            response.parameters[FINAL_FLAG].bool_param = True
            return pb.ModelStreamInferResponse(infer_response=response)
        except MicrotuneError as exc:
            if span is not None:
                tracer.end(span, status_of(exc), exc.message)  # type: ignore[union-attr]
            error = exc.message
        except Exception:
            if span is not None:
                tracer.end(span, grpc.StatusCode.INTERNAL)  # type: ignore[union-attr]
            error = internal_error("ModelStreamInfer", request)
        answer = pb.ModelStreamInferResponse(
            error_message=clip_details(error), infer_response=_response_head(request)
        )
        if answer.ByteSize() > self.h.max_message_bytes:
            # An id as large as the request allows: echoed, it made an answer gRPC does not
            # send, and the stream ended there.
            answer.infer_response.id = ""
        return answer

    ModelStreamInfer.__rpc_errors__ = True  # type: ignore[attr-defined]  # handles its own

    @rpc_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Ctx
    ) -> pb.ModelStatisticsResponse:
        return codec.encode_statistics(await self.h.statistics(request.name, request.version))

    @rpc_errors
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Ctx
    ) -> pb.RepositoryIndexResponse:
        codec.check_repository_name(request.repository_name)
        return codec.encode_index(await self.h.repository_index(request.ready))

    @rpc_errors
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Ctx
    ) -> pb.RepositoryModelLoadResponse:
        codec.check_repository_name(request.repository_name)
        config, files = codec.decode_load_parameters(request.parameters)
        await self.h.load_model(request.model_name, config, files)
        return pb.RepositoryModelLoadResponse()

    @rpc_errors
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Ctx
    ) -> pb.RepositoryModelUnloadResponse:
        codec.check_repository_name(request.repository_name)
        codec.check_unload_parameters(request.parameters)
        await self.h.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    @rpc_errors
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: Ctx
    ) -> pb.SystemSharedMemoryStatusResponse:
        regions = self.h.shm.system_status(request.name)
        return codec.encode_system_shm_status(regions)

    @rpc_errors
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self.h.shm.register_system(request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @rpc_errors
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self.h.shm.unregister_system(request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @rpc_errors
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: Ctx
    ) -> pb.CudaSharedMemoryStatusResponse:
        return codec.encode_cuda_shm_status(self.h.cuda.status(request.name))

    @rpc_errors
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryRegisterResponse:
        await self.h.cuda.register(
            request.name, request.raw_handle, request.device_id, request.byte_size
        )
        return pb.CudaSharedMemoryRegisterResponse()

    @rpc_errors
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: Ctx
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        await self.h.cuda.unregister(request.name)
        return pb.CudaSharedMemoryUnregisterResponse()

    @rpc_errors
    async def TraceSetting(
        self, request: pb.TraceSettingRequest, context: Ctx
    ) -> pb.TraceSettingResponse:
        raise self.h.unsupported("TraceSetting", "tracing is configured with OTEL_* variables")

    @rpc_errors
    async def LogSettings(
        self, request: pb.LogSettingsRequest, context: Ctx
    ) -> pb.LogSettingsResponse:
        raise self.h.unsupported("LogSettings", "set the log level with --log-level")


def add_to_server(servicer: InferenceServicer, server: Any) -> None:
    """The generated `add_GRPCInferenceServiceServicer_to_server`, except that ModelInfer takes
    and answers serialized messages (no deserializer, no serializer): server.rpc.wire decodes
    the request, raw inputs left in place, and writes the response."""
    added = Registrations()
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, added)
    ((service, handlers),) = added.tables.items()
    handlers["ModelInfer"] = grpc.unary_unary_rpc_method_handler(
        servicer.ModelInfer,
        request_deserializer=None,
        response_serializer=None,
    )
    # The stream's requests decode as ModelInfer's do, one by one (see _stream_one).
    handlers["ModelStreamInfer"] = handlers["ModelStreamInfer"]._replace(request_deserializer=None)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)


async def _write(context: Ctx, response: pb.ModelStreamInferResponse) -> None:
    """Send one stream response. Written here, not yielded: a yielded response is written by
    grpc.aio outside this handler, and when the client has cancelled the call meanwhile, core
    refuses the write and grpc logs "ExecuteBatchError raised in core" with a traceback at
    ERROR, one per cancelled stream (any client can flood the log so). Here the refusal ends
    the handler as grpc's own cancellation does (server.rpc.status)."""
    try:
        await context.write(response)
    except grpc.aio.InternalError:
        raise asyncio.CancelledError("the stream ended before its answer") from None


def _model_name_of(request: bytes) -> str:
    """The model a request that did not decode names, if it can be read."""
    return request_head(request)[0]


def _response_head(request: bytes) -> pb.ModelInferResponse:
    """A failed streamed request's response: its id, model name and version as the request
    gave them (if they can be read) and the final flag, as Triton's stream answers."""
    model, version, ident = request_head(request)
    head = pb.ModelInferResponse(model_name=model, model_version=version, id=ident)
    head.parameters[FINAL_FLAG].bool_param = True
    return head
