"""One front process's connection to the worker: its arena, its socket, its reader thread.

The reader decodes every complete frame of a `recv` and acts on it: a call known to be short
(runtime.engine.inline_gate) runs right there (its answer leaves with the read's other answers
in one write), a batched call goes to its model's batcher, any other to its version's lane of
threads (runtime.lanes; a Cancel takes a call still waiting in either out: `Connection.cancel`);
loads get a thread of their own, and unloads and client CUDA region (un)registrations run in
order on the connection's control thread, because they take the device lock, which a load or a
capture holds for seconds.
When the front goes, its regions, its arena's pinning and the arena itself are released here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from runtime.engine.batcher import Batcher, BatcherClosed, Pending, QueueFull
from runtime.engine.graph_model import queue_call
from runtime.engine.regions import RegionError, RegionTable
from runtime.ipc.outbound import Outbound
from runtime.ipc.pinning import CudaError, PinnedRegion, pin_arena
from runtime.ipc.protocol import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Cancel,
    CloseRegion,
    Code,
    FrameReader,
    GetStatus,
    Hello,
    Infer,
    InferDone,
    LoadDone,
    LoadModel,
    OpenRegion,
    QueuedCalls,
    RegionDone,
    Shutdown,
    UnloadDone,
    UnloadModel,
    Welcome,
    WorkerStatus,
    decode_front,
    encode,
)
from runtime.ipc.shm import Arena

if TYPE_CHECKING:
    from runtime.engine.model import LoadedModel
    from runtime.worker import Worker

__all__ = ["Connection", "Queued"]

log = logging.getLogger("microtune.worker")

# What a queued call carries to the batch thread: where it came from and is answered (its
# Connection, or its direct channel: anything with arena_buf() and send_quiet()), the call,
# when it arrived.
Queued = tuple[Any, Infer, int]


class Connection:
    """One front process: its arena and its socket."""

    def __init__(self, worker: Worker, sock: socket.socket, id: int = 0) -> None:
        self.worker = worker
        self.sock = sock
        self.id = id  # named in Welcome; a direct channel's Attach names it (runtime.channels)
        # Answers never wait for this front to read (see there); the times its socket or one of
        # its direct channels was full are counted for its metrics (WorkerStatus.send_stalls).
        self.send_stalls = 0
        self._stalls_lock = threading.Lock()
        self._out = Outbound(sock, on_stall=self.stalled)
        self.arena: Arena | None = None
        self.pinned: PinnedRegion | None = None
        io = worker.region_io
        self.regions = None if io is None else RegionTable(*io)
        self._reader = 0  # thread id of the reader, once it runs
        self._collect: list[bytes] | None = None
        # Unloads and region (un)registrations take the device lock, which a load or a capture
        # holds for seconds: they run here, in order, while the reader goes on reading.
        self._control = ThreadPoolExecutor(1, thread_name_prefix="control")
        # This front's calls waiting for a thread of their version's lane (call id -> their
        # answer's way back, None = this connection; and their version, for the status):
        # whichever of the lane thread and a Cancel pops a call first has it (dict.pop is
        # atomic), so a cancelled call is answered once and never runs.
        self._alone: dict[int, tuple[Callable[[InferDone], None] | None, tuple[str, int]]] = {}

    def send(self, msg: Any) -> None:
        frame = encode(msg)
        if self._collect is not None and threading.get_ident() == self._reader:
            # Answers of calls run inline while handling one read leave in one write.
            self._collect.append(frame)
            return
        self._out.send(frame)

    def _flush(self) -> None:
        out, self._collect = self._collect, None
        if out:
            self._out.send(out[0] if len(out) == 1 else b"".join(out))

    def stalled(self) -> None:
        """One of this front's sockets was full: an answer waits for a writer thread."""
        with self._stalls_lock:  # the link's and the direct channels' senders
            self.send_stalls += 1

    def send_quiet(self, msg: Any) -> None:
        """Send, ignoring a front that has gone (its calls die with it)."""
        with contextlib.suppress(OSError):
            self.send(msg)

    def arena_buf(self) -> memoryview:
        if self.arena is None:
            raise RuntimeError("no arena: Hello not received")
        return self.arena.buf

    def run(self) -> None:
        try:
            self._loop()
        except (ConnectionError, OSError) as exc:
            log.info("front connection closed: %s", exc)
        except Exception:
            log.exception("protocol error; closing the connection")
        finally:
            self._out.close()
            self._control.shutdown(wait=True)  # an (un)registration under way ends first
            self.worker.release(self)
            if self.regions is not None:
                with self.worker.device_lock:
                    self.regions.close()
            if self.pinned is not None:
                with self.worker.device_lock:
                    self.pinned.close()
            if self.arena is not None:
                # The front is gone or done: nothing else will unlink its arena. The mapping
                # is not closed here but goes with its last reference: calls of this front
                # still queued in a batcher hold a view of it, and run to their end (their
                # answers go nowhere) rather than fail the batch they share with other fronts'
                # calls on a released buffer.
                self.arena.unlink()

    def _loop(self) -> None:
        # Read what is there (up to 1 MiB) and handle every complete frame of it: under load
        # one recv carries many calls, instead of two recv syscalls per call. Frames are
        # decoded from the read chunk itself (FrameReader), which the next recv reuses.
        reader = FrameReader(MAX_FRAME)
        chunk = bytearray(1 << 20)
        view = memoryview(chunk)
        self._reader = threading.get_ident()
        while True:
            n = self.sock.recv_into(chunk)
            if n == 0:
                return
            self._collect = []
            try:
                for body in reader.frames(view[:n]):
                    if not self._handle(decode_front(body)):
                        return
            finally:
                self._flush()

    def _handle(self, msg: Any) -> bool:
        """Act on one message; False ends the connection."""
        if isinstance(msg, Infer):
            self._dispatch(msg, time.monotonic_ns())
        elif isinstance(msg, Cancel):
            self.cancel(msg)
        elif isinstance(msg, Hello):
            self._hello(msg)
        elif isinstance(msg, LoadModel):
            threading.Thread(target=self._load, args=(msg,), daemon=True).start()
        elif isinstance(msg, UnloadModel):
            self._control.submit(self._answer, self._unload, msg)
        elif isinstance(msg, GetStatus):
            self.send(self._status(msg))
        elif isinstance(msg, OpenRegion | CloseRegion):
            self._control.submit(self._answer, self._region, msg)
        elif isinstance(msg, Shutdown):
            self.worker.stopping.set()
            return False
        return True

    def _hello(self, msg: Hello) -> None:
        if msg.version != PROTOCOL_VERSION:
            raise ValueError(f"front speaks protocol {msg.version}, worker {PROTOCOL_VERSION}")
        self.arena = Arena(msg.arena_name, msg.arena_size, create=False)
        if self.worker.device.startswith("cuda"):
            self._pin()
        import onnxruntime as ort

        self.send(
            Welcome(
                PROTOCOL_VERSION,
                os.getpid(),
                self.worker.device,
                tuple(ort.get_available_providers()),
                self.id,
            )
        )

    def _status(self, msg: GetStatus) -> WorkerStatus:
        """This front's calls waiting in batcher queues or for a thread of their version's
        lane, and its arena's pinned bytes. Counted on the reader thread: a pass over queues
        that are short unless the worker is behind."""
        plain, graphs = self.worker.batchers_now()
        counts = Counter(key for _, key in list(self._alone.values()))  # (a copy: lanes pop)
        for key, b in plain:
            counts[key] += b.count_queued(self._mine)
        for key, b in graphs:
            counts[key] += b.count_queued(self._mine_graph)
        pinned = self.pinned
        return WorkerStatus(
            msg.request_id,
            tuple(QueuedCalls(name, v, n) for (name, v), n in counts.items() if n),
            0 if pinned is None or pinned.closed else pinned.size,
            self.send_stalls,
        )

    def _answer(self, act: Callable[[Any], Any], msg: Any) -> None:
        """On the control thread: act on `msg` and send the answer."""
        try:
            answer = act(msg)
        except Exception:
            log.exception("%s failed", type(msg).__name__)
            answer = (
                UnloadDone(msg.request_id)
                if isinstance(msg, UnloadModel)
                else RegionDone(msg.request_id, Code.INTERNAL, "internal error; see the worker log")
            )
        self.send_quiet(answer)

    def _region(self, msg: OpenRegion | CloseRegion) -> RegionDone:
        """Register or unregister a client CUDA shared-memory region, on the control thread
        (in the order they came; calls sent after the answer find it), under the device lock:
        opening an IPC handle during another version's graph capture would break that capture."""
        regions = self.regions
        if regions is None:
            return RegionDone(
                msg.request_id, Code.UNSUPPORTED, "this server's worker has no CUDA device"
            )
        if isinstance(msg, CloseRegion):
            with self.worker.device_lock:
                regions.unregister(msg.name)
            return RegionDone(msg.request_id, Code.OK)
        if msg.device_id != self.worker.device_id:
            return RegionDone(
                msg.request_id,
                Code.BAD_INPUT,
                f"CUDA shared memory region '{msg.name}' is on device {msg.device_id}; "
                f"this server's worker runs on {self.worker.device}",
            )
        try:
            with self.worker.device_lock:
                regions.register(msg.name, msg.handle, msg.device_id, msg.byte_size)
        except RegionError as exc:
            return RegionDone(msg.request_id, Code.BAD_INPUT, str(exc))
        return RegionDone(msg.request_id, Code.OK)

    def _pin(self) -> None:
        """Page-lock the front's arena so host-to-device copies from it are plain DMA."""
        assert self.arena is not None
        try:
            with self.worker.device_lock:
                self.pinned = pin_arena(self.arena.buf, device_id=self.worker.device_id)
        except (CudaError, ValueError) as exc:
            log.warning(
                "arena %s stays pageable (%s): copies to the GPU get slower", self.arena.name, exc
            )

    def _load(self, msg: LoadModel) -> None:
        try:
            done = self.worker.load(msg, self)
        except Exception as exc:  # answered whatever failed: the front's load has no timeout
            log.exception("loading %s version %d failed", msg.name, msg.version)
            done = LoadDone(msg.request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        self.send_quiet(done)  # a front that left meanwhile has nobody to read it

    def _unload(self, msg: UnloadModel) -> UnloadDone:
        return self.worker.unload(msg, self)

    def _dispatch(self, call: Infer, received_ns: int) -> None:
        """Batched models queue the call on their batcher (answered by its thread); others
        run it inline or on their version's lane."""
        key = (call.name, call.version)
        graph_model = self.worker.graph_models.get(key)
        if graph_model is not None and self.arena is not None:
            buf = self.arena.buf
            queue_call(
                graph_model,
                call,
                self.send_quiet,
                buf,
                self.regions,
                received_ns,
                lambda: self.worker.graph_models.get(key),
            )
            return
        batcher = self.worker.batchers.get((call.name, call.version))
        if batcher is not None and call.bound:
            batcher = None  # bound in place (runtime.engine.bound): runs alone, never inline
        if batcher is None:
            model = self.worker.models.get((call.name, call.version))
            gate = None if model is None or call.bound else model.inline
            del model  # never the last reference to a replaced version here (see _infer)
            lock = self.worker.gpu_lock
            # A call known to be short (runtime.engine.inline_gate) runs right here: a hop to
            # a lane thread (thread wake-up, GIL handoff) would cost more than the model
            # itself. But on a GPU, a load or a graph capture may hold the device for seconds:
            # the reader never waits for it, or every call of this front (other models'
            # included) would stop behind this one. A lane thread waits instead.
            if (
                gate is not None
                and gate.admits(call)
                and (lock is None or lock.acquire(blocking=False))
            ):
                cpu = time.thread_time_ns()
                try:
                    self._infer(call, received_ns)
                finally:
                    if lock is not None:
                        lock.release()
                    gate.ran_inline(time.thread_time_ns() - cpu, call)
            else:
                self.run_alone(call, received_ns)
            return
        queue_batched(batcher, call, self, received_ns, lambda: self.run_alone(call, received_ns))

    def run_alone(
        self, call: Infer, received_ns: int, answer: Callable[[InferDone], None] | None = None
    ) -> None:
        """Run `call` by itself on its version's lane (runtime.lanes), answered through
        `answer` (a direct channel's: runtime.channels) or on this connection. A version
        without a lane is not loaded (or no longer): answered so at once."""
        key = (call.name, call.version)
        self._alone[call.call_id] = (answer, key)
        if self.worker.queue_alone(key, self._run_queued, call, received_ns, answer):
            return
        if self._alone.pop(call.call_id, None) is not None:
            (answer or self.send_quiet)(_not_loaded(call))

    def _run_queued(
        self,
        accepted: list[LoadedModel | None],
        call: Infer,
        received_ns: int,
        answer: Callable[[InferDone], None] | None,
    ) -> None:
        """A lane thread's turn for `call`, on the instance it was queued for (`accepted`:
        Worker.queue_alone)."""
        if self._alone.pop(call.call_id, None) is None:
            # Cancelled while it waited, and answered then. The instance goes under the GPU
            # lock: it may be the last reference to a version replaced meanwhile (_infer).
            with self.worker.gpu_lock or contextlib.nullcontext():
                accepted.clear()
            return
        self._infer(call, received_ns, answer, accepted)

    def cancel(self, msg: Cancel) -> None:
        """This front gave call `msg.call_id` up (its client cancelled). Still waiting in its
        version's batcher or for a lane thread, it is answered CANCELLED now, which frees its
        queue place and the front's arena lease, and never runs; already running (or never
        seen), nothing changes: a run is not interrupted, and its answer returns the lease.
        Read on the reader of the socket the call came on, after the call."""
        call_id = msg.call_id
        done = InferDone(call_id, Code.CANCELLED, "cancelled by the client while queued")
        key = (msg.name, msg.version)
        graph_model = self.worker.graph_models.get(key)
        if graph_model is not None:
            taken = graph_model.batcher.cancel(call_id, self._mine_graph)
            if taken is not None:
                taken.payload[0](done)
                return
        batcher = self.worker.batchers.get(key)
        if batcher is not None:
            found = batcher.cancel(call_id, self._mine)
            if found is not None:
                found.payload[0].send_quiet(done)
                return
        waiting = self._alone.pop(call_id, None)
        if waiting is not None:
            (waiting[0] or self.send_quiet)(done)

    def _mine(self, queued: Queued) -> bool:
        """Whether a plain batcher's queued call is this front's: it carries this connection,
        or the direct channel it came on (runtime.channels)."""
        sender = queued[0]
        return sender is self or getattr(sender, "front", None) is self

    def _mine_graph(self, queued: Any) -> bool:
        """Whether a graph version's queued call is this front's: it carries an answer
        callback (ours or a direct channel's) and this front's arena, not this connection."""
        return self.arena is not None and queued[2] is self.arena.buf

    def _infer(
        self,
        call: Infer,
        received_ns: int,
        answer: Callable[[InferDone], None] | None = None,
        accepted: list[LoadedModel | None] | None = None,
    ) -> None:
        # On a GPU the whole call runs under the lock, and so does the end of `_execute`'s
        # frame: the model it looked up (or took out of `accepted`) may be the last reference
        # to a version replaced meanwhile (its session is freed there), and an error's
        # traceback holds it too.
        with self.worker.gpu_lock or contextlib.nullcontext():
            done = self._execute(call, received_ns, accepted)
        with contextlib.suppress(OSError):
            (answer or self.send)(done)

    def _execute(
        self, call: Infer, received_ns: int, accepted: list[LoadedModel | None] | None
    ) -> InferDone:
        """Run `call` on the instance it was queued for (`accepted`), else on the version's
        instance now (a call run inline)."""
        try:
            if accepted is None:
                model = self.worker.models.get((call.name, call.version))
            else:
                model = accepted.pop()
            if model is None:
                return _not_loaded(call)
            if self.arena is None:
                return InferDone(call.call_id, Code.INTERNAL, "no arena: Hello not received")
            return model.execute(call, self.arena.buf, received_ns, self.regions)
        except Exception as exc:
            log.exception("call %d failed", call.call_id)
            return InferDone(call.call_id, Code.INTERNAL, type(exc).__name__)


def _not_loaded(call: Infer) -> InferDone:
    return InferDone(
        call.call_id, Code.NOT_LOADED, f"model '{call.name}' version {call.version} is not loaded"
    )


class _Sender(Protocol):
    def send_quiet(self, msg: InferDone) -> None: ...


def queue_batched(
    batcher: Batcher[Queued],
    call: Infer,
    sender: _Sender,
    received_ns: int,
    alone: Callable[[], object],
) -> None:
    """Queue `call` on a plain version's batcher, answered through `sender` (the Connection it
    came on, or its direct channel: runtime.channels). A full queue is answered at once; a
    batcher being replaced or unloaded leaves the call to `alone()` (the new instance, if any,
    takes it)."""
    payload = (sender, call, received_ns)
    try:
        batcher.submit(
            Pending(call.call_id, call.rows, received_ns, call.deadline_ns, payload=payload)
        )
    except QueueFull as exc:
        sender.send_quiet(InferDone(call.call_id, Code.OVERLOADED, str(exc)))
    except BatcherClosed:
        alone()
