"""Structured logging: JSON lines in containers, readable text on a terminal.

`setup_logging()` installs one stderr handler on the root logger. Format "auto" picks JSON when
the stream is not a TTY (a container's log collector parses one object per line) and text on a
terminal; "json" and "text" force one.

Every line carries request fields when they are known: `request_id`, `model`, `version` and
`trace_id`/`span_id`, taken from (in order) the call's `extra=`, the `request_context()` binding
of the current task, and, for the trace ids, the active OpenTelemetry span. Request-level code
binds once (`with request_context(request_id=..., model=...)`) and every `log.*` call inside,
in any module, is attributed. Successful requests log nothing at INFO (that is what metrics and
traces are for): only failures and state changes do.

JSON object keys: ts (RFC 3339 UTC, ms), level, logger, msg, pid, the request fields present,
any other `extra=` keys, and exc/stack when there is a traceback.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import Any, Final, Literal, TextIO

from opentelemetry import trace

__all__ = [
    "LOG_SPAN",
    "REQUEST_CONTEXT",
    "JsonFormatter",
    "RequestContext",
    "TextFormatter",
    "current_request",
    "request_context",
    "setup_logging",
]

LogFormat = Literal["auto", "json", "text"]
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """What a request-level log line says about its request; None = unknown (left out)."""

    request_id: str | None = None
    model: str | None = None
    version: str | None = None  # the served version once resolved
    trace_id: str | None = None


# The default is shared, which is safe: RequestContext is frozen and bindings replace it.
REQUEST_CONTEXT: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "microtune_request",
    default=RequestContext(),  # noqa: B039
)
_FIELDS: Final = tuple(f.name for f in fields(RequestContext))
_CONTEXT_KEYS: Final = (*_FIELDS, "span_id")
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__.keys()
    | {"message", "asctime", "taskName", *_CONTEXT_KEYS}
)


# The trace id (16 bytes) and span id (8) of a request traced without an active SDK span
# (ModelInfer's InferTrace.ref, server.telemetry.tracing). Set once per RPC task, never reset:
# each gRPC call runs in its own asyncio task, whose context copy dies with it.
LOG_SPAN: contextvars.ContextVar[bytes | None] = contextvars.ContextVar(
    "microtune_log_span", default=None
)


def current_request() -> RequestContext:
    return REQUEST_CONTEXT.get()


@contextmanager
def request_context(
    *,
    request_id: str | None = None,
    model: str | None = None,
    version: int | str | None = None,
    trace_id: str | None = None,
) -> Iterator[RequestContext]:
    """Bind request fields for every log line in this block (and tasks it starts).

    Fields left None keep the enclosing binding's value, so nested blocks can add the served
    version after routing. The binding lives in a ContextVar: each asyncio task sees its own.
    """
    given = {"request_id": request_id, "model": model, "trace_id": trace_id}
    given["version"] = None if version is None else str(version)
    bound = replace(REQUEST_CONTEXT.get(), **{k: v for k, v in given.items() if v is not None})
    token = REQUEST_CONTEXT.set(bound)
    try:
        yield bound
    finally:
        REQUEST_CONTEXT.reset(token)


class _ContextFilter(logging.Filter):
    """Copies the request binding and the active span onto each record (extra= wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = REQUEST_CONTEXT.get()
        for name in _FIELDS:
            if getattr(record, name, None) is None:
                setattr(record, name, getattr(ctx, name))
        span = trace.get_current_span().get_span_context()
        ids: tuple[int, int] | None = None
        if span.is_valid:
            ids = (span.trace_id, span.span_id)
        elif (ref := LOG_SPAN.get()) is not None:
            ids = (int.from_bytes(ref[:16], "big"), int.from_bytes(ref[16:], "big"))
        if ids is not None:
            if record.trace_id is None:  # type: ignore[attr-defined]
                record.trace_id = trace.format_trace_id(ids[0])
            if getattr(record, "span_id", None) is None:
                record.span_id = trace.format_span_id(ids[1])
        return True


def _context_items(record: logging.LogRecord) -> list[tuple[str, Any]]:
    return [(k, v) for k in _CONTEXT_KEYS if (v := getattr(record, k, None)) not in (None, "")]


class JsonFormatter(logging.Formatter):
    """One JSON object per line (newlines in messages and tracebacks are escaped)."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        obj: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        obj.update(_context_items(record))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in obj and not key.startswith("_"):
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra= value that JSON cannot encode must not lose the whole line.
        return json.dumps(obj, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the request fields appended in brackets."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        items = _context_items(record)
        if items:
            line += " [" + " ".join(f"{k}={v}" for k, v in items) + "]"
        return line


def setup_logging(
    level: int | str = "INFO",
    fmt: LogFormat = "auto",
    *,
    stream: TextIO | None = None,
    logger: logging.Logger | None = None,
) -> logging.Handler:
    """Replace `logger`'s (default: root) handlers with one structured stream handler.

    Like `logging.basicConfig(force=True)`, so calling it again (e.g. in a spawned front process)
    reconfigures instead of duplicating lines.
    """
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if isatty is not None and isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    target = logging.getLogger() if logger is None else logger
    for old in list(target.handlers):
        target.removeHandler(old)
        old.close()
    target.addHandler(handler)
    target.setLevel(level)
    if logger is None:
        # grpc's Cython layer logs a DEBUG line per call ("Loaded running loop"): at
        # --log-level DEBUG that was one line of noise per request. Its INFO and above stay.
        logging.getLogger("grpc").setLevel(max(logging.INFO, target.getEffectiveLevel()))
    return handler
