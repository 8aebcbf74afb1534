"""The one table from domain errors to gRPC status codes, and the decorator that applies it to
every RPC. Unexpected exceptions answer INTERNAL with a generic message and an error id; the
detail goes to the log only.

A call that grpc has already ended is not answered: its deadline passed (grpc core ends the
call with DEADLINE_EXCEEDED when it does, and a request that waited for the model until then
fails with our DeadlineExceeded at that same instant), or its client cancelled it. grpc.aio
learns that from core a moment after core knows it, so an answer sent in between fails in
core, and grpc logs "ExecuteBatchError raised in core by servicer method" with a traceback
at ERROR: under load with short deadlines, an ordinary race logged as a server fault. Raising
CancelledError instead is what grpc.aio's own cancellation of the handler does (logged at
DEBUG): the client's status is the one core gave the call.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError

from server._proto.inference import grpc_service_pb2 as pb
from server.errors import ErrorCode, MicrotuneError
from server.telemetry.logs import request_context

__all__ = ["MAX_DETAILS", "STATUS", "clip_details", "ensure_not_ended", "rpc_errors", "status_of"]

log = logging.getLogger("microtune.rpc")

STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.INVALID_INPUT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_READY: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.DEADLINE: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.MODEL_FAILED: grpc.StatusCode.INTERNAL,
    ErrorCode.LOAD_FAILED: grpc.StatusCode.INTERNAL,
}


_OK = grpc.StatusCode.OK  # per request: an Enum member read through its class costs ~1k instr.


def status_of(exc: BaseException | None) -> grpc.StatusCode:
    """The status an outcome is answered with (for metrics): None = OK."""
    if exc is None:
        return _OK
    if isinstance(exc, MicrotuneError):
        return STATUS[exc.code]
    if isinstance(exc, asyncio.CancelledError):  # grpc cancelled the handler: its client did
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL


def _request_fields(request: Any) -> dict[str, str | None]:
    """The log fields of an RPC's request message: ModelInfer's model_name / model_version / id,
    the model RPCs' name / version (the requested version: the served one is not known here).
    ModelInfer's request comes serialized (server.rpc.wire): parsed here, on the error path."""
    if isinstance(request, bytes):
        try:
            request = pb.ModelInferRequest.FromString(request)
        except DecodeError:
            request = None
    model = getattr(request, "model_name", "") or getattr(request, "name", "")
    version = getattr(request, "model_version", "") or getattr(request, "version", "")
    request_id = getattr(request, "id", "")
    return {
        "request_id": request_id or None,
        "model": model or None,
        "version": version or None,
    }


R = TypeVar("R")
Handler = Callable[..., Awaitable[R]]  # (self, request, context, *extra)


def rpc_errors(fn: Handler[R]) -> Handler[R]:
    """Wrap a unary servicer method so that every exception becomes a proper status, and no
    answer goes to a call grpc has ended (module docstring)."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext, *args: Any) -> R:
        try:
            response = await fn(self, request, context, *args)
        except MicrotuneError as exc:
            code, details = STATUS[exc.code], exc.message
        except grpc.aio.AbortError:
            raise
        except Exception:
            code, details = grpc.StatusCode.INTERNAL, internal_error(fn.__name__, request)
        else:
            ensure_not_ended(context)
            return response
        # Aborted here, past the `except` (see _abort): the error, its traceback and the request
        # are gone before grpc's AbortError is raised.
        del request
        await _abort(context, code, details)
        raise AssertionError("unreachable")  # _abort() always raises

    wrapper.__rpc_errors__ = True  # type: ignore[attr-defined]
    return wrapper


# The most of a message a client gets (characters). A status's details travel in a header:
# past grpc's metadata limit (8-16 KiB, percent-encoded) the client got RESOURCE_EXHAUSTED
# "Stream removed" instead of the error; and messages quote what the client sent (names,
# shapes, lists of a model's inputs), which a client can make megabytes long.
MAX_DETAILS = 2000


def clip_details(details: str) -> str:
    """`details`, cut to MAX_DETAILS characters, saying so."""
    if len(details) <= MAX_DETAILS:
        return details
    return f"{details[: MAX_DETAILS - 40]}... ({len(details)} characters in all)"


def ensure_not_ended(context: grpc.aio.ServicerContext) -> None:
    """CancelledError once the call's deadline has passed: grpc has ended it, and what is sent
    to it then fails in core (module docstring)."""
    if context.time_remaining() == 0:  # (None: no deadline)
        raise asyncio.CancelledError("the call's deadline passed before its answer")


async def _abort(context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End the call with `code`, unless grpc has ended it (module docstring); always raises.

    grpc's AbortError is part of a reference cycle (its traceback holds the handler's frames,
    which hold the context, whose call state holds the AbortError), freed only when Python's
    cyclic GC runs, and big buffers do not make it run. Whatever those frames hold lives that
    long: so it is called outside any `except` block (a handled exception, its traceback and
    the frames that raised it, the request's bytes and its parsed message among them, would
    hang from the AbortError as its __context__), from frames that no longer hold the request.
    """
    ensure_not_ended(context)
    try:
        await context.abort(code, clip_details(details))
    except grpc.aio.InternalError:
        # Core refused the status (grpc.aio's ExecuteBatchError): it had ended the call, on its
        # deadline or the client's cancellation, before grpc.aio told this task.
        raise asyncio.CancelledError("the call ended before its answer") from None


def internal_error(rpc: str, request: Any) -> str:
    """Log the exception being handled with a new error id; the client's message, which
    names the id and nothing of the exception."""
    error_id = uuid.uuid4().hex[:12]
    with request_context(**_request_fields(request)):
        log.exception("internal error %s in %s", error_id, rpc)
    return f"internal error (id {error_id}); see the server log"
