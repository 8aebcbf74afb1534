"""The event loop's OTLP sender: retries as the SDK exporter does, gives up on what it must,
and never queues without bound."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from otlp_collector import FakeCollector

from server.telemetry.otlp_async import AsyncChunkSender

# A serialized export request with one span.
REQUEST = ExportTraceServiceRequest()
REQUEST.resource_spans.add().scope_spans.add().spans.add(name="x", trace_id=b"\1" * 16,
                                                          span_id=b"\2" * 8)  # fmt: skip
PAYLOAD = REQUEST.SerializeToString()


@pytest.fixture
def collector() -> FakeCollector:
    c = FakeCollector().start()
    yield c
    c.stop()


def sender(collector: FakeCollector, **kw: int) -> AsyncChunkSender:
    return AsyncChunkSender(
        OTLPSpanExporter(endpoint=f"127.0.0.1:{collector.port}", insecure=True), **kw
    )


async def send(s: AsyncChunkSender, times: int = 1) -> None:
    for _ in range(times):
        s.submit(lambda: PAYLOAD)
    await s.close()


def test_a_payload_arrives_as_sent(collector: FakeCollector) -> None:
    s = sender(collector)
    asyncio.run(send(s))
    assert [span.span.name for span in collector.spans()] == ["x"]
    assert (collector.attempts, s.failed, s.dropped) == (1, 0, 0)


def test_transient_errors_are_retried_after_the_servers_retry_delay(
    collector: FakeCollector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.refuse = [
        (grpc.StatusCode.UNAVAILABLE, 0.05),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 0.05),
    ]
    s = sender(collector)
    with caplog.at_level(logging.WARNING, "microtune.tracing"):
        asyncio.run(send(s))
    assert collector.attempts == 3 and len(collector.spans()) == 1 and s.failed == 0
    retried = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retried) == 2 and "UNAVAILABLE" in retried[0] and "in 0.05s" in retried[0]


def test_a_permanent_error_is_not_retried(
    collector: FakeCollector, caplog: pytest.LogCaptureFixture
) -> None:
    collector.refuse = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    s = sender(collector)
    with caplog.at_level(logging.ERROR, "microtune.tracing"):
        asyncio.run(send(s))
    assert (collector.attempts, s.failed, collector.spans()) == (1, 1, [])
    assert any(
        "failed to export spans" in r.getMessage() and "INVALID_ARGUMENT" in r.getMessage()
        for r in caplog.records
    )


def test_a_slow_collector_makes_it_drop_not_queue(collector: FakeCollector) -> None:
    collector.delay_s = 0.3
    s = sender(collector, max_in_flight=2)
    lost: list[str] = []
    s.on_loss = lost.append
    asyncio.run(send(s, times=5))
    assert (collector.attempts, s.dropped, len(collector.spans())) == (2, 3, 2)
    assert lost == ["backlog"] * 3


async def first_attempt(collector: FakeCollector) -> None:
    for _ in range(500):
        if collector.attempts:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the collector was never called")


def test_closing_does_not_wait_out_a_long_retry_delay(collector: FakeCollector) -> None:
    """With the collector down, a send waits 1, 2, 4 ... s between attempts: the shutdown
    used to wait up to 10 s for it. A retry that would come after the close's budget gives up
    at once; the chunk counts as lost."""
    collector.refuse = [(grpc.StatusCode.UNAVAILABLE, 5.0)]
    s = sender(collector)
    lost: list[str] = []
    s.on_loss = lost.append

    async def scenario() -> float:
        s.submit(lambda: PAYLOAD)
        await first_attempt(collector)  # refused: now waiting 5 s to retry
        await asyncio.sleep(0.05)
        start = time.monotonic()
        await s.close(timeout_s=3.0)
        return time.monotonic() - start

    assert asyncio.run(scenario()) < 1.0
    assert (collector.attempts, s.failed, lost) == (1, 1, ["export_failed"])


def test_closing_still_lets_a_short_retry_through(collector: FakeCollector) -> None:
    collector.refuse = [(grpc.StatusCode.UNAVAILABLE, 0.2)]
    s = sender(collector)

    async def scenario() -> None:
        s.submit(lambda: PAYLOAD)
        await first_attempt(collector)
        await s.close(timeout_s=3.0)

    asyncio.run(scenario())
    assert (collector.attempts, s.failed, len(collector.spans())) == (2, 0, 1)


def test_the_senders_log_lines_carry_no_requests_trace(collector: FakeCollector) -> None:
    """The send runs in a context of its own: the request whose span was submitted last had
    set the log context (LOG_SPAN), and every export warning or error carried its trace and
    span ids, as if that request had failed to export."""
    from server.telemetry.logs import LOG_SPAN

    collector.refuse = [(grpc.StatusCode.INVALID_ARGUMENT, None)]
    seen: list[bytes | None] = []

    class Spy(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            seen.append(LOG_SPAN.get())
            return True

    spy = Spy()
    logger = logging.getLogger("microtune.tracing")
    logger.addFilter(spy)
    try:

        async def scenario() -> None:
            LOG_SPAN.set(b"\1" * 24)  # this request's task, as the servicer sets it
            await send(sender(collector))

        asyncio.run(scenario())
    finally:
        logger.removeFilter(spy)
    assert seen and seen == [None] * len(seen)
