"""An in-process fake OTLP/gRPC trace collector: records every Export on 127.0.0.1:<port>."""

from __future__ import annotations

import datetime
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc.error_details_pb2 import RetryInfo
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

__all__ = ["ExportedSpan", "FakeCollector"]


@dataclass(frozen=True)
class ExportedSpan:
    """One span as it arrived over the wire, with its resource's attributes."""

    resource: dict[str, Any]
    span: Any  # opentelemetry.proto.trace.v1.trace_pb2.Span

    @property
    def trace_id(self) -> int:
        return int.from_bytes(self.span.trace_id, "big")

    @property
    def span_id(self) -> int:
        return int.from_bytes(self.span.span_id, "big")

    @property
    def parent_span_id(self) -> int | None:
        return int.from_bytes(self.span.parent_span_id, "big") if self.span.parent_span_id else None

    @property
    def attributes(self) -> dict[str, Any]:
        return {kv.key: _value(kv.value) for kv in self.span.attributes}


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return None if kind is None else getattr(v, kind)


class FakeCollector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.resource_spans: list[Any] = []
        self.exports = 0
        self._server: grpc.Server | None = None
        self.port = 0
        # Answers for the next Exports, in order: (code, retry delay in s or None); then OK.
        self.refuse: list[tuple[grpc.StatusCode, float | None]] = []
        self.attempts = 0
        self.delay_s = 0.0  # each Export waits this long before answering

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            self.attempts += 1
            refused = self.refuse.pop(0) if self.refuse else None
        time.sleep(self.delay_s)
        if refused is not None:
            code, retry_s = refused
            if retry_s is not None:
                info = RetryInfo()
                info.retry_delay.FromTimedelta(datetime.timedelta(seconds=retry_s))
                context.set_trailing_metadata(
                    (("google.rpc.retryinfo-bin", info.SerializeToString()),)
                )
            context.abort(code, "refused by the test")
        with self._lock:
            self.resource_spans.extend(request.resource_spans)
            self.exports += 1
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[ExportedSpan]:
        with self._lock:
            batches = list(self.resource_spans)
        out: list[ExportedSpan] = []
        for rs in batches:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            out.extend(ExportedSpan(resource, s) for ss in rs.scope_spans for s in ss.spans)
        return out

    def start(self) -> FakeCollector:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None)
            self._server = None
