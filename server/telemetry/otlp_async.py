"""Sending encoded span chunks from the event loop, over a grpc.aio channel.

The SDK's exporters run in a thread of their own (BatchSpanProcessor). For ModelInfer's chunks
that thread cost the front ~10 % of its throughput at 100 % sampling on `dense` (c=16, two
cores), although an export takes ~0.4 ms of CPU (bench/results/observability.md): every wake-up
of the thread and every return from its blocking gRPC call takes the GIL from the busy event
loop, and on a saturated machine the loop then waits for the OS to schedule it again. Sent from
the loop, an export is one more grpc.aio call beside the server's own, and no thread runs.

The connection settings are the SDK exporter's own, read from the same OTEL_EXPORTER_OTLP_*
variables by an `OTLPSpanExporter` (endpoint, TLS, headers, compression, timeout, retryable
codes), and retries follow its rule: up to 6 attempts within the timeout, backing off 1, 2,
4, ... s with +/-20 % jitter, or as the server's RetryInfo says.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
from collections.abc import Callable

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

__all__ = ["AsyncChunkSender"]

log = logging.getLogger("microtune.tracing")

_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"
_ATTEMPTS = 6  # the SDK exporter's _MAX_RETRYS


class AsyncChunkSender:
    """Sends serialized ExportTraceServiceRequests (`payload()` of each chunk submitted) from
    the event loop; at most `max_in_flight` at once, later ones are dropped and counted, as
    BatchSpanProcessor drops spans when its queue is full."""

    def __init__(self, config: OTLPSpanExporter, max_in_flight: int = 4) -> None:
        # The exporter parsed the environment; its own channel (made in its constructor) is
        # closed unused.
        self._endpoint: str = config._endpoint
        self._insecure: bool = config._insecure
        self._credentials: grpc.ChannelCredentials | None = config._credentials
        self._compression: grpc.Compression | None = config._compression
        self._options = config._channel_options
        self._headers = config._headers
        self._timeout: float = config._timeout
        self._retryable = frozenset(config._retryable_error_codes)
        config.shutdown()
        self._max_in_flight = max_in_flight
        self._channel: grpc.aio.Channel | None = None
        self._export: grpc.aio.UnaryUnaryMultiCallable | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()  # set by close() (bound to the loop that first waits)
        self._close_by = float("inf")  # loop time by which close() wants the sends done
        self.dropped = 0  # chunks not sent: too many in flight
        self.failed = 0  # chunks the collector never accepted
        # Told of each chunk lost, with why ("backlog": too many in flight; "export_failed":
        # the collector never accepted it): the front's metrics count them.
        self.on_loss: Callable[[str], None] | None = None

    def submit(self, payload: Callable[[], bytes]) -> None:
        """Send what `payload()` returns, in the background (call on the event loop)."""
        if len(self._tasks) >= self._max_in_flight:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("the trace collector is too slow: dropping spans (said once)")
            self._lost("backlog")
            return
        # A context of its own: the request whose span filled the chunk set the log context
        # (trace and span ids), which the send's own log lines must not carry.
        task = asyncio.get_running_loop().create_task(
            self._send(payload()), context=contextvars.Context()
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, timeout_s: float = 3.0) -> None:
        """Give the sends in flight `timeout_s` to finish, retries included when they fit (a
        send waiting out a longer backoff gives up at once: with the collector down, its
        retries would hold the shutdown ~10 s), then close the channel."""
        loop = asyncio.get_running_loop()
        self._close_by = loop.time() + timeout_s
        self._closing.set()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def _lost(self, reason: str) -> None:
        if self.on_loss is not None:
            self.on_loss(reason)

    def _connect(self) -> grpc.aio.UnaryUnaryMultiCallable:
        if self._insecure:
            channel = grpc.aio.insecure_channel(
                self._endpoint, options=self._options, compression=self._compression
            )
        else:
            assert self._credentials is not None
            channel = grpc.aio.secure_channel(
                self._endpoint,
                self._credentials,
                options=self._options,
                compression=self._compression,
            )
        self._channel = channel
        self._export = channel.unary_unary(
            _METHOD,
            request_serializer=None,  # the payload is already serialized
            response_deserializer=ExportTraceServiceResponse.FromString,
        )
        return self._export

    async def _send(self, payload: bytes) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        closing = self._closing
        for attempt in range(_ATTEMPTS):
            export = self._export or self._connect()
            try:
                limit = min(deadline, self._close_by)
                await export(payload, metadata=self._headers, timeout=limit - loop.time())
                return
            except grpc.aio.AioRpcError as error:
                code = error.code()
                backoff = 2**attempt * random.uniform(0.8, 1.2)
                retry_info = dict(error.trailing_metadata() or ()).get("google.rpc.retryinfo-bin")
                if isinstance(retry_info, bytes):
                    delay = RetryInfo.FromString(retry_info).retry_delay
                    backoff = delay.seconds + delay.nanos / 1e9
                if code is grpc.StatusCode.UNAVAILABLE and attempt == 0 and self._channel:
                    await self._channel.close()  # reconnect, as the SDK exporter does
                    self._channel = self._export = None
                if (
                    code not in self._retryable
                    or attempt + 1 == _ATTEMPTS
                    or backoff > min(deadline, self._close_by) - loop.time()
                ):
                    self._failed(code, error.details())
                    return
                log.warning(
                    "transient error %s exporting spans to %s, retrying in %.2fs",
                    code.name,
                    self._endpoint,
                    backoff,
                )
                wake_at = loop.time() + backoff
                with contextlib.suppress(TimeoutError):  # close() wakes the wait
                    async with asyncio.timeout(backoff):  # (not wait_for: see WorkerLink.status)
                        await closing.wait()
                if wake_at > self._close_by:  # the retry would come after the close
                    self._failed(code, "the server is shutting down")
                    return
                if wake_at > loop.time():
                    await asyncio.sleep(wake_at - loop.time())

    def _failed(self, code: grpc.StatusCode, details: str | None) -> None:
        self.failed += 1
        log.error("failed to export spans to %s: %s %s", self._endpoint, code.name, details)
        self._lost("export_failed")
