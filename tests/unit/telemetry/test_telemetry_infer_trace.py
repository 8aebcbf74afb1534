"""InferTrace records: the fast OTLP encoding is exactly the SDK's encoding of the same spans,
and the tracer's sampling rule is TraceIdRatioBased's."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import grpc
import pytest
from google.protobuf.internal.encoder import _VarintBytes
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import Decision, TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanKind

from runtime.ipc.protocol import Timings
from server.telemetry.infer_trace import InferTrace, random_span_ids, span_ids_from, span_ref
from server.telemetry.otlp_fast import (
    EncodedChunk,
    ExpandingSpanExporter,
    InferTraceEncoder,
    SpanChunker,
)
from server.telemetry.otlp_wire import uvarint
from server.telemetry.tracing import INFER_METHOD, RequestTracer, Tracing

RESOURCE = Resource.create({"service.name": "microtune", "service.version": "0.1.0"})
SCOPE = InstrumentationScope("microtune", "0.1.0")


def _ids() -> Any:
    """Span ids for n records (three each), counting."""
    counter = itertools.count(0x1000)
    return lambda n=1: b"".join(next(counter).to_bytes(8, "big") for _ in range(3 * n))


def record(**kw: Any) -> InferTrace:
    """A finished, successful ModelInfer record; keyword arguments override its fields."""
    rec = InferTrace(
        span_ref(kw.pop("trace_id", 0xABC), kw.pop("span_id", 0x51)),
        kw.pop("parent_id", 0),
        kw.pop("trace_state", ""),
        INFER_METHOD,
        kw.pop("peer", "ipv4:127.0.0.1:50001"),
        kw.pop("user_agent", "grpc-c++/1.70"),
        1_000_000,
        own_server=kw.pop("own_server", True),
    )
    rec.model, rec.requested, rec.served, rec.reason = "dense", "", 2, "stable"
    rec.route_start, rec.route_end = 1_000_100, 1_000_200
    rec.timings = kw.pop("timings", Timings(queue_ns=300, input_ns=40, infer_ns=5000, output_ns=60))
    rec.answer_ns = 1_010_000
    rec.end_ns = 1_011_000
    for key, value in kw.items():
        setattr(rec, key, value)
    return rec


def sdk_encoding(encoder: InferTraceEncoder, data: list[Any]) -> Any:
    return in_span_order(encode_spans(encoder.expand(data)))


def in_span_order(request: Any) -> Any:
    """`request` with each scope's spans sorted by span id: OTLP gives spans no order, and the
    fast encoder writes a run's server spans, then its inner spans."""
    for rs in request.resource_spans:
        for ss in rs.scope_spans:
            spans = sorted(ss.spans, key=lambda span: span.span_id)
            del ss.spans[:]
            ss.spans.extend(spans)
    return request


LINK = (0xABC).to_bytes(16, "big") + (0x51).to_bytes(8, "big")
OTHER = (0xDEF).to_bytes(16, "big") + (0x77).to_bytes(8, "big")
CASES = {
    "root": {},
    "client parent + tracestate": {"parent_id": 0x99, "trace_state": "vendor=a,other=b"},
    "ipv6 peer, no user agent": {"peer": "ipv6:[::1]:40000", "user_agent": ""},
    "unix peer": {"peer": "unix:/tmp/s"},
    "batch with links": {
        "timings": Timings(
            queue_ns=1,
            input_ns=2,
            infer_ns=3,
            output_ns=4,
            batch_size=2,
            padded_batch=4,
            mode="replay",
            links=(LINK, OTHER),
        ),
    },
    "stream request (no server span)": {"own_server": False},
    # Past what the fast layout holds (5-byte varints, 2-byte span length): the SDK's encoder.
    "durations over 2**35 ns": {
        "timings": Timings(queue_ns=1, input_ns=2**35, infer_ns=2**40, output_ns=0),
        "answer_ns": 2**42,
        "end_ns": 2**42 + 1000,
    },
    "hundreds of links": {
        "timings": Timings(batch_size=600, links=tuple(LINK for _ in range(600))),
    },
    "canary route": {"served": 3, "reason": "canary", "requested": "canary"},
    "failed in the worker": {
        "timings": None,
        "code": grpc.StatusCode.UNAVAILABLE,
        "details": "worker restarting",
    },
    "refused by routing": {
        "timings": None,
        "served": None,
        "reason": "",
        "route_error": ("NotFound", "no version 7"),
        "code": grpc.StatusCode.NOT_FOUND,
        "details": "no version 7",
    },
}


@pytest.mark.parametrize("case", list(CASES))
def test_fast_encoding_equals_the_sdk_encoding(case: str) -> None:
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    recs = [record(**CASES[case]), record(**CASES[case])]  # the second one hits the caches
    fast = in_span_order(encoder.encode(recs))
    assert fast == sdk_encoding(encoder, recs)
    assert encoder.count(recs) == sum(len(ss.spans) for ss in fast.resource_spans[0].scope_spans)


def test_a_mixed_run_is_encoded_as_the_sdk_encodes_each_record() -> None:
    # One run as the chunker hands it over: several peers, versions and batch sizes, linked and
    # unlinked executions, and records only the SDK's encoder writes, interleaved.
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    recs = []
    for i, case in enumerate(itertools.islice(itertools.cycle(CASES.values()), 40)):
        kw: dict[str, Any] = {**case, "trace_id": 0x1000 + i, "span_id": 0x2000 + i}
        if i % 3 == 0:
            kw["peer"] = f"ipv4:127.0.0.1:{50000 + i % 4}"
        if i % 5 == 1 and "timings" not in kw:
            kw["timings"] = Timings(queue_ns=i, input_ns=1, infer_ns=2, output_ns=3,
                                    batch_size=1 + i % 4, padded_batch=4 * (i % 2))  # fmt: skip
        recs.append(record(**kw))
    fast = in_span_order(encoder.encode(recs))
    assert fast == sdk_encoding(encoder, recs)
    assert encoder.count(recs) == len(fast.resource_spans[0].scope_spans[0].spans)


@given(st.integers(min_value=-(2**63), max_value=2**64 - 1))
def test_uvarint_is_protobufs_varint(value: int) -> None:
    assert uvarint(value) == _VarintBytes(value & (2**64 - 1))


def by_scope(request: Any) -> dict[tuple[bytes, str], list[bytes]]:
    """(resource, scope) -> the spans, serialized: an export request up to the groups' order."""
    return {
        (rs.resource.SerializeToString(deterministic=True), ss.scope.name): sorted(
            span.SerializeToString(deterministic=True) for span in ss.spans
        )
        for rs in request.resource_spans
        for ss in rs.scope_spans
    }


def test_mixed_batch_keeps_the_sdk_grouping() -> None:
    # Spans of the grpc instrumentation (another scope) travel in the same export request.
    memory = InMemorySpanExporter()
    tp = TracerProvider(resource=RESOURCE)
    tp.add_span_processor(SimpleSpanProcessor(memory))
    with tp.get_tracer("opentelemetry.instrumentation.grpc").start_as_current_span(
        "/inference.GRPCInferenceService/ModelMetadata", kind=SpanKind.SERVER
    ):
        pass
    (other,) = memory.get_finished_spans()
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    data: list[Any] = [record(), other, record(parent_id=5)]
    fast = encoder.encode(data)
    assert by_scope(fast) == by_scope(sdk_encoding(encoder, data))  # groups' order is free
    scopes = {ss.scope.name: len(ss.spans) for rs in fast.resource_spans for ss in rs.scope_spans}
    assert scopes == {"opentelemetry.instrumentation.grpc": 1, "microtune": 8}


def test_expanding_exporter_hands_sdk_spans_to_any_exporter() -> None:
    memory = InMemorySpanExporter()
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    ExpandingSpanExporter(memory, encoder).export([record()])
    spans = memory.get_finished_spans()
    assert [s.name for s in spans] == [
        INFER_METHOD, "microtune.route", "microtune.queue", "microtune.execute",
    ]  # fmt: skip
    server = spans[0]
    assert server.kind is SpanKind.SERVER and server.parent is None
    assert dict(server.attributes) == {
        "rpc.system": "grpc", "rpc.grpc.status_code": 0, "rpc.method": "ModelInfer",
        "rpc.service": "inference.GRPCInferenceService", "rpc.user_agent": "grpc-c++/1.70",
        "net.peer.ip": "127.0.0.1", "net.peer.port": "50001", "net.peer.name": "localhost",
    }  # fmt: skip
    for child in spans[1:]:
        assert child.parent is not None and child.parent.span_id == server.context.span_id
        assert server.start_time <= child.start_time <= child.end_time <= server.end_time


def _tracer(ratio: float) -> RequestTracer:
    tp = TracerProvider()
    return RequestTracer(Tracing(tp, lambda rec: None, ratio))


@settings(max_examples=300, deadline=None)
@given(
    trace_id=st.integers(min_value=1, max_value=(1 << 128) - 1),
    ratio=st.sampled_from([0.0, 0.001, 0.1, 0.5, 0.999, 1.0]),
)
def test_sampling_rule_is_trace_id_ratio_based(trace_id: int, ratio: float) -> None:
    tracer = _tracer(ratio)
    tracer._draw_refs = lambda: span_ref(trace_id, 1)  # the pool of new traces' ids

    class Ctx:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

    sampled = tracer.begin(Ctx(), ()) is not None  # type: ignore[arg-type]
    sdk = TraceIdRatioBased(ratio).should_sample(None, trace_id, "x").decision
    assert sampled == (sdk is Decision.RECORD_AND_SAMPLE)


def test_sampling_ratio_is_honoured_statistically() -> None:
    tracer = _tracer(0.25)
    rng = random.Random(7)
    tracer._draw_refs = lambda: b"".join(  # pools of 3 new traces' ids
        span_ref(rng.getrandbits(128) or 1, 1) for _ in range(3)
    )

    class Ctx:
        def invocation_metadata(self) -> tuple[()]:
            return ()

        def peer(self) -> str:
            return "ipv4:127.0.0.1:1"

    n = 20_000
    got = sum(tracer.begin(Ctx(), ()) is not None for _ in range(n))  # type: ignore[arg-type]
    assert abs(got / n - 0.25) < 0.02


def test_chunker_encodes_full_chunks_and_flushes_old_ones() -> None:
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    emitted: list[EncodedChunk] = []
    recs = [record(trace_id=i + 1) for i in range(7)]

    async def go() -> None:
        chunker = SpanChunker(
            encoder, emitted.append, records_per_chunk=3, encode_every=2, flush_s=0.05
        )
        for rec in recs[:5]:
            chunker.add(rec)
        # Records are encoded 2 at a time; a chunk leaves once it holds 3 or more.
        assert [c.records for c in emitted] == [4]
        chunker.add(recs[5])
        chunker.add(recs[6])
        assert [c.records for c in emitted] == [4]  # 2 encoded and 1 waiting: not full yet
        await asyncio.sleep(0.2)  # the rest, partial, leaves when it is 0.05 s old
        assert [c.records for c in emitted] == [4, 3]
        chunker.flush()  # nothing open: nothing more
        assert len(emitted) == 2

    asyncio.run(go())
    # A chunk's payload is the export request the sender sends as it is: exactly the SDK's
    # encoding of the same records.
    for chunk, part in zip(emitted, (recs[0:4], recs[4:]), strict=True):
        assert chunk.span_count == 4 * len(part)
        sent = ExportTraceServiceRequest.FromString(chunk.payload())
        assert in_span_order(sent) == sdk_encoding(encoder, part)
        assert chunk.nbytes == sum(map(len, chunk.spans))


def test_a_chunk_leaves_when_its_bytes_reach_the_cap() -> None:
    # An OTLP receiver refuses messages over 4 MiB by default: a chunk of many records is sent
    # before it grows past its byte cap, whatever its record count.
    encoder = InferTraceEncoder(RESOURCE, SCOPE, _ids())
    emitted: list[EncodedChunk] = []

    async def go() -> None:
        chunker = SpanChunker(encoder, emitted.append, records_per_chunk=1000,
                              bytes_per_chunk=3000, encode_every=1)  # fmt: skip
        for i in range(10):
            chunker.add(record(trace_id=i + 1))
        chunker.flush()

    asyncio.run(go())
    assert sum(c.records for c in emitted) == 10 and len(emitted) > 2
    assert all(c.nbytes - 1100 < 3000 for c in emitted)  # each left at most a record past it


def test_a_failing_sink_never_fails_the_request(caplog: pytest.LogCaptureFixture) -> None:
    def broken(rec: InferTrace) -> None:
        raise ValueError("encoder bug")

    tracer = RequestTracer(Tracing(TracerProvider(), broken, 1.0))
    for _ in range(3):
        tracer.end(record(), grpc.StatusCode.OK)  # must not raise
    assert tracer.dropped == 3
    lines = [r for r in caplog.records if "dropping them" in r.getMessage()]
    assert len(lines) == 1  # said once, not per request


def test_span_ids_come_three_per_record_from_the_providers_generator() -> None:
    ids = random_span_ids(100)
    assert len(ids) == 2400
    assert all(ids[k : k + 8] != bytes(8) for k in range(0, 2400, 8))
    assert span_ids_from(RandomIdGenerator()) is random_span_ids

    class Counting(RandomIdGenerator):
        def __init__(self) -> None:
            self.n = 0

        def generate_span_id(self) -> int:
            self.n += 1
            return self.n

    draw = span_ids_from(Counting())
    assert draw(2) == b"".join(i.to_bytes(8, "big") for i in range(1, 7))
