"""Worker only: what native libraries write to the process's stderr, turned into log records.

onnxruntime's C++ logger (and CUDA, cuDNN and the like) write straight to file descriptor 2,
colour codes included, outside Python logging: with `--log-format json` one such line breaks the
one-object-per-line contract of a log collector. `route_native_stderr()` points fd 2 at a pipe
and a daemon thread logs each line that comes out of it: onnxruntime's lines through the
`onnxruntime` logger at the level their severity letter says (E = ERROR, W = WARNING, ...),
anything else through `microtune.worker.stderr` at WARNING. Python's own stderr and the log
handlers keep writing to the real stderr (a duplicate of the original fd 2), so the records the
thread logs do not loop back into the pipe.

Sessions already log below FATAL only (runtime.engine.session.ORT_LOG_SEVERITY): what still
arrives here is what nothing raises to us, e.g. onnxruntime failing to load its CUDA provider
library before falling back to the CPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Final, TextIO

__all__ = ["NativeStderr", "parse_line", "route_native_stderr"]

STDERR_FD: Final = 2
_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# "2026-01-05 10:12:03.441 [E:onnxruntime:tag, file.cc:677 Function] message"
_ORT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d [0-9:.]+ \[(?P<sev>[VIWEF]):onnxruntime:[^,\]]*,? ?(?P<where>[^\]]*)\] "
    r"(?P<msg>.*)$"
)
_LEVELS: Final = {
    "V": logging.DEBUG,
    "I": logging.INFO,
    "W": logging.WARNING,
    "E": logging.ERROR,
    "F": logging.CRITICAL,
}
ORT_LOGGER: Final = "onnxruntime"
OTHER_LOGGER: Final = "microtune.worker.stderr"


def parse_line(raw: bytes) -> tuple[str, int, str, str] | None:
    """(logger name, level, message, native source location) of one line of native stderr, or
    None for a blank one (colour resets included)."""
    text = _COLOUR.sub("", raw.decode("utf-8", "backslashreplace")).strip()
    if not text:
        return None
    m = _ORT_LINE.match(text)
    if m is None:
        return OTHER_LOGGER, logging.WARNING, text, ""
    return ORT_LOGGER, _LEVELS[m["sev"]], m["msg"], m["where"].strip()


class NativeStderr:
    """fd 2 redirected into a pipe read by a daemon thread; `close()` puts the real stderr back
    and waits until every line written before it has been logged."""

    def __init__(self, real_fd: int, real: TextIO, pipe_fd: int) -> None:
        self.real_fd = real_fd
        self.real = real
        self._thread = threading.Thread(
            target=self._pump, args=(pipe_fd,), daemon=True, name="native-stderr"
        )
        self._thread.start()

    def _pump(self, pipe_fd: int) -> None:
        with os.fdopen(pipe_fd, "rb") as pipe:
            for raw in pipe:
                parsed = parse_line(raw)
                if parsed is None:
                    continue
                name, level, msg, where = parsed
                extra = {"native_source": where} if where else None
                # A logging failure must not stop the pump: a full pipe would block native code.
                with contextlib.suppress(Exception):
                    logging.getLogger(name).log(level, "%s", msg, extra=extra)

    def close(self, timeout: float = 5.0) -> None:
        # fd 2 was the pipe's only write end: pointing it back at the real stderr ends the pump
        # (EOF) once it has read what is left.
        os.dup2(self.real_fd, STDERR_FD)
        self._thread.join(timeout)


def route_native_stderr() -> NativeStderr:
    """Redirect fd 2 of this process into the log (see the module docstring). Call it once,
    after logging is configured: handlers writing to fd 2 are moved to a duplicate of it."""
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    real_fd = os.dup(STDERR_FD)
    real = open(  # noqa: SIM115 - lives as long as the process (closed by nobody, like stderr)
        real_fd, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False
    )
    _move_stderr_writers(real)
    read_end, write_end = os.pipe()
    os.dup2(write_end, STDERR_FD)
    os.close(write_end)
    return NativeStderr(real_fd, real, read_end)


def _move_stderr_writers(real: TextIO) -> None:
    """Point sys.stderr and every stream handler that writes to fd 2 at `real`."""
    if _writes_to_fd2(sys.stderr):
        sys.stderr = real
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        for handler in lg.handlers:
            if isinstance(handler, logging.StreamHandler) and _writes_to_fd2(handler.stream):
                handler.setStream(real)


def _writes_to_fd2(stream: object) -> bool:
    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return False
    try:
        return bool(fileno() == STDERR_FD)
    except (OSError, ValueError):  # a closed stream, or one without a descriptor (pytest's)
        return False
