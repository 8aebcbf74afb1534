"""The worker's side of a socket to one front: frames leave in order, and the thread that sends
one does not wait for that front to read.

The threads that answer calls serve every front: a version's batching thread answers each call
of a batch on its front's socket, lane threads answer slow calls. With a blocking
`sendall`, a front that stops reading for a while (its event loop busy under load, a GC pause,
a stopped process) fills its socket's buffer, about 200 answers on Linux, and the batching
thread then waits in `sendall`: every front's calls of that version stop behind the one front.
Here a frame goes out at once when the socket takes it; what it does not take waits in a
backlog that a writer thread of this socket's own sends, blocking, while the senders go on.
Frames sent meanwhile join the backlog, so the front reads them in the order they were sent.

The backlog is bounded by what the front has asked for (one answer per call it sent, calls
bounded by its arena's slots), but a front that sends calls and never reads would grow it
without end: past BACKLOG_MAX bytes the senders wait for the writer, as `sendall` would.

Each stall (a writer started because the socket was full) is reported to `on_stall`: the worker
counts them per front and the front exports the count (`microtune_worker_send_stalls_total`), the
sign of a front whose event loop falls behind reading its answers.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

__all__ = ["BACKLOG_MAX", "Outbound"]

BACKLOG_MAX = 64 << 20


class Outbound:
    """Writes frames to one socket for many threads; `send` raises OSError once the front is
    gone (as `sendall` did)."""

    def __init__(
        self,
        sock: socket.socket,
        backlog_max: int = BACKLOG_MAX,
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        self._sock = sock
        self._on_stall = on_stall
        self._max = backlog_max
        self._cond = threading.Condition(threading.Lock())
        self._backlog: list[bytes | memoryview] = []
        self._bytes = 0
        self._draining = False  # a writer owns the socket's sending until the backlog is empty
        self._gone = ""  # why the writer found the front gone ("": it has not)

    def send(self, frame: bytes) -> None:
        with self._cond:
            while self._draining and self._bytes >= self._max and not self._gone:
                self._cond.wait()
            if self._gone:
                raise BrokenPipeError(f"the front has gone: {self._gone}")
            if self._draining:
                self._queue(frame)
                return
            try:
                n = self._sock.send(frame, socket.MSG_DONTWAIT)
            except BlockingIOError:
                n = 0
            if n == len(frame):
                return
            self._queue(memoryview(frame)[n:])
            self._draining = True
        if self._on_stall is not None:
            self._on_stall()
        try:
            threading.Thread(target=self._drain, name="outbound", daemon=True).start()
        except RuntimeError:  # no thread to be had: this sender writes, waiting as sendall did
            self._drain()

    def close(self) -> None:
        """Shut the socket down, so that a writer blocked on it returns, and close it."""
        # `on_stall` is usually a bound method of the owner, which holds this Outbound: a cycle
        # that only a full cyclic collection frees, and a worker runs one rarely. The owner
        # holds a front's arena (64 MiB of /dev/shm), so the cycle is broken here, where the
        # socket's life ends.
        self._on_stall = None
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _queue(self, rest: bytes | memoryview) -> None:
        self._backlog.append(rest)
        self._bytes += len(rest)

    def _drain(self) -> None:
        """The writer: send the backlog, blocking, until it is empty or the front is gone."""
        while True:
            with self._cond:
                if not self._backlog:
                    self._draining = False
                    return
                out = self._backlog[0] if len(self._backlog) == 1 else b"".join(self._backlog)
                self._backlog.clear()
                self._bytes = 0
                self._cond.notify_all()  # senders waiting on a full backlog
            try:
                self._sock.sendall(out)
            except OSError as exc:  # the front has gone: its calls with it
                with self._cond:
                    self._gone = str(exc) or type(exc).__name__
                    self._backlog.clear()
                    self._bytes = 0
                    self._draining = False
                    self._cond.notify_all()
                return
