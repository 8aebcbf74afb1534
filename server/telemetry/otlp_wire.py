"""`InferTrace` records to OTLP protobuf bytes, written directly.

A record's spans differ from request to request only in ids, times and the execute span's
per-call numbers and links; everything else (name, kind, attributes, status, flags) repeats.
So each span is written as

    spans tag + length | trace id, span id, parent id, start, end (one struct.pack) | constant

where the constant is the serialized template span of its key (model, version, route, peer...),
cached, and the execute span's per-call attributes and links follow it. Protobuf readers accept
fields in any order and append repeated fields (attributes) in the order met, so the message is
the one the SDK's encoder makes of `InferTrace.readable_spans()`; tests/unit/telemetry compare
the two. Writing bytes costs ~2.5x less than filling upb messages field by field (~33k against
~85k instructions a record), and the export thread sends the bytes without re-serializing.

Records of failed requests or with a tracestate, rare, take the SDK's encoder, span by span.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry.exporter.otlp.proto.common._internal import _encode_attributes
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import (
    _encode_span,
    encode_spans,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext

from server.telemetry.infer_trace import InferTrace, server_attributes

__all__ = ["InferTraceEncoder", "uvarint"]

_SERVER = PbSpan.SpanKind.SPAN_KIND_SERVER
_INTERNAL = PbSpan.SpanKind.SPAN_KIND_INTERNAL
_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_PARENT = _LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_CACHE_LIMIT = 4096  # distinct layouts kept per kind (server, inner)
_TEMPLATE_ID = 0x7E3A  # the placeholder span that carries our resource and scope envelope
_OK = grpc.StatusCode.OK

# A span's fields that change per request, in this order (protobuf readers take fields in any
# order): span_id (2) | trace_id (1) | parent_span_id (4) | start (7) | end (8), fixed64.
# The tags around the ids are folded into the bytes next to them: `T2` is trace_id's tag, length
# and value; `P2` parent_span_id's, and then start's tag.
_ID_TAG = b"\x12\x08"  # span_id, 8 bytes
_FIXED = "8s18s11sQBQ"  # span_id, T2, P2, start, end's tag, end
_FIXED_ROOT = "8s18sBQBQ"  # the same without a parent: start's tag is its own
_FIXED_SIZE = len(_ID_TAG) + struct.calcsize("<" + _FIXED)
_END = 0x41
_SPANS_TAG = b"\x12"  # ScopeSpans.spans (2)


def uvarint(v: int) -> bytes:
    """Protobuf's varint encoding of an int64/uint64 (negative numbers take 10 bytes). Off the
    per-record path: lengths of cached parts and of whole chunks."""
    v &= 0xFFFF_FFFF_FFFF_FFFF
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _delimited(tag: bytes, body: bytes) -> bytes:
    return tag + uvarint(len(body)) + body


def _int_attribute_head(key: str) -> bytes:
    """The Span.attributes entry `key: int_value` up to its value, a 5-byte varint."""
    k = key.encode()
    return b"\x4a" + uvarint(2 + len(k) + 3 + 5) + b"\x0a" + uvarint(len(k)) + k + b"\x12\x06\x18"


# Durations are written as 5-byte varints whatever their size (up to 2**35 ns, 34 s): readers
# take a varint's value from its bits, not its length, and a fixed size lets the whole span be
# one struct (the value's 7-bit groups spread over an unsigned int, continuation bits set,
# then the top group; written out three times in `add`: a call each would cost more than the
# rest of the span).
_INPUT = _int_attribute_head("microtune.input_ns")
_COMPUTE = _int_attribute_head("microtune.compute_ns")
_OUTPUT = _int_attribute_head("microtune.output_ns")
_DURATION_LIMIT = 1 << 35
_CONTINUED = 0x8080_8080
# Span.links (13): a Link of trace_id, span_id and flags (6, fixed32): 33 bytes.
_LINK_HEAD = b"\x6a\x21\x0a\x10"
_LINK_MID = b"\x12\x08"
_LINK_TAIL = b"\x35" + struct.pack("<I", _REMOTE_PARENT)


def _constant(name: str, kind: int, flags: int, attributes: dict[str, Any]) -> bytes:
    """A span's fields that repeat from request to request, serialized."""
    span = PbSpan(name=name, kind=kind, flags=flags, attributes=_encode_attributes(attributes))
    span.status.SetInParent()  # the SDK always sends a status, UNSET here
    return span.SerializeToString()


def _head(size: int) -> bytes:
    """The tag and length of a `spans` entry of `size` bytes."""
    return _SPANS_TAG + uvarint(size)


class _ServerLayout:
    """The server span of one (method, peer, user agent, remote parent?): a struct between
    its constant head and tail."""

    __slots__ = ("head", "pack", "tail")

    def __init__(self, method: str, peer: str, user_agent: str, remote_parent: bool) -> None:
        fixed = _FIXED if remote_parent else _FIXED_ROOT
        flags = _REMOTE_PARENT if remote_parent else _LOCAL_PARENT
        self.tail = _constant(
            method, _SERVER, flags, server_attributes(method, peer, user_agent, _OK)
        )
        size = len(_ID_TAG) + struct.calcsize("<" + fixed) + len(self.tail)
        self.head = _head(size) + _ID_TAG
        self.pack = struct.Struct(f"<{len(self.head)}s{fixed}{len(self.tail)}s").pack


class _InnerLayout:
    """The route, queue and execute spans of one (model, requested, served, reason, batch,
    padded batch, mode), packed by one struct, up to the execute span's links."""

    __slots__ = ("exec_size", "pack", "parts")

    def __init__(
        self, model: str, requested: str, served: int, reason: str, batch: int, padded: int,
        mode: str,
    ) -> None:  # fmt: skip
        route = _constant("microtune.route", _INTERNAL, _LOCAL_PARENT, {
            "microtune.model": model, "microtune.requested_version": requested,
            "microtune.served_version": served, "microtune.route_reason": reason,
        })  # fmt: skip
        base = {"microtune.model": model, "microtune.version": served}
        queue = _constant("microtune.queue", _INTERNAL, _LOCAL_PARENT, base)
        execute = _constant("microtune.execute", _INTERNAL, _LOCAL_PARENT, {
            **base, "microtune.batch_size": batch, "microtune.padded_batch": padded or batch,
            "microtune.execution": mode,
        })  # fmt: skip
        # Everything of the execute span but its links; its three per-call attributes are
        # 5-byte varints (IB) after their heads.
        self.exec_size = _FIXED_SIZE + len(execute) + len(_INPUT + _COMPUTE + _OUTPUT) + 3 * 5
        # The constant runs between the struct's variable fields: route's head; route's
        # constant and queue's head; queue's constant and the execute span's tag (its length,
        # 2 bytes, varies with its links); execute's constant and the first attribute's head.
        self.parts = (
            _head(_FIXED_SIZE + len(route)) + _ID_TAG,
            route + _head(_FIXED_SIZE + len(queue)) + _ID_TAG,
            queue + _SPANS_TAG,
            execute + _INPUT,
        )
        a, b, c, d = (len(p) for p in self.parts)
        self.pack = struct.Struct(
            f"<{a}s{_FIXED}{b}s{_FIXED}{c}sH2s{_FIXED}{d}sIB{len(_COMPUTE)}sIB{len(_OUTPUT)}sIB"
        ).pack


class _Cache(dict[tuple[Any, ...], Any]):
    """Layouts by key; cleared when it grows past the limit (peers come and go)."""

    def __init__(self, make: Callable[..., Any]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: tuple[Any, ...]) -> Any:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        got = self[key] = self._make(*key)
        return got


class InferTraceEncoder:
    """Appends the OTLP spans of records, as `ScopeSpans.spans` entries, to a list of bytes."""

    def __init__(
        self,
        resource: Resource,
        scope: InstrumentationScope,
        new_span_ids: Callable[[int], bytes],
    ) -> None:
        self.resource = resource
        self.scope = scope
        self.new_span_ids = new_span_ids  # n records' inner span ids: 3 x 8 bytes each
        self._servers = _Cache(_ServerLayout)
        self._inner = _Cache(_InnerLayout)
        request = encode_spans([self._template()])
        rs = request.resource_spans[0]
        ss = rs.scope_spans[0]
        del ss.spans[:]
        self._scope_head = ss.SerializeToString()
        del rs.scope_spans[:]
        self._resource_head = rs.SerializeToString()

    def add_many(self, out: list[bytes], records: Sequence[InferTrace]) -> int:
        """Append the spans of `records` to `out`; returns the number of spans."""
        fresh = [rec for rec in records if not rec.children]
        if fresh:
            ids = self.new_span_ids(len(fresh))
            for k, rec in enumerate(fresh):
                rec.children = ids[24 * k : 24 * k + 24]
        add = self.add
        return sum([add(out, rec) for rec in records])

    def add(self, out: list[bytes], rec: InferTrace) -> int:
        """Append `rec`'s spans to `out`; returns the number of spans."""
        t = rec.timings
        if (
            t is None
            or not rec.route_end
            or rec.code is not _OK
            or rec.route_error is not None
            or rec.trace_state
            or not 0 <= (t.input_ns | t.infer_ns | t.output_ns | t.queue_ns) < _DURATION_LIMIT
        ):
            return self._sdk(out, rec)
        layout = self._inner[
            rec.model, rec.requested, rec.served, rec.reason, t.batch_size, t.padded_batch, t.mode
        ]
        size = layout.exec_size
        links = b""
        if t.links:
            links = b"".join([
                _LINK_HEAD + ref[:16] + _LINK_MID + ref[16:] + _LINK_TAIL
                for ref in t.links
                if len(ref) == 24
            ])  # fmt: skip
            size += len(links)
            if size >= 0x4000:  # over the layout's 2-byte length: hundreds of links
                return self._sdk(out, rec)
        ref = rec.ref
        trace, server_id = b"\x0a\x10" + ref[:16], ref[16:]
        parent = b"\x22\x08" + server_id + b"\x39"  # the server span, parent of the others
        ids = rec.children or rec.ids(self.new_span_ids)
        n = 3
        if rec.own_server:
            if rec.parent_id:
                s = self._servers[rec.method, rec.peer, rec.user_agent, True]
                client = b"\x22\x08" + rec.parent_id.to_bytes(8, "big") + b"\x39"
                out.append(s.pack(
                    s.head, server_id, trace, client, rec.start_ns, _END, rec.end_ns, s.tail
                ))  # fmt: skip
            else:
                s = self._servers[rec.method, rec.peer, rec.user_agent, False]
                out.append(s.pack(
                    s.head, server_id, trace, 0x39, rec.start_ns, _END, rec.end_ns, s.tail
                ))  # fmt: skip
            n = 4
        i, c, o = t.input_ns, t.infer_ns, t.output_ns
        answer = rec.answer_ns
        exec_start = answer - (i + c + o)
        route, queue, execute, inputs = layout.parts
        out.append(layout.pack(
            route, ids[:8], trace, parent, rec.route_start, _END, rec.route_end,
            queue, ids[8:16], trace, parent, exec_start - t.queue_ns, _END, exec_start,
            execute, size & 0x7F | 0x80 | (size >> 7) << 8, _ID_TAG,  # 2-byte varint length
            ids[16:], trace, parent, exec_start, _END, answer,
            inputs,
            i & 0x7F | (i & 0x3F80) << 1 | (i & 0x1F_C000) << 2 | (i & 0xFE0_0000) << 3
            | _CONTINUED, i >> 28,
            _COMPUTE,
            c & 0x7F | (c & 0x3F80) << 1 | (c & 0x1F_C000) << 2 | (c & 0xFE0_0000) << 3
            | _CONTINUED, c >> 28,
            _OUTPUT,
            o & 0x7F | (o & 0x3F80) << 1 | (o & 0x1F_C000) << 2 | (o & 0xFE0_0000) << 3
            | _CONTINUED, o >> 28,
        ))  # fmt: skip
        if links:
            out.append(links)
        return n

    def expand(self, data: Sequence[ReadableSpan | InferTrace]) -> list[ReadableSpan]:
        """`data` as SDK spans: each record's spans in its place (what SpanExporters other than
        OTLP receive, and the reference the fast encoding is tested against)."""
        out: list[ReadableSpan] = []
        for d in data:
            if isinstance(d, InferTrace):
                out.extend(d.readable_spans(self.resource, self.scope, self.new_span_ids))
            else:
                out.append(d)
        return out

    def _sdk(self, out: list[bytes], rec: InferTrace) -> int:
        """`rec`'s spans, encoded by the SDK (the reference, for what the fast path skips)."""
        spans = self.expand([rec])
        out.extend(_delimited(_SPANS_TAG, _encode_span(s).SerializeToString()) for s in spans)
        return len(spans)

    def payload(self, spans: Sequence[bytes]) -> bytes:
        """A serialized ExportTraceServiceRequest: our resource and scope, and `spans` (what
        `add` appended)."""
        scope_spans = self._scope_head + b"".join(spans)
        resource_spans = self._resource_head + _delimited(b"\x12", scope_spans)
        return _delimited(b"\x0a", resource_spans)

    def encode(self, data: Sequence[ReadableSpan | InferTrace]) -> ExportTraceServiceRequest:
        """The export request for a mixed batch, grouped by resource and scope as the SDK does."""
        sdk = [d for d in data if not isinstance(d, InferTrace)]
        records = [d for d in data if isinstance(d, InferTrace)]
        if not records:
            return encode_spans(sdk)
        # A placeholder span of our resource and scope, encoded by the SDK with the others,
        # finds the group (resource, scope) the SDK would put our spans in; they replace it.
        request = encode_spans([*sdk, self._template()])
        for rs in request.resource_spans:
            for ss in rs.scope_spans:
                if ss.spans and ss.spans[-1].span_id == _TEMPLATE_ID.to_bytes(8, "big"):
                    del ss.spans[-1]
                    parts: list[bytes] = []
                    self.add_many(parts, records)
                    ss.MergeFromString(b"".join(parts))  # repeated spans: appended
                    return request
        raise AssertionError("the placeholder span vanished from the encoding")

    def _template(self) -> ReadableSpan:
        ctx = SpanContext(_TEMPLATE_ID, _TEMPLATE_ID, False)
        return ReadableSpan("", ctx, resource=self.resource, instrumentation_scope=self.scope)

    @staticmethod
    def count(data: Sequence[ReadableSpan | InferTrace]) -> int:
        n = 0
        for d in data:
            if not isinstance(d, InferTrace):
                n += 1
            else:
                n += int(d.own_server) + int(d.route_end != 0) + 2 * int(d.timings is not None)
        return n
