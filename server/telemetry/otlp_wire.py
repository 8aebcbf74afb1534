"""`InferTrace` records to OTLP protobuf bytes, written directly, a run of records at a time.

A record's spans differ from request to request only in ids, times and the execute span's
per-call numbers and links; everything else (name, kind, attributes, status, flags) repeats.
So the spans of one layout (server spans of one method, peer and user agent; the route, queue
and execute spans of one model, versions, routing reason and execution mode) are a constant
template with each record's values at fixed offsets: a `_Row`. A run of records becomes one
matrix of values (a row per record: ids, fixed64 times, 5-byte varint numbers) built with
numpy, and each layout's rows are the template with the value columns copied in, joined by
`tobytes()`. Protobuf readers accept fields in any order and append repeated fields
(attributes) in the order met, so each span parses to the message the SDK's encoder makes of
`InferTrace.readable_spans()`; tests/unit/telemetry compare the two. Two liberties: fields in
another order, and varints of a fixed 5-byte width (a reader takes a varint's value from its
bits). The export request carries the run's spans grouped by layout, not record by record
(OTLP gives spans no order).

Records of failed requests, with a tracestate, with numbers past 2**35 or hundreds of links,
all rare, take the SDK's encoder, span by span.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from operator import attrgetter
from typing import Any

import grpc
import numpy as np
from numpy.typing import NDArray
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

from runtime.ipc.protocol import Timings
from server.telemetry.infer_trace import InferTrace, server_attributes

__all__ = ["InferTraceEncoder", "uvarint"]

_SERVER = PbSpan.SpanKind.SPAN_KIND_SERVER
_INTERNAL = PbSpan.SpanKind.SPAN_KIND_INTERNAL
_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_REMOTE_PARENT = _LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
_CACHE_LIMIT = 4096  # distinct layouts kept per kind (server, inner)
_TEMPLATE_ID = 0x7E3A  # the placeholder span that carries our resource and scope envelope
_OK = grpc.StatusCode.OK

_SPANS_TAG = b"\x12"  # ScopeSpans.spans (2)
_DURATION_LIMIT = 1 << 35  # what a 5-byte varint holds (34 s in ns)


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


def _constant(name: str = "", kind: int = 0, attributes: dict[str, Any] | None = None) -> bytes:
    """Fields of a span that repeat from request to request, serialized (the rest of the
    span is appended: a reader merges them)."""
    span = PbSpan(name=name, kind=kind, attributes=_encode_attributes(attributes or {}))
    return span.SerializeToString()


def _status_and_flags(flags: int) -> bytes:
    span = PbSpan(flags=flags)
    span.status.SetInParent()  # the SDK always sends a status, UNSET here
    return span.SerializeToString()


_LOCAL_TAIL = _status_and_flags(_LOCAL_PARENT)
_BATCH = _int_attribute_head("microtune.batch_size")
_PADDED = _int_attribute_head("microtune.padded_batch")
_INPUT = _int_attribute_head("microtune.input_ns")
_COMPUTE = _int_attribute_head("microtune.compute_ns")
_OUTPUT = _int_attribute_head("microtune.output_ns")
# Span.links (13): a Link of trace_id, span_id and flags (6, fixed32): 33 bytes.
_LINK_HEAD = b"\x6a\x21\x0a\x10"
_LINK_MID = b"\x12\x08"
_LINK_TAIL = b"\x35" + struct.pack("<I", _REMOTE_PARENT)
_ID, _TRACE, _PARENT, _START, _END = b"\x12\x08", b"\x0a\x10", b"\x22\x08", b"\x39", b"\x41"


class _Row:
    """The bytes of one layout of spans: a constant template with each record's values
    (columns of `COLUMNS`) at fixed offsets; `fill` writes the rows of many records at once,
    one strided copy per value (a per-byte index cost ~5x more)."""

    __slots__ = ("exec_size", "len_at", "segments", "size", "template")

    def __init__(self, segments: Sequence[bytes | str]) -> None:
        template = bytearray()
        self.segments: list[tuple[slice, slice]] = []  # (in the row, in the values)
        self.len_at = -1
        self.exec_size = 0  # the execute span's size without links (inner rows)
        for seg in segments:
            if isinstance(seg, bytes):
                template += seg
            elif seg == _LEN:  # the execute span's length, written per group (see _write)
                self.len_at = len(template)
                template += bytes(2)
            else:
                at, width = COLUMNS[seg]
                here = len(template)
                self.segments.append((slice(here, here + width), slice(at, at + width)))
                template += bytes(width)
        self.size = len(template)
        self.template = np.frombuffer(bytes(template), np.uint8)

    def fill(self, values: NDArray[np.uint8]) -> NDArray[np.uint8]:
        rows = np.empty((len(values), self.size), np.uint8)
        rows[:] = self.template
        for here, there in self.segments:
            rows[:, here] = values[:, there]
        return rows


_LEN = "exec_len"
# Each record's values in one matrix, a row per record: name -> (first byte, width). Ids as
# they are (big-endian), times fixed64 little-endian, the per-call numbers 5-byte varints
# (readers take a varint's value from its bits, not its length: a fixed width keeps the
# layout fixed).
_WIDTHS = {
    "trace": 16, "server": 8,  # InferTrace.ref
    "route_id": 8, "queue_id": 8, "exec_id": 8,  # InferTrace.children
    "client": 8,  # the client's parent span
    "start": 8, "end": 8, "route_start": 8, "route_end": 8, "queue_start": 8, "exec_start": 8,
    "answer": 8,
    "input": 5, "compute": 5, "output": 5, "batch": 5, "padded": 5,
}  # fmt: skip
COLUMNS: dict[str, tuple[int, int]] = {}
_at = 0
for _name, _width in _WIDTHS.items():
    COLUMNS[_name] = (_at, _width)
    _at += _width
_ROW_WIDTH = _at


def _between(first: str, last: str) -> slice:
    """The value columns from `first` to `last` (adjacent in `_WIDTHS`), filled together."""
    at, _ = COLUMNS[first]
    end, width = COLUMNS[last]
    return slice(at, end + width)


_REFS = _between("trace", "server")  # InferTrace.ref, as it is
_CHILDREN_IDS = _between("route_id", "exec_id")  # InferTrace.children, as it is
_CLIENT = _between("client", "client")
_STAMPS = _between("start", "answer")  # seven fixed64s
_VARINTS = _between("input", "padded")  # five 5-byte varints
_SHIFTS = np.arange(0, 35, 7, dtype=np.int64)
_ROUTE_END = attrgetter("route_end")
_CODE = attrgetter("code")
_ROUTE_ERROR = attrgetter("route_error")
_TRACE_STATE = attrgetter("trace_state")


def _matrix(data: bytes, width: int) -> NDArray[np.uint8]:
    return np.frombuffer(data, np.uint8).reshape(-1, width)


def _server_row(method: str, peer: str, user_agent: str, remote_parent: bool) -> _Row:
    """The server span of one (method, peer, user agent, remote parent?)."""
    parent: list[bytes | str] = [_PARENT, "client"] if remote_parent else []
    body: list[bytes | str] = [
        _ID, "server", _TRACE, "trace", *parent, _START, "start", _END, "end",
        _constant(method, _SERVER, server_attributes(method, peer, user_agent, _OK)),
        _status_and_flags(_REMOTE_PARENT if remote_parent else _LOCAL_PARENT),
    ]  # fmt: skip
    return _Row([_head(body), *body])


def _inner_row(route: tuple[str, str, int, str], mode: str) -> _Row:
    """The route, queue and execute spans of one ((model, requested, served, reason), mode),
    up to the execute span's links."""
    model, requested, served, reason = route

    def ids(own: str, start: str, end: str) -> list[bytes | str]:
        return [_ID, own, _TRACE, "trace", _PARENT, "server", _START, start, _END, end]

    base = {"microtune.model": model, "microtune.version": served}
    route = [*ids("route_id", "route_start", "route_end"), _constant("microtune.route", _INTERNAL, {
        "microtune.model": model, "microtune.requested_version": requested,
        "microtune.served_version": served, "microtune.route_reason": reason,
    }), _LOCAL_TAIL]  # fmt: skip
    queue = [
        *ids("queue_id", "queue_start", "exec_start"),
        _constant("microtune.queue", _INTERNAL, base), _LOCAL_TAIL,
    ]  # fmt: skip
    execute = [
        *ids("exec_id", "exec_start", "answer"),
        _constant("microtune.execute", _INTERNAL, base), _BATCH, "batch", _PADDED, "padded",
        _constant(attributes={"microtune.execution": mode}),
        _INPUT, "input", _COMPUTE, "compute", _OUTPUT, "output", _LOCAL_TAIL,
    ]  # fmt: skip
    row = _Row([_head(route), *route, _head(queue), *queue, _SPANS_TAG, _LEN, *execute])
    row.exec_size = _size(execute)
    return row


def _size(body: Sequence[bytes | str]) -> int:
    """The bytes `body` takes in a row (no `_LEN` in it)."""
    return sum(len(s) if isinstance(s, bytes) else COLUMNS[s][1] for s in body)


def _head(body: Sequence[bytes | str]) -> bytes:
    """The tag and length of a `spans` entry whose body is `body`."""
    return _SPANS_TAG + uvarint(_size(body))


class _Cache(dict[tuple[Any, ...], _Row]):
    """Rows by key; cleared when it grows past the limit (peers come and go)."""

    def __init__(self, make: Callable[..., _Row]) -> None:
        super().__init__()
        self._make = make

    def __missing__(self, key: tuple[Any, ...]) -> _Row:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        got = self[key] = self._make(*key)
        return got


_TIMINGS = attrgetter("timings")
_CHILDREN = attrgetter("children")
_REF = attrgetter("ref")
_PARENT_ID = attrgetter("parent_id")
_SERVER_KEY = attrgetter("server_key")
_ROUTE_KEY = attrgetter("model", "requested", "served", "reason")
_MODE = attrgetter("mode")
_LINKS = attrgetter("links")
_TIMES = attrgetter("start_ns", "end_ns", "route_start", "route_end", "answer_ns")
_NUMBERS = attrgetter("queue_ns", "input_ns", "infer_ns", "output_ns", "batch_size", "padded_batch")


def _fast(rec: InferTrace) -> bool:
    """Whether the rows hold `rec` (else the SDK's encoder writes it)."""
    return (
        rec.timings is not None
        and rec.route_end != 0
        and rec.code is _OK
        and rec.route_error is None
        and not rec.trace_state
    )


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
        self._servers = _Cache(_server_row)
        self._inner = _Cache(_inner_row)
        request = encode_spans([self._template()])
        rs = request.resource_spans[0]
        ss = rs.scope_spans[0]
        del ss.spans[:]
        self._scope_head = ss.SerializeToString()
        del rs.scope_spans[:]
        self._resource_head = rs.SerializeToString()

    def add_many(self, out: list[bytes], records: Sequence[InferTrace]) -> int:
        """Append the spans of `records` to `out` (in any order: OTLP gives spans no order);
        returns the number of spans."""
        recs = list(records)
        fresh = [rec for rec in recs if not rec.children]
        if fresh:  # drawn once and kept: every encoding of a record agrees on them
            ids = self.new_span_ids(len(fresh))
            for k, rec in enumerate(fresh):
                rec.children = ids[24 * k : 24 * k + 24]
        n = 0
        ts = list(map(_TIMINGS, recs))
        # The usual run is all successes: checked with C loops, record by record otherwise.
        if not (
            ts.count(None) == 0
            and all(map(_ROUTE_END, recs))
            and list(map(_CODE, recs)).count(_OK) == len(recs)
            and list(map(_ROUTE_ERROR, recs)).count(None) == len(recs)
            and not any(map(_TRACE_STATE, recs))
        ):
            n += sum([self._sdk(out, rec) for rec in recs if not _fast(rec)])
            recs = [rec for rec in recs if _fast(rec)]
            ts = list(map(_TIMINGS, recs))
        if recs:
            n += self._rows(out, recs, ts)
        return n

    def _rows(self, out: list[bytes], recs: list[InferTrace], ts: list[Timings]) -> int:
        """The spans of successful records, written as rows (see `_Row`)."""
        count = len(recs)
        numbers = np.array(list(map(_NUMBERS, ts)), np.int64).reshape(count, 6)
        over = ((numbers < 0) | (numbers >= _DURATION_LIMIT)).any(axis=1)
        keys = list(zip(map(_ROUTE_KEY, recs), map(_MODE, ts), strict=True))
        links = list(map(_LINKS, ts))
        tails: dict[int, bytes] = {}
        for k in [k for k, refs in enumerate(links) if refs]:
            tails[k] = b"".join([
                _LINK_HEAD + ref[:16] + _LINK_MID + ref[16:] + _LINK_TAIL
                for ref in links[k]
                if len(ref) == 24
            ])  # fmt: skip
            if self._inner[keys[k]].exec_size + len(tails[k]) >= 0x4000:
                over[k] = True  # past the span's 2-byte length: hundreds of links
        n = 0
        if over.any():  # past what a row holds: the SDK's encoder
            n += sum([self._sdk(out, recs[k]) for k in np.flatnonzero(over)])
            keep = np.flatnonzero(~over)
            tails = {j: tails[k] for j, k in enumerate(keep.tolist()) if k in tails}
            recs = [recs[k] for k in keep]
            keys = [keys[k] for k in keep]
            numbers = numbers[keep]
            count = len(recs)
            if not count:
                return n
        values = np.empty((count, _ROW_WIDTH), np.uint8)
        values[:, _REFS] = _matrix(b"".join(map(_REF, recs)), 24)
        values[:, _CHILDREN_IDS] = _matrix(b"".join(map(_CHILDREN, recs)), 24)
        values[:, _CLIENT] = (
            np.array(list(map(_PARENT_ID, recs)), np.uint64).astype(">u8").view(np.uint8)
        ).reshape(count, 8)
        times = np.array(list(map(_TIMES, recs)), np.int64).reshape(count, 5)
        exec_start = times[:, 4] - numbers[:, 1:4].sum(axis=1)
        stamps = np.empty((count, 7), "<u8")
        stamps[:, :4] = times[:, :4]  # start, end, route start, route end
        stamps[:, 4] = exec_start - numbers[:, 0]  # the queue span's start
        stamps[:, 5] = exec_start
        stamps[:, 6] = times[:, 4]  # the answer
        values[:, _STAMPS] = stamps.view(np.uint8)
        varints = numbers[:, 1:6].copy()  # input, compute, output, batch, padded
        varints[:, 4] = np.where(varints[:, 4] == 0, varints[:, 3], varints[:, 4])
        groups = ((varints[:, :, None] >> _SHIFTS) & 0x7F).astype(np.uint8)
        groups[:, :, :4] |= 0x80
        values[:, _VARINTS] = groups.reshape(count, 25)
        n += self._write(out, self._servers, list(map(_SERVER_KEY, recs)), values, {})
        return n + self._write(out, self._inner, keys, values, tails)

    @staticmethod
    def _write(
        out: list[bytes],
        cache: _Cache,
        keys: list[Any],
        values: NDArray[np.uint8],
        tails: dict[int, bytes],
    ) -> int:
        """Write each record's row of the layout its key names (None: no such span)."""
        distinct = dict.fromkeys(keys)
        codes = None
        if len(distinct) > 1:
            number = {key: i for i, key in enumerate(distinct)}
            codes = np.fromiter(map(number.__getitem__, keys), np.intp, len(keys))
        n = 0
        for i, key in enumerate(distinct):
            if key is None:
                continue
            row = cache[key]
            which = np.arange(len(keys)) if codes is None else np.flatnonzero(codes == i)
            rows = row.fill(values if codes is None else values[which])
            if row.len_at >= 0:  # inner spans: the execute span's length, 2-byte varint
                size = np.full(len(which), row.exec_size, np.int64)
                linked = [j for j, k in enumerate(which.tolist()) if k in tails] if tails else []
                for j in linked:
                    size[j] += len(tails[int(which[j])])
                rows[:, row.len_at] = size & 0x7F | 0x80
                rows[:, row.len_at + 1] = size >> 7
                if linked:
                    plain = np.ones(len(which), bool)
                    plain[linked] = False
                    out.append(rows[plain].tobytes())
                    out.extend(rows[j].tobytes() + tails[int(which[j])] for j in linked)
                else:
                    out.append(rows.tobytes())
                n += 3 * len(which)
            else:
                out.append(rows.tobytes())
                n += len(which)
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
        `add_many` appended), copied once (a chunk is up to 2 MiB, on the event loop)."""
        inner = len(self._scope_head) + sum(map(len, spans))
        outer = len(self._resource_head) + 1 + len(uvarint(inner)) + inner
        head = b"\x0a" + uvarint(outer) + self._resource_head + b"\x12" + uvarint(inner)
        return b"".join([head, self._scope_head, *spans])

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
