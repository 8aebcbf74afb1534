"""The front's side of the worker link: an asyncio client over the worker's Unix socket.

Owns the front's shared-memory arena and slot pool. `infer` leases a run of slots, copies the
inputs into it (the one host copy of a request's tensors), sends an Infer message, and awaits
InferDone. A lease is returned only once the worker can no longer write to it: on its reply, or
when the worker is known dead. If the link drops, every pending call fails with WorkerGone. A
call whose caller is cancelled before the reply is named to the worker in a Cancel: still
queued there, it is dropped and answered at once (its lease comes back then), never computed.

A batched version served by one thread (from CUDA graphs, or a plain batcher with one
instance) has a direct channel (`LoadDone.channel`, runtime.channels): a second socket, read by
that thread, where its calls go instead of the link. The client opens it when the load answers
and closes it on unload.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import ClassVar

import msgspec

from runtime.client_link import ChannelReader, DirectChannel, LinkReader, Outbox
from runtime.ipc.file_slice import FileSlice
from runtime.ipc.protocol import (
    PROTOCOL_VERSION,
    Attach,
    Cancel,
    CloseRegion,
    Code,
    FrontMessage,
    GetStatus,
    Hello,
    Infer,
    InferDone,
    LoadDone,
    LoadModel,
    OpenRegion,
    OutputRequest,
    RegionDone,
    TensorRef,
    Timings,
    UnloadDone,
    UnloadModel,
    Welcome,
    WorkerStatus,
    encode,
)
from runtime.ipc.shm import Arena, Lease, SlotPool, align_up

__all__ = [
    "ArenaFull",
    "CallFailed",
    "InferResult",
    "OutputTensor",
    "PreparedInput",
    "RuntimeClient",
    "WorkerGone",
]

_NS_MAX = 2**63 - 1
_CODE_OK = Code.OK  # per call: an Enum member read through its class costs ~1k instructions

log = logging.getLogger(__name__)


class WorkerGone(Exception):
    """The worker process died or the link to it broke."""


class CallFailed(Exception):
    """The worker answered a call with a non-OK code."""

    def __init__(self, code: Code, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ArenaFull(Exception):
    """No run of free slots large enough appeared before the call's deadline."""


class PreparedInput(msgspec.Struct, frozen=True):
    name: str
    datatype: str
    shape: tuple[int, ...]
    payload: bytes | memoryview | FileSlice  # the tensor in KServe raw form
    # Not a field: the request path builds a PreparedInput per tensor, so the fewer fields
    # the better. RegionInput sets it.
    region: ClassVar[str] = ""


class RegionInput(PreparedInput, frozen=True):
    """An input in a client CUDA shared-memory region, at [offset, offset + nbytes) of it
    (payload empty: the worker reads it on the device)."""

    region: str = ""  # type: ignore[misc]  # a field here, the base's ClassVar elsewhere
    offset: int = 0
    nbytes: int = 0


OutputSink = Callable[[str, int], "FileSlice | None"]


class OutputTensor(msgspec.Struct, frozen=True):
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes
    inline: bool  # True when it came back in the message (slow path)
    region_nbytes: ClassVar[int | None] = None  # (not a field: see PreparedInput.region)


class RegionOutput(OutputTensor, frozen=True):
    """An output already in the client's region (data empty): written there by the worker (CUDA)
    or copied there from the arena by `infer` (system, through its `output_sink`)."""

    region_nbytes: int = 0  # type: ignore[misc]


class InferResult(msgspec.Struct, frozen=True):
    outputs: tuple[OutputTensor, ...]
    timings: Timings


class RuntimeClient:
    def __init__(self, socket_path: str, arena: Arena, pool: SlotPool, frontend_id: int) -> None:
        self.socket_path = socket_path
        self.arena = arena
        self.pool = pool
        self.frontend_id = frontend_id
        self.welcome: Welcome | None = None
        self._link: Outbox | None = None  # the link's socket, once connected
        # The loop of `connect`, kept: on Python 3.11, asyncio.get_running_loop() makes a
        # getpid() system call each time, and the request path would make two per call.
        self._loop: asyncio.AbstractEventLoop  # set by connect()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[object]] = {}
        self._leases: dict[int, Lease] = {}
        self._wanted: dict[tuple[str, ...], tuple[OutputRequest, ...]] = {}
        self._space_waiters: list[asyncio.Future[None]] = []
        self._on_lost: Callable[[], None] | None = None
        self._channels: dict[tuple[str, int], DirectChannel] = {}  # direct channels, by version
        self.closed = True
        self.inline_outputs = 0  # counted slow path: outputs that did not fit the reservation
        self.direct_calls = 0  # calls sent on a direct channel
        # Calls whose caller gave up before the answer, by call id: (model, version). The
        # worker counts each execution on one call of its batch (Timings.executions); when
        # that call is one of these, `on_orphan_execution` is told, so statistics still count
        # the execution the other calls of the batch shared.
        self._orphans: dict[int, tuple[str, int]] = {}
        self.on_orphan_execution: Callable[[str, int, Timings], None] | None = None

    async def connect(self, on_lost: Callable[[], None] | None = None) -> Welcome:
        loop = self._loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(
            lambda: LinkReader(self._on_message, self._lost), self.socket_path
        )
        self._link = Outbox(loop, transport)
        self._on_lost = on_lost
        self.closed = False
        fut = self._expect(0)
        self._send(Hello(PROTOCOL_VERSION, self.frontend_id, self.arena.name, self.arena.size))
        welcome = await asyncio.wait_for(fut, 30)
        assert isinstance(welcome, Welcome)
        self.welcome = welcome
        return welcome

    async def close(self) -> None:
        self.closed = True
        self._close_channels()
        if self._link is not None:
            self._link.close()
            await asyncio.sleep(0)  # let connection_lost run
        self._fail_all(WorkerGone("link closed"))

    async def load(self, msg: LoadModel) -> LoadDone:
        fut = self._expect(msg.request_id)
        self._send(msg)
        done = await fut
        assert isinstance(done, LoadDone)
        key = (msg.name, msg.version)
        if done.code == Code.OK and done.channel:
            await self._open_channel(key, done.channel)
        elif done.code == Code.OK and key in self._channels:
            self._channels.pop(key).retire()  # reloaded without one: back to the link
        return done

    async def unload(self, name: str, version: int) -> None:
        rid = self.next_request_id()
        fut = self._expect(rid)
        self._send(UnloadModel(rid, name, version))
        await fut
        chan = self._channels.pop((name, version), None)
        if chan is not None:
            chan.retire()

    async def status(self) -> WorkerStatus:
        """What the worker holds for this front: its calls waiting in batcher queues, its
        arena's pinned bytes (runtime.ipc.protocol.WorkerStatus)."""
        rid = self.next_request_id()
        fut = self._expect(rid)
        self._send(GetStatus(rid))
        done = await fut
        assert isinstance(done, WorkerStatus)
        return done

    async def open_region(
        self, name: str, handle: bytes, device_id: int, byte_size: int
    ) -> RegionDone:
        """Have the worker open a client CUDA shared-memory region's IPC handle."""
        rid = self.next_request_id()
        fut = self._expect(rid)
        self._send(OpenRegion(rid, name, handle, device_id, byte_size))
        done = await fut
        assert isinstance(done, RegionDone)
        return done

    async def close_region(self, name: str) -> None:
        """Have the worker close a region ("" = all of this front's) once no call uses it."""
        rid = self.next_request_id()
        fut = self._expect(rid)
        self._send(CloseRegion(rid, name))
        await fut

    def next_request_id(self) -> int:
        return next(self._ids)

    async def infer(
        self,
        name: str,
        version: int,
        inputs: Sequence[PreparedInput],
        outputs: Sequence[str],
        output_reserve: int,
        deadline: float | None,
        span: bytes = b"",
        output_regions: Mapping[str, tuple[str, int, int]] | None = None,
        output_sink: OutputSink | None = None,
    ) -> InferResult:
        """Run one call. `deadline` is a time.monotonic() value or None. `output_regions`:
        outputs the worker writes into client CUDA shared memory, name -> (region, offset,
        byte size); inputs with `region` set are read there (no arena bytes for either).
        `output_sink(name, nbytes)`: where an arena output goes instead of a bytes copy (a
        client system region), or None; asked as the output is read out, so what it checks
        holds when the bytes land."""
        if self.closed:
            raise WorkerGone("worker is not connected")
        need = 0
        for t in inputs:
            need += align_up(len(t.payload))
        # The reserve is where outputs go when they fit; what does not fit travels inline in
        # the answer. So only the inputs must fit the arena: a reserve (the front's guess for
        # outputs of unknown size, say) that would not fit beside them shrinks to what does.
        need += min(align_up(output_reserve), max(self.pool.capacity - need, 0))
        lease = self.pool.try_lease(need) or await self._wait_for_space(need, deadline)
        call_id = next(self._ids)
        released = False
        try:
            buf = self.arena.buf
            pos = lease.offset
            refs: list[TensorRef] = []
            bound = bool(output_regions)
            for t in inputs:
                if t.region:
                    refs.append(
                        TensorRef(t.name, t.datatype, t.shape, t.offset, t.nbytes, t.region)
                    )
                    bound = True
                    continue
                payload = t.payload
                n = len(payload)
                if type(payload) is FileSlice:  # a client system region: read, never mapped
                    payload.readinto(buf[pos : pos + n])
                else:
                    buf[pos : pos + n] = payload
                refs.append(TensorRef(t.name, t.datatype, t.shape, pos, n))
                pos += align_up(n)
            # (capped: the wire's int64 holds ~292 years; a client's "no timeout" is larger)
            deadline_ns = min(int(deadline * 1e9), _NS_MAX) if deadline is not None else 0
            if output_regions:
                wanted = tuple(
                    OutputRequest(o, *output_regions[o])
                    if o in output_regions
                    else OutputRequest(o)
                    for o in outputs
                )
            else:
                key = tuple(outputs)  # (the same object when it is a tuple)
                wanted = self._wanted.get(key) or self._plain_outputs(key)
            msg = Infer(
                call_id,
                name,
                version,
                tuple(refs),
                wanted,
                pos,
                lease.offset + lease.size - pos,
                deadline_ns,
                span,
                bound,
            )
            fut = self._expect(call_id)
            self._leases[call_id] = lease
            chan = self._channels.get((name, version)) if self._channels else None
            alone = len(self._pending) == 1  # this call's: no other one could share its write
            if chan is None:
                self._send(msg, alone)
            else:
                chan.send(encode(msg), alone)
                chan.calls.add(call_id)
                self.direct_calls += 1
            released = True  # from here the reader returns the lease
            try:
                if deadline is None:
                    done = await fut
                else:
                    done = await asyncio.wait_for(fut, max(deadline - time.monotonic(), 0.0))
            except BaseException as exc:
                if fut.done() and not fut.cancelled():
                    # Answered as the deadline or a cancellation hit: the reader left the
                    # lease to this call, which must return it.
                    self._release_call(call_id)
                    if fut.exception() is None:  # (not failed by a lost link meanwhile)
                        answer = fut.result()
                        if isinstance(answer, InferDone):
                            self._orphan_answered(name, version, answer)
                else:
                    # Not answered yet (wait_for may already have cancelled it): the reader
                    # returns the lease when the worker's answer arrives.
                    fut.cancel()
                    self._orphans[call_id] = (name, version)
                    if isinstance(exc, asyncio.CancelledError):
                        # Its client cancelled it (or grpc did, at its deadline): a call
                        # still queued in the worker is dropped and answered at once. (A
                        # deadline of ours the worker knows: it expires the call itself.)
                        self._give_up(Cancel(call_id, name, version), chan)
                raise
        finally:
            if not released:  # never sent (a link or channel gone): nobody else returns it
                self._pending.pop(call_id, None)
                self._leases.pop(call_id, None)
                self._release(lease)
        assert isinstance(done, InferDone)
        try:
            if done.code != _CODE_OK:
                raise CallFailed(done.code, done.message)
            out: list[OutputTensor] = []
            for o in done.outputs:
                if o.region:
                    out.append(RegionOutput(o.name, o.datatype, o.shape, b"", False, o.nbytes))
                elif o.inline is not None:
                    self.inline_outputs += 1
                    out.append(OutputTensor(o.name, o.datatype, o.shape, o.inline, True))
                elif output_sink and (sink := output_sink(o.name, o.nbytes)) is not None:
                    sink.write(buf[o.offset : o.offset + o.nbytes])  # the only copy
                    out.append(RegionOutput(o.name, o.datatype, o.shape, b"", False, o.nbytes))
                else:
                    data = bytes(buf[o.offset : o.offset + o.nbytes])
                    out.append(OutputTensor(o.name, o.datatype, o.shape, data, False))
        finally:
            # The worker has answered (OK or not) and the outputs are copied out: the slots can
            # go back now. A failed call must return them too, or every error leaks its lease.
            self._release_call(call_id)
        return InferResult(tuple(out), done.timings or Timings())

    # ------------------------------------------------------------------ internals

    async def _open_channel(self, key: tuple[str, int], path: str) -> None:
        """Send `key`'s calls on its direct channel at `path` from now on (a reload names the
        same one: kept). A channel that cannot be opened leaves the calls on the link."""
        old = self._channels.get(key)
        if old is not None and old.path == path and not old.lost:
            return
        assert self.welcome is not None
        chan = DirectChannel(path, key, self._loop)
        try:
            await self._loop.create_unix_connection(
                lambda: ChannelReader(chan, self._on_message, self._channel_lost), path
            )
        except OSError as exc:
            log.warning("no direct channel to %s version %d (%s): calls take the link", *key, exc)
            return
        if self.closed:
            chan.retire()
            return
        chan.send(encode(Attach(self.welcome.connection)))
        self._channels[key] = chan
        if old is not None:
            old.retire()

    def _give_up(self, msg: Cancel, chan: DirectChannel | None) -> None:
        """Tell the worker that nobody waits for a call any more, on the socket the call took
        (`chan`, or the link): it reads the Cancel after the call."""
        frame = encode(msg)
        if chan is not None:
            chan.send(frame)
        elif self._link is not None and not self.closed:
            self._link.send(frame)

    def _channel_lost(self, chan: DirectChannel) -> None:
        """The worker closed a direct channel: it died (its channels may end before its link
        does), or the version was unloaded (the fronts drain their calls first). Calls still
        in the channel were never read, so their leases can go back."""
        if self._channels.get(chan.key) is chan:
            del self._channels[chan.key]
        name, version = chan.key
        self._fail(
            chan.calls, WorkerGone(f"its channel for model '{name}' version {version} closed")
        )
        chan.calls.clear()

    def _close_channels(self) -> None:
        channels, self._channels = list(self._channels.values()), {}
        for chan in channels:
            chan.retire()

    def _plain_outputs(self, outputs: tuple[str, ...]) -> tuple[OutputRequest, ...]:
        """The OutputRequests of `outputs` (arena outputs), kept: clients repeat them."""
        wanted = tuple(OutputRequest(o) for o in outputs)
        if len(self._wanted) >= 256:  # bounded whatever the clients ask
            self._wanted.clear()
        self._wanted[outputs] = wanted
        return wanted

    def _expect(self, key: int) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = self._loop.create_future()
        self._pending[key] = fut
        return fut

    def _send(self, msg: FrontMessage, alone: bool = False) -> None:
        link = self._link
        if link is None or self.closed:
            raise WorkerGone("worker is not connected")
        link.send(encode(msg), alone)

    def _on_message(self, msg: object) -> None:
        if isinstance(msg, InferDone):
            key = msg.call_id
            fut = self._pending.pop(key, None)
            if fut is None or fut.done():
                # The caller gave up (deadline, cancellation): nobody copies outputs out.
                self._release_call(key)
                orphan = self._orphans.pop(key, None)
                if orphan is not None:
                    self._orphan_answered(*orphan, msg)
                return
            fut.set_result(msg)
            return
        if isinstance(msg, Welcome):
            key = 0
        elif isinstance(msg, LoadDone | UnloadDone | WorkerStatus | RegionDone):
            key = msg.request_id
        else:  # pragma: no cover - the union is closed
            return
        fut = self._pending.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _orphan_answered(self, name: str, version: int, done: InferDone) -> None:
        t = done.timings  # (None in an answer that ran nothing: a deadline, an error)
        if t is None or not t.executions or self.on_orphan_execution is None:
            return
        try:
            self.on_orphan_execution(name, version, t)
        except Exception:  # statistics must never break the link's reader
            log.exception("counting an abandoned call's execution failed")

    def _lost(self, exc: BaseException | None) -> None:
        if not self.closed and exc is not None:
            log.warning("worker link lost: %s", exc)
        elif not self.closed:
            log.warning("worker link lost: the worker closed the connection")
        self.closed = True
        self._close_channels()
        self._fail_all(WorkerGone("worker process exited"))
        if self._on_lost is not None:
            self._on_lost()

    def _fail_all(self, exc: Exception) -> None:
        self._fail(list(self._pending), exc)

    def _fail(self, keys: Iterable[int], exc: Exception) -> None:
        """Fail what waits on `keys` (calls, requests) with `exc`, and return the calls'
        leases: the worker will never write into them (dead, or it never read the calls)."""
        for key in keys:
            self._orphans.pop(key, None)
            fut = self._pending.pop(key, None)
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: callers may have gone
            self._release_call(key)

    def _release_call(self, call_id: int) -> None:
        lease = self._leases.pop(call_id, None)
        if lease is not None:
            self._release(lease)

    def _release(self, lease: Lease) -> None:
        self.pool.release(lease)
        waiters, self._space_waiters = self._space_waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    async def _wait_for_space(self, need: int, deadline: float | None) -> Lease:
        if self.pool.slots_for(need) > self.pool.slots:
            raise ArenaFull(
                f"request needs {need} bytes of shared memory; the arena holds {self.pool.capacity}"
            )
        limit = time.monotonic() + 5.0 if deadline is None else deadline
        while True:
            lease = self.pool.try_lease(need)
            if lease is not None:
                return lease
            remaining = limit - time.monotonic()
            if remaining <= 0:
                if deadline is not None:  # the caller's own deadline ran out first
                    raise TimeoutError("deadline expired waiting for shared-memory slots")
                raise ArenaFull("shared-memory slots are all in use")
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._space_waiters.append(waiter)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(waiter, remaining)
