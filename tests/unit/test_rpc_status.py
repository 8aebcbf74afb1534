"""server.rpc.status and the servicer: every RPC is wrapped; every domain error has a status;
unexpected errors answer INTERNAL without leaking their text."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import inspect
import logging
import re
import time
import tracemalloc
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from server import errors
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import ErrorCode, MicrotuneError
from server.rpc.servicer import InferenceServicer, add_to_server
from server.rpc.status import STATUS, rpc_errors
from server.types import InferResponse

SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
METHODS = [m.name for m in SERVICE.methods]

# ----------------------------------------------------------------------------- coverage


def test_service_has_the_20_triton_methods() -> None:
    assert len(METHODS) == 20


@pytest.mark.parametrize("name", METHODS)
def test_every_rpc_is_implemented_and_wrapped(name: str) -> None:
    assert name in vars(InferenceServicer), f"{name} falls through to the UNIMPLEMENTED stub"
    method = vars(InferenceServicer)[name]
    assert getattr(method, "__rpc_errors__", False) is True, f"{name} is not wrapped by rpc_errors"
    streaming = SERVICE.methods_by_name[name].server_streaming
    if streaming:
        assert inspect.isasyncgenfunction(method), name
    else:
        assert inspect.iscoroutinefunction(method), name


def test_servicer_defines_no_method_outside_the_service() -> None:
    public = {n for n, v in vars(InferenceServicer).items() if callable(v) and n[:1].isupper()}
    assert public == set(METHODS)
    assert issubclass(InferenceServicer, pb_grpc.GRPCInferenceServiceServicer)


def test_status_covers_every_error_code() -> None:
    assert set(STATUS) == set(ErrorCode)
    assert all(isinstance(v, grpc.StatusCode) for v in STATUS.values())
    assert grpc.StatusCode.OK not in STATUS.values()
    assert grpc.StatusCode.UNKNOWN not in STATUS.values()


def _error_classes() -> list[type[MicrotuneError]]:
    out: list[type[MicrotuneError]] = []
    todo = list(MicrotuneError.__subclasses__())
    while todo:
        cls = todo.pop()
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return sorted(out, key=lambda c: c.__name__)


EXPECTED = {
    "NotFound": grpc.StatusCode.NOT_FOUND,
    "InvalidInput": grpc.StatusCode.INVALID_ARGUMENT,
    "NotReady": grpc.StatusCode.UNAVAILABLE,
    "Overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DeadlineExceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "AlreadyExists": grpc.StatusCode.ALREADY_EXISTS,
    "Unsupported": grpc.StatusCode.UNIMPLEMENTED,
    "ModelFailed": grpc.StatusCode.INTERNAL,
    "LoadFailed": grpc.StatusCode.INTERNAL,  # Triton answers INTERNAL for failed loads
}


def test_every_error_class_has_a_code() -> None:
    classes = _error_classes()
    assert {c.__name__ for c in classes} >= {n for n in EXPECTED if hasattr(errors, n)}
    for cls in classes:
        assert cls.code in STATUS, cls


# ----------------------------------------------------------------------------- the decorator


class Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class FakeContext:
    """Like grpc.aio.ServicerContext.abort: records the status and raises. `remaining`: what
    time_remaining() says (None: no deadline; 0: it passed). `ended`: the call ended in core
    meanwhile, so abort() fails as grpc.aio's does (ExecuteBatchError, an InternalError)."""

    def __init__(self, remaining: float | None = None, ended: bool = False) -> None:
        self.calls: list[tuple[grpc.StatusCode, str]] = []
        self.remaining = remaining
        self.ended = ended
        self.written: list[Any] = []

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.calls.append((code, details))
        if self.ended:
            raise grpc.aio.InternalError('Failed "execute_batch"')
        raise Aborted(code, details)

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    async def write(self, message: Any) -> None:
        """A stream's response, as ModelStreamInfer writes it (recorded in `written`)."""
        if self.ended:
            raise grpc.aio.InternalError('Failed "execute_batch"')
        self.written.append(message)


class Boom:
    def __init__(self, exc: BaseException | None) -> None:
        self.exc = exc

    @rpc_errors
    async def call(self, request: Any, context: Any) -> str:
        if self.exc is not None:
            raise self.exc
        return f"ok {request}"


def _run(
    exc: BaseException | None, request: object = 1, ctx: FakeContext | None = None
) -> tuple[object, FakeContext]:
    ctx = ctx or FakeContext()

    async def go() -> object:
        return await Boom(exc).call(request, ctx)

    try:
        return asyncio.run(go()), ctx
    except Aborted as a:
        return a, ctx


def test_success_passes_through() -> None:
    result, ctx = _run(None, 5)
    assert result == "ok 5" and ctx.calls == []


@pytest.mark.parametrize(
    "cls", [c for c in _error_classes() if c.__name__ in EXPECTED], ids=lambda c: c.__name__
)
def test_domain_errors_map_to_their_status(cls: type[MicrotuneError]) -> None:
    result, ctx = _run(cls(f"message of {cls.__name__} for 'INPUT0'"))
    assert isinstance(result, Aborted)
    assert ctx.calls == [(EXPECTED[cls.__name__], f"message of {cls.__name__} for 'INPUT0'")]


def test_unexpected_error_is_internal_without_its_text(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="microtune.rpc"):
        result, ctx = _run(RuntimeError("secret"))
    assert isinstance(result, Aborted)
    ((code, details),) = ctx.calls
    assert code is grpc.StatusCode.INTERNAL
    assert "secret" not in details
    assert details.startswith("internal error (id ") and "see the server log" in details
    error_id = details.split("(id ")[1].split(")")[0]
    # the detail is in the log, under the same id
    assert any(error_id in r.getMessage() and r.exc_info for r in caplog.records)
    assert "secret" in caplog.text


def test_abort_error_passes_through() -> None:
    with pytest.raises(grpc.aio.AbortError):
        _run(grpc.aio.AbortError())


def test_cancellation_is_not_turned_into_a_status() -> None:
    with pytest.raises(asyncio.CancelledError):
        _run(asyncio.CancelledError())


@pytest.mark.parametrize(
    "exc",
    [None, errors.DeadlineExceeded("deadline exceeded before the model returned"), KeyError()],
    ids=["answer", "domain error", "unexpected error"],
)
def test_a_call_past_its_deadline_is_left_to_grpc(exc: BaseException | None) -> None:
    """grpc ends the call with DEADLINE_EXCEEDED at its deadline: an answer after it is not
    sent (it would fail in core, and grpc log that at ERROR), nor is its status aborted."""
    ctx = FakeContext(remaining=0)
    with pytest.raises(asyncio.CancelledError):
        _run(exc, ctx=ctx)
    assert ctx.calls == []


def test_a_deadline_still_ahead_is_answered() -> None:
    result, ctx = _run(None, 5, FakeContext(remaining=0.001))
    assert result == "ok 5"
    _, ctx = _run(errors.NotFound("no"), ctx=FakeContext(remaining=0.001))
    assert ctx.calls == [(grpc.StatusCode.NOT_FOUND, "no")]


def test_a_status_that_core_refuses_ends_as_a_cancellation() -> None:
    """The client cancelled (or the deadline hit) in core before grpc.aio told the handler:
    the abort fails there; it must not reach grpc as an error of the servicer."""
    ctx = FakeContext(ended=True)
    with pytest.raises(asyncio.CancelledError):
        _run(errors.Overloaded("queue full"), ctx=ctx)
    assert ctx.calls == [(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")]


def test_wrapper_keeps_the_name() -> None:
    assert Boom.call.__name__ == "call"
    assert Boom.call.__rpc_errors__ is True  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- a real server


class Generic:
    @rpc_errors
    async def boom(self, request: bytes, context: Any) -> bytes:
        raise RuntimeError("secret")

    @rpc_errors
    async def missing(self, request: bytes, context: Any) -> bytes:
        raise errors.NotFound("Request for unknown model: 'nope' is not found")

    @rpc_errors
    async def echo(self, request: bytes, context: Any) -> bytes:
        return request


def test_statuses_on_a_real_grpc_aio_server(caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> list[tuple[grpc.StatusCode, str]]:
        impl = Generic()
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(getattr(impl, name))
            for name in ("boom", "missing", "echo")
        }
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.Generic", handlers),)
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        out: list[tuple[grpc.StatusCode, str]] = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                assert await ch.unary_unary("/test.Generic/echo")(b"hi", timeout=10) == b"hi"
                for name in ("boom", "missing"):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await ch.unary_unary(f"/test.Generic/{name}")(b"", timeout=10)
                    out.append((info.value.code(), info.value.details() or ""))
        finally:
            await server.stop(None)
        return out

    with caplog.at_level(logging.ERROR, logger="microtune.rpc"):
        (boom, missing) = asyncio.run(go())
    assert boom[0] is grpc.StatusCode.INTERNAL
    assert "secret" not in boom[1]
    assert boom[1].startswith("internal error (id ")
    assert missing == (
        grpc.StatusCode.NOT_FOUND,
        "Request for unknown model: 'nope' is not found",
    )


def test_answers_at_the_deadline_make_grpc_log_no_error(caplog: pytest.LogCaptureFixture) -> None:
    """Requests answered at the instant their deadline passes, on ModelInfer and on a stream:
    the handler's own timer failing it with DeadlineExceeded, or a response just too late.
    grpc core ends each call on the same deadline, and an answer sent as it does fails in
    core: grpc logged ERROR "ExecuteBatchError raised in core by servicer method" with a
    traceback, for about a tenth to a third of these calls. The clients' status is the
    deadline's in any case."""

    async def infer(req: Any, deadline: float, hints: object = None, span: object = None) -> Any:
        await asyncio.sleep(max(deadline - time.monotonic(), 0))
        if req.model == "late_error":
            raise errors.DeadlineExceeded("deadline exceeded before the model returned")
        return InferResponse(req.model, "1", req.id, ())

    servicer = _servicer(infer=infer)
    service = "/inference.GRPCInferenceService"

    async def go() -> collections.Counter[grpc.StatusCode]:
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        codes: collections.Counter[grpc.StatusCode] = collections.Counter()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await ch.channel_ready()  # (no call's deadline spent connecting)
                unary = ch.unary_unary(f"{service}/ModelInfer")
                stream = ch.stream_stream(f"{service}/ModelStreamInfer")

                async def one(k: int) -> None:
                    model = ("late_error", "late_ok")[k % 2]
                    req = pb.ModelInferRequest(model_name=model).SerializeToString()
                    if k % 4 < 2:
                        call: Any = unary(req, timeout=0.02)
                    else:
                        call = stream(timeout=0.02)
                        # (the call may end before the client has done writing: its deadline)
                        with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.InternalError):
                            await call.write(req)
                            await call.done_writing()
                    codes[await call.code()] += 1

                for _ in range(10):
                    await asyncio.gather(*(one(k) for k in range(40)))
                await asyncio.sleep(0.2)  # grpc finishes the last calls' ends
        finally:
            await server.stop(None)
        return codes

    with caplog.at_level(logging.ERROR, logger="grpc"):
        codes = asyncio.run(go())
    errors_logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors_logged == []
    # Nothing is answered once the server's deadline has passed (before, a few answers got
    # through when the client's deadline, counted from its send, was a hair later). (A stream
    # the client was still writing may end INTERNAL "Internal error from Core" on its side.)
    assert sum(codes.values()) == 400 and grpc.StatusCode.OK not in codes
    assert codes[grpc.StatusCode.DEADLINE_EXCEEDED] >= 200  # every ModelInfer, at least


def test_a_refused_request_is_freed_at_once_not_by_the_cyclic_gc() -> None:
    """grpc's AbortError is in a reference cycle with the call's state. Aborting inside the
    `except` chained the error, its traceback and the frames that raised it to that cycle, and
    the handler's frames held the request: a refused request's bytes (and on ModelInfer their
    parsed copy) stayed until a GC ran, and large buffers do not trigger one (a front grew by
    twice each refused request's size). Each refusal here, with the GC off, must free them."""

    async def load_model(name: str, config: object, files: object) -> None:
        raise errors.InvalidInput("no repository holds this model")

    size = 4 << 20
    infer = pb.ModelInferRequest(model_name="m", id="x")  # a raw input one element short
    infer.inputs.add(name="INPUT0", datatype="FP32", shape=[size // 4 + 1])
    infer.raw_input_contents.append(b"\x01" * size)
    data = infer.SerializeToString()  # (one copy on the client's side, whatever it keeps)
    load = pb.RepositoryModelLoadRequest(model_name="m")
    load.parameters["file:1/model.onnx"].bytes_param = b"\x01" * size
    service = "/inference.GRPCInferenceService"
    options = [("grpc.max_receive_message_length", 64 << 20)]

    async def go() -> dict[str, list[int]]:
        server = grpc.aio.server(options=options)
        add_to_server(_servicer(load_model=load_model), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        kept: dict[str, list[int]] = {}
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
                unary = ch.unary_unary(f"{service}/ModelInfer")
                stream = ch.stream_stream(f"{service}/ModelStreamInfer")
                stub = pb_grpc.GRPCInferenceServiceStub(ch)

                async def on_stream() -> None:
                    call = stream(timeout=10)
                    await call.write(data)
                    await call.done_writing()
                    (answer,) = [pb.ModelStreamInferResponse.FromString(r) async for r in call]
                    assert answer.error_message.startswith("input 'INPUT0' has 4194304 bytes")

                async def refused(rpc: str) -> None:
                    if rpc == "ModelStreamInfer":
                        return await on_stream()
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        if rpc == "ModelInfer":
                            await unary(data, timeout=10)
                        else:
                            await stub.RepositoryModelLoad(load, timeout=10)
                    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

                for rpc in ("ModelInfer", "ModelStreamInfer", "RepositoryModelLoad"):
                    await refused(rpc)  # (grpc's and the codec's first-call allocations)
                    base = tracemalloc.get_traced_memory()[0]
                    kept[rpc] = []
                    for _ in range(3):
                        await refused(rpc)
                        await asyncio.sleep(0.05)  # (grpc ends the call)
                        kept[rpc].append(tracemalloc.get_traced_memory()[0] - base)
        finally:
            await server.stop(None)
        return kept

    gc.collect()
    gc.disable()  # what frees them must be reference counting
    tracemalloc.start()
    try:
        kept = asyncio.run(go())
    finally:
        tracemalloc.stop()
        gc.enable()
    assert all(b < size // 2 for counts in kept.values() for b in counts), kept


# ----------------------------------------------------------------------------- the servicer


def _servicer(**handler_attrs: Any) -> InferenceServicer:
    counted = {
        "refused": lambda model, exc, start: None,
        "max_message_bytes": 2**62,
        **handler_attrs,
    }
    return InferenceServicer(SimpleNamespace(tracer=None, **counted))  # type: ignore[arg-type]


def _call_unary(
    servicer: InferenceServicer, name: str, request: object
) -> tuple[object, FakeContext]:
    ctx = FakeContext()

    async def go() -> object:
        return await getattr(servicer, name)(request, ctx)

    try:
        return asyncio.run(go()), ctx
    except Aborted as a:
        return a, ctx


def test_servicer_maps_handler_errors() -> None:
    def live() -> bool:
        raise RuntimeError("secret")

    def model_ready(name: str, version: str) -> bool:
        raise errors.InvalidInput("model name is required")

    s = _servicer(live=live, model_ready=model_ready, ready=lambda: True)
    result, ctx = _call_unary(s, "ServerReady", pb.ServerReadyRequest())
    assert result == pb.ServerReadyResponse(ready=True) and ctx.calls == []
    _, ctx = _call_unary(s, "ServerLive", pb.ServerLiveRequest())
    assert ctx.calls[0][0] is grpc.StatusCode.INTERNAL and "secret" not in ctx.calls[0][1]
    _, ctx = _call_unary(s, "ModelReady", pb.ModelReadyRequest())
    assert ctx.calls == [(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")]


def test_servicer_infer_decodes_before_calling_the_handler() -> None:
    called: list[object] = []

    async def infer(
        req: object, deadline: object, hints: object = None, span: object = None
    ) -> object:
        called.append(req)
        raise AssertionError("not reached")

    s = _servicer(infer=infer)
    # ModelInfer takes its request serialized (server.rpc.wire)
    _, ctx = _call_unary(s, "ModelInfer", pb.ModelInferRequest().SerializeToString())
    assert ctx.calls == [(grpc.StatusCode.INVALID_ARGUMENT, "model_name is required")]
    assert called == []


def test_stream_errors_travel_in_error_message() -> None:
    async def infer(
        req: Any, deadline: object, hints: object = None, span: object = None
    ) -> object:
        if req.model == "missing":
            raise errors.NotFound("Request for unknown model: 'missing' is not found")
        raise RuntimeError("secret")

    s = _servicer(infer=infer)

    async def requests() -> AsyncIterator[bytes]:  # (the stream decodes each message itself)
        yield pb.ModelInferRequest(model_name="missing", id="a").SerializeToString()
        yield pb.ModelInferRequest(model_name="other", id="b").SerializeToString()
        yield pb.ModelInferRequest(id="c").SerializeToString()  # a decode error: goes on

    async def go() -> list[pb.ModelStreamInferResponse]:
        ctx = FakeContext()
        assert [r async for r in s.ModelStreamInfer(requests(), ctx)] == []  # type: ignore[arg-type]
        return ctx.written  # (written, not yielded: see servicer._write)

    first, second, third = asyncio.run(go())
    assert first.error_message == "Request for unknown model: 'missing' is not found"
    assert (first.infer_response.model_name, first.infer_response.id) == ("missing", "a")
    internal = r"internal error \(id [0-9a-f]{12}\); see the server log"
    assert re.fullmatch(internal, second.error_message)
    # the client pipelining on the stream can tell which request failed, as Triton answers
    assert (second.infer_response.model_name, second.infer_response.id) == ("other", "b")
    assert third.error_message == "model_name is required"
    assert third.infer_response.id == "c"
