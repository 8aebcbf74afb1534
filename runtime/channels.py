"""Direct channels: a batched version's calls, sent by each front straight to the thread that
batches them.

A call that comes through its front's connection wakes two worker threads: the connection's
reader, which decodes it and queues it on the version's batcher, then the thread that batches
and runs it: a graph-served version's serving thread (onnxruntime keeps CUDA graphs in the
capturing thread, so the reader cannot replay them itself), or a plain batcher's thread. That
hop costs 17-25 us here and 42 us on an H100 VM (docs/gpu.md §12). A direct channel removes
it. The version listens on a Unix socket of its own, named in LoadDone; each front connects,
says `Attach(connection)` and sends that version's calls there (and the `Cancel` of one its
client gave up); the batching thread waits in `select` on those sockets and on a wake pipe
(`Waker`, the batcher's `Idle`), reads, queues, batches, runs and answers on the same socket.
Calls that still come through a reader (a front without the channel) wake it through the
pipe, and all of them batch together in the one queue. A plain version with several
instances has no channel: the instance reading it would hold the others back while it runs a
batch.

A version's channels outlive its instances: a reload (same name and version, new files) hands
them (`Channels.hand_to`) from the old instance's thread to the new one's, so the fronts keep
their sockets and what they send meanwhile waits in the socket for the new instance, never
read by one that is draining. Only the owner reads; answers may come from the old and the new
instance at once, and go out through one Outbound per channel. A version reloaded without
batching hands them to a thread of their own (runtime.worker), which runs what the fronts still
send there alone until each has gone back to its link and closed its end.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from runtime.engine.regions import RegionTable
from runtime.ipc.outbound import Outbound
from runtime.ipc.protocol import (
    MAX_FRAME,
    Attach,
    Cancel,
    FrameReader,
    Infer,
    InferDone,
    decode_front,
)
from runtime.ipc.protocol import encode as encode_frame

__all__ = ["Channel", "ChannelTable", "Channels", "Front", "Queue", "Waker"]

log = logging.getLogger("microtune.worker")


class Front(Protocol):
    """What a channel needs of the front it serves (the worker's Connection)."""

    regions: RegionTable | None

    def arena_buf(self) -> memoryview: ...

    def run_alone(self, call: Infer, received_ns: int, answer: Callable[[InferDone], None]) -> None:
        """Run `call` by itself on its version's lane (a call the batcher does not take)."""
        ...

    def stalled(self) -> None:
        """Count a stall of one of the front's sockets (its metrics report them)."""
        ...

    def cancel(self, msg: Cancel) -> None:
        """The front gave up a call it sent (here or on its link): drop it if still queued."""
        ...


# How a version queues a call read from one of its channels (Channel: the answer's way back
# and the front's arena), with the instant it was read.
Queue = Callable[[Infer, "Channel", int], None]


class Waker:
    """Where one serving thread waits between batches (runtime.engine.batcher.Idle): a wake
    pipe, plus the version's channels while this thread owns them."""

    def __init__(self, channels: Channels | None, queue: Queue) -> None:
        self.channels = channels
        self.queue = queue  # onto the instance's batcher
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._thread = 0  # the serving thread, once it waits

    def wait(self, timeout_s: float | None) -> None:
        self._thread = threading.get_ident()
        channels = self.channels
        fds = channels.fds(self) if channels is not None else []
        fds.append(self._r)
        try:
            ready, _, _ = select.select(fds, [], [], timeout_s)
        except ValueError:  # a descriptor above FD_SETSIZE: poll, with its 1 ms resolution
            ready = _poll(fds, timeout_s)
        except OSError:  # a channel closed under us (the worker stopping): look again
            return
        if self._r in ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._r, 4096)
            if len(ready) == 1:
                return
        if channels is not None:
            channels.read(self, ready)

    def wake(self) -> None:
        # The serving thread's own submits (calls it read from a channel) need no wake-up.
        if threading.get_ident() != self._thread and self._w >= 0:
            with contextlib.suppress(BlockingIOError):
                os.write(self._w, b"w")

    def close(self) -> None:
        r, w, self._r, self._w = self._r, self._w, -1, -1
        os.close(r)
        os.close(w)


def _poll(fds: list[int], timeout_s: float | None) -> list[int]:
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout_s is None else math.ceil(timeout_s * 1000)
    return [fd for fd, _ in poller.poll(ms)]


class Channel:
    """One front's socket to a version. A call's answer goes back here (`answer`, also
    named `send_quiet` as on the worker's Connection), its tensors are in `arena_buf()`."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = FrameReader(MAX_FRAME)
        self.front: Front | None = None
        # Answers may come from the old and the new instance at once (a reload), and never
        # wait for the front to read (runtime.ipc.outbound).
        self._out = Outbound(sock, on_stall=self._stalled)

    def answer(self, msg: InferDone) -> None:
        with contextlib.suppress(OSError):  # a front gone: its calls with it
            self._out.send(encode_frame(msg))

    send_quiet = answer

    def _stalled(self) -> None:
        front = self.front  # answers flow only once attached: a stall has its front
        if front is not None:
            front.stalled()

    def close(self) -> None:
        self._out.close()

    def arena_buf(self) -> memoryview:
        assert self.front is not None  # calls are queued only once the channel is attached
        return self.front.arena_buf()

    @property
    def regions(self) -> RegionTable | None:
        return None if self.front is None else self.front.regions


class Channels:
    """A version's listening socket and the fronts' channels to it."""

    def __init__(self, path: str, attach: Callable[[int], Front | None]) -> None:
        self.path = path
        self._attach = attach  # connection id (Welcome.connection) -> that front, if alive
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(path)
        self._listener.listen(64)
        self._lock = threading.Lock()
        self._owner: Waker | None = None
        self._channels: dict[int, Channel] = {}  # by file descriptor
        self._chunk = bytearray(1 << 20)
        self._view = memoryview(self._chunk)  # what each read's frames are decoded from
        self._closed = False

    def hand_to(self, owner: Waker | None) -> None:
        """From now on only `owner`'s thread reads the channels (None: nobody)."""
        with self._lock:
            self._owner = owner
        if owner is not None:
            owner.wake()  # it waits on its pipe alone until it owns them

    def attached(self) -> bool:
        """Whether some front still has a channel open here."""
        with self._lock:
            return bool(self._channels)

    def fds(self, waker: Waker) -> list[int]:
        """What `waker`'s thread waits on besides its pipe."""
        with self._lock:
            if self._owner is not waker or self._closed:
                return []
            return [self._listener.fileno(), *self._channels]

    def read(self, waker: Waker, ready: list[int]) -> None:
        """On the owner's thread, after `select`: accept fronts, read and queue their calls."""
        with self._lock:
            if self._owner is not waker or self._closed:
                return  # handed over meanwhile: the new owner reads
            for fd in ready:
                if fd == self._listener.fileno():
                    self._accept()
                    continue
                chan = self._channels.get(fd)
                if chan is not None:
                    self._read(chan, waker)

    def close(self) -> None:
        """Stop reading, close every channel (a front sees it end) and the listener."""
        with self._lock:
            self._owner = None
            self._closed = True
            for chan in self._channels.values():
                chan.close()
            self._channels.clear()
            self._listener.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # No descriptor left (EMFILE), no memory: the front's connection waits in the
            # listen backlog (what it sends there is read once a descriptor is free) and this
            # thread keeps serving the rest. The listener stays readable: wait a little
            # rather than spin on it.
            log.warning("direct channel %s: accept failed: %s", self.path, exc)
            time.sleep(0.01)
            return
        self._channels[sock.fileno()] = Channel(sock)

    def _read(self, chan: Channel, waker: Waker) -> None:
        try:
            n = chan.sock.recv_into(self._chunk, 0, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("direct channel closed: %s", exc)
            n = 0
        if n == 0:
            self._drop(chan)
            return
        received = time.monotonic_ns()
        try:
            for body in chan.reader.frames(self._view[:n]):
                msg = decode_front(body)
                if isinstance(msg, Infer) and chan.front is not None:
                    waker.queue(msg, chan, received)
                elif isinstance(msg, Cancel) and chan.front is not None:
                    # After the call it names, on this socket: queued by now, unless it ran.
                    chan.front.cancel(msg)
                elif isinstance(msg, Attach) and chan.front is None:
                    chan.front = self._attach(msg.connection)
                    if chan.front is None:
                        # Its front left (or never was) before the channel said whose it is:
                        # not an error of the protocol; the front's calls went with it.
                        log.info("direct channel for gone front connection %d", msg.connection)
                        self._drop(chan)
                        return
                else:
                    raise ValueError(f"{type(msg).__name__} on a direct channel")
        except Exception:
            log.exception("direct channel protocol error; closing it")
            self._drop(chan)

    def _drop(self, chan: Channel) -> None:
        self._channels.pop(chan.sock.fileno(), None)
        chan.close()


class ChannelTable:
    """The worker's direct channels, by (model, version): sockets named `<base>.<n>`."""

    def __init__(self, base: str, attach: Callable[[int], Front | None]) -> None:
        self._base = base
        self._attach = attach
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, int], Channels] = {}
        self._n = 0

    def get(self, key: tuple[str, int]) -> Channels | None:
        with self._lock:
            return self._by_key.get(key)

    def open(self, key: tuple[str, int]) -> Channels | None:
        """`key`'s channels, listening from now on (made if need be); None when its socket
        cannot be made: the fronts' calls then come through their links."""
        with self._lock:
            found = self._by_key.get(key)
            if found is not None:
                return found
            self._n += 1
            path = f"{self._base}.{self._n}"
            try:
                made = self._by_key[key] = Channels(path, self._attach)
            except OSError as exc:  # e.g. a path longer than a Unix socket's 107 bytes
                log.warning("no direct channel for %s version %d (%s)", *key, exc)
                return None
            return made

    def pop(self, key: tuple[str, int]) -> Channels | None:
        with self._lock:
            return self._by_key.pop(key, None)

    def close_all(self) -> None:
        with self._lock:
            taken, self._by_key = list(self._by_key.values()), {}
        for channels in taken:
            channels.close()
