"""Structured logs: JSON lines vs text, request fields from the context or extra=, trace ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from server.telemetry.logs import current_request, request_context, setup_logging


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    # A private logger: setup_logging replaces handlers, and pytest's own live on the root.
    log = logging.getLogger("microtune.test.logs")
    log.propagate = False
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_auto_is_json_off_a_terminal(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("INFO", stream=out, logger=logger)
    logger.info("model %s loaded", "dense")
    [line] = json_lines(out)
    assert line["msg"] == "model dense loaded" and line["level"] == "INFO"
    assert line["logger"] == "microtune.test.logs" and isinstance(line["pid"], int)
    assert line["ts"].endswith("Z") and "T" in line["ts"]
    assert not {"request_id", "model", "version", "trace_id"} & line.keys()


def test_auto_is_text_on_a_terminal(logger: logging.Logger) -> None:
    out = _Tty()
    setup_logging("INFO", stream=out, logger=logger)
    with request_context(request_id="r1", model="dense", version=3):
        logger.warning("slow")
    line = out.getvalue().strip()
    assert " WARNING microtune.test.logs[" in line
    assert line.endswith("slow [request_id=r1 model=dense version=3]")


def test_forced_formats(logger: logging.Logger) -> None:
    out = _Tty()
    setup_logging("INFO", "json", stream=out, logger=logger)
    logger.info("x")
    assert json.loads(out.getvalue())["msg"] == "x"
    plain = io.StringIO()
    setup_logging("INFO", "text", stream=plain, logger=logger)
    logger.info("y")
    assert plain.getvalue().rstrip().endswith(f"INFO microtune.test.logs[{os.getpid()}] y")
    assert len(logger.handlers) == 1  # reconfiguring replaces, never duplicates


def test_request_fields_from_context_and_extra(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("DEBUG", "json", stream=out, logger=logger)
    with request_context(request_id="abc", model="dense"):
        logger.info("routed")
        with request_context(version=2):  # the served version, added after routing
            logger.info("failed", extra={"code": "INTERNAL"})
        logger.info("model overridden", extra={"model": "other"})
    logger.info("outside")
    routed, failed, overridden, outside = json_lines(out)
    assert routed["request_id"] == "abc" and routed["model"] == "dense" and "version" not in routed
    assert failed["version"] == "2" and failed["code"] == "INTERNAL"
    assert overridden["model"] == "other"
    assert "request_id" not in outside
    assert current_request().request_id is None


def test_one_line_per_record_even_with_newlines_and_tracebacks(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, logger=logger)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        logger.exception("two\nlines", extra={"obj": object()})
    assert len(out.getvalue().splitlines()) == 1
    [line] = json_lines(out)
    assert line["msg"] == "two\nlines" and "ValueError: bad" in line["exc"]
    assert line["obj"].startswith("<object")  # not JSON-encodable: written with str()


def test_each_task_sees_its_own_request(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, logger=logger)

    async def handle(rid: str, delay: float) -> None:
        with request_context(request_id=rid):
            await asyncio.sleep(delay)
            logger.info("done %s", rid)

    async def main() -> None:
        await asyncio.gather(handle("a", 0.02), handle("b", 0.0))

    asyncio.run(main())
    assert {(x["msg"], x["request_id"]) for x in json_lines(out)} == {
        ("done a", "a"),
        ("done b", "b"),
    }


def test_trace_and_span_ids_from_the_active_span(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("INFO", "json", stream=out, logger=logger)
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("infer") as span:
        logger.info("inside")
        ctx = span.get_span_context()
    with request_context(trace_id="0" * 31 + "1"):
        logger.info("explicit")
    inside, explicit = json_lines(out)
    assert inside["trace_id"] == f"{ctx.trace_id:032x}"
    assert inside["span_id"] == f"{ctx.span_id:016x}"
    assert explicit["trace_id"] == "0" * 31 + "1" and "span_id" not in explicit


def test_level_filters(logger: logging.Logger) -> None:
    out = io.StringIO()
    setup_logging("WARNING", "json", stream=out, logger=logger)
    logger.info("request ok")  # no line per successful request at the default level
    logger.warning("request failed")
    assert [x["msg"] for x in json_lines(out)] == ["request failed"]
