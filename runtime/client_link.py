"""The front's sockets to the worker, as its event loop sees them: the link (every message) and
each direct channel (one batched version's calls), the frames written to them (`Outbox`) and
the frames read from them (`LinkReader`, `ChannelReader`).

runtime.client.RuntimeClient owns them and gets what they read through the callbacks it gives
them: a message, a link lost, a channel lost.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from runtime.ipc.protocol import FrameReader, InferDone, decode_worker

__all__ = ["ChannelReader", "DirectChannel", "LinkReader", "Outbox"]

log = logging.getLogger("runtime.client")

OnMessage = Callable[[object], None]


class Outbox:
    """A socket to the worker, and the frames written to it during this loop iteration: the
    concurrent requests of one iteration leave in one write (one syscall) when it ends. A
    frame sent `alone` (the only call in flight: nothing could join it) is written at once,
    unless frames wait before it: at concurrency 1 the worker gets it a loop turn earlier."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, transport: asyncio.Transport | None = None
    ) -> None:
        self.loop = loop
        self.transport = transport
        self._frames: list[bytes] = []

    def send(self, frame: bytes, alone: bool = False) -> None:
        if alone and not self._frames:
            self._write(frame)
            return
        if not self._frames:
            self.loop.call_soon(self.flush)
        self._frames.append(frame)

    def flush(self) -> None:
        out, self._frames = self._frames, []
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))

    def _write(self, data: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.write(data)

    def close(self) -> None:
        """Send what is written, then close."""
        if self.transport is not None:
            self.flush()
            self.transport.close()


class DirectChannel(Outbox):
    """A direct channel to one version: its socket and the calls sent on it and not
    answered yet."""

    def __init__(self, path: str, key: tuple[str, int], loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.path = path
        self.key = key
        self.calls: set[int] = set()
        self.lost = False
        self.retiring = False

    def retire(self) -> None:
        """No new calls come here; close once the ones sent are answered (closing earlier
        would leave their leases to a worker still writing into them)."""
        self.retiring = True
        if not self.calls:
            self.close()


class LinkReader(asyncio.Protocol):
    """Frames from the worker on the link: every complete frame of a read is handled in one
    callback, without a coroutine step per frame."""

    def __init__(
        self, on_message: OnMessage, on_lost: Callable[[BaseException | None], None]
    ) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.reader = FrameReader()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            for body in self.reader.frames(memoryview(data)):
                self.on_message(decode_worker(body))
        except Exception:
            log.exception("worker link protocol error")
            if self.transport is not None:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_lost(exc)


class ChannelReader(asyncio.Protocol):
    """Answers on a direct channel: InferDone only."""

    def __init__(
        self,
        chan: DirectChannel,
        on_message: OnMessage,
        on_lost: Callable[[DirectChannel], None],
    ) -> None:
        self.chan = chan
        self.on_message = on_message
        self.on_lost = on_lost
        self.reader = FrameReader()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport instances, but behave as one)
        self.chan.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        chan = self.chan
        try:
            for body in self.reader.frames(memoryview(data)):
                msg = decode_worker(body)
                if not isinstance(msg, InferDone):
                    raise ValueError(f"{type(msg).__name__} on a direct channel")
                chan.calls.discard(msg.call_id)
                self.on_message(msg)
        except Exception:
            log.exception("direct channel protocol error")
            if chan.transport is not None:
                chan.transport.close()
            return
        if chan.retiring and not chan.calls and chan.transport is not None:
            chan.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.chan.lost = True
        self.on_lost(self.chan)
