"""The runtime worker process: owns the onnxruntime sessions and executes calls from fronts.

Started by the front with multiprocessing `spawn` (never fork: a CUDA context does not survive
it). It listens on a Unix socket; each front connects, says Hello with the name of its
shared-memory arena, then sends typed messages (runtime.ipc.protocol). Per connection, a reader
thread decodes frames and hands inference calls to a thread pool; loads run on their own thread
so that a slow load never stalls inference. Replies are written under a per-connection lock.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from runtime.engine.batcher import Batcher, BatcherClosed, Pending, QueueFull
from runtime.engine.buckets import BucketTable
from runtime.engine.golden import GoldenMismatch
from runtime.engine.graph_model import GraphModel
from runtime.engine.graph_model import Queued as GraphQueued
from runtime.engine.graphs import GraphSet
from runtime.engine.memory import DeviceMemoryMeter, Probe
from runtime.engine.model import LoadedModel, execute_batch
from runtime.engine.regions import (
    Copier,
    Opener,
    RegionError,
    RegionTable,
    SharedOpener,
    cuda_copier,
    cuda_opener,
    fake_opener,
    host_copier,
)
from runtime.engine.session import (
    SessionError,
    choose_device,
    device_index,
    make_session,
    preload_cuda_libraries,
    signature_of,
)
from runtime.engine.signature import SignatureMismatch, reconcile
from runtime.ipc.pinning import CudaError, PinnedRegion, device_memory_used, pin_arena
from runtime.ipc.protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    PROTOCOL_VERSION,
    CloseRegion,
    Code,
    GetStatus,
    Hello,
    Infer,
    InferDone,
    LoadDone,
    LoadModel,
    ModelSignature,
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
from runtime.ipc.shm import Arena, pid_alive
from runtime.native_stderr import route_native_stderr
from runtime.settings import WorkerSettings

__all__ = ["Worker", "run"]

log = logging.getLogger("microtune.worker")

# Calls of models whose average execution is shorter than this run on the reader thread.
INLINE_BELOW_NS = 200_000

# What a queued call carries to the batch thread: its connection, the call, when it arrived.
Queued = tuple["Connection", Infer, int]


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.device = choose_device(settings.device)
        self.models: dict[tuple[str, int], LoadedModel] = {}
        self.batchers: dict[tuple[str, int], Batcher[Queued]] = {}
        # Batched models on a CUDA device (or on the CPU with cpu_graphs, for tests): served
        # from captured graphs, each on its own thread (runtime.engine.graph_model).
        self.graph_models: dict[tuple[str, int], GraphModel] = {}
        # Held by graph captures, GPU runs and hostRegister: a capture is global on a device.
        # Reentrant: closing a client CUDA region takes it wherever the last release happens,
        # which may be a path that holds it already (an unregister, a front's disconnect).
        self.device_lock = threading.RLock()
        # The same lock where there is a GPU, for what a plain (graph-less) session does there:
        # its loads, runs and frees allocate or free device memory, which would break another
        # version's capture (cudaStreamCaptureModeGlobal). None on the CPU: no lock to take.
        self.gpu_lock: threading.RLock | None = None
        cuda = self.device.startswith("cuda")
        self.use_graphs = cuda or settings.cpu_graphs
        self.device_id = device_index(self.device)
        # Client CUDA shared memory: opened here, where the CUDA context lives; a CPU worker
        # has none (registration answers UNSUPPORTED), unless a test stands host memory in.
        # One SharedOpener under every front's table: CUDA maps a handle once per process.
        self.region_io: tuple[Opener, Copier] | None = None
        if cuda:
            self.gpu_lock = self.device_lock
            self.region_io = (SharedOpener(cuda_opener, self.device_lock), cuda_copier)
            preload_cuda_libraries()
        elif settings.fake_cuda_ipc:
            self.region_io = (SharedOpener(fake_opener, self.device_lock), host_copier)
        # Device memory each load takes, reported in LoadDone (runtime.engine.memory).
        self.memory = DeviceMemoryMeter(self._memory_probe())
        self._models_lock = threading.Lock()
        self.pool = ThreadPoolExecutor(settings.exec_threads, thread_name_prefix="exec")
        self.stopping = threading.Event()

    def serve_forever(self) -> None:
        path = self.settings.socket_path
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path + ".tmp")
        srv.listen(64)
        os.rename(path + ".tmp", path)  # appears atomically: the front polls for it
        srv.settimeout(0.5)
        log.info("worker %d listening on %s (device %s)", os.getpid(), path, self.device)
        try:
            while not self.stopping.is_set():
                if self.settings.parent_pid and not pid_alive(self.settings.parent_pid):
                    log.warning(
                        "front process %d is gone; worker exiting", self.settings.parent_pid
                    )
                    break
                try:
                    conn, _ = srv.accept()
                except TimeoutError:
                    continue
                conn.settimeout(None)
                threading.Thread(target=Connection(self, conn).run, daemon=True).start()
        finally:
            srv.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _memory_probe(self) -> Probe | None:
        """The device's memory in use, on a GPU; None on the CPU, where no memory is attributed
        to a version (its metric is absent, not 0)."""
        if not self.device.startswith("cuda"):
            return None

        def probe() -> int:
            with self.device_lock:  # no CUDA call of ours during another version's capture
                return device_memory_used(self.device_id)

        return probe

    def _released(self, close: Callable[[], object]) -> None:
        """Run `close` (a replaced version freeing its device memory) as a release."""
        with self.memory.releasing():
            close()

    def load(self, msg: LoadModel) -> LoadDone:
        if self.use_graphs and msg.max_batch_size > 0:
            return self._load_graphs(msg)
        t0 = time.monotonic_ns()
        with self._models_lock:
            current = self.models.get((msg.name, msg.version))
        if current is not None and not msg.force and current.spec == msg.identity():
            # Several fronts load the same models: the first load serves them all.
            return LoadDone(
                msg.request_id,
                Code.OK,
                signature=current.signature,
                device_memory=current.device_memory,
            )
        failed: LoadDone | None = None
        with self.memory.measure() as used, self.gpu_lock or contextlib.nullcontext():
            # Errors are caught inside the lock: their tracebacks hold the failed load's frames,
            # and with them its session, which must be freed under the lock too.
            try:
                model = LoadedModel.load(msg, self.device)
            except (SessionError, SignatureMismatch, GoldenMismatch) as exc:
                failed = LoadDone(msg.request_id, Code.BAD_INPUT, str(exc))
            except Exception as exc:
                log.exception("loading %s version %d failed", msg.name, msg.version)
                failed = LoadDone(msg.request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        if failed is not None:
            return failed
        model.device_memory = used.nbytes
        key = (msg.name, msg.version)
        batcher = self._start_batcher(model, msg)
        # Replacing a loaded instance frees its session: a release for loads measured meanwhile.
        with self.memory.releasing() if current is not None else contextlib.nullcontext():
            with self._models_lock:
                self.models[key] = model
                old = self.batchers.pop(key, None)
                if batcher is not None:
                    self.batchers[key] = batcher
            with self.gpu_lock or contextlib.nullcontext():
                del current  # the replaced session is freed here unless a call still runs it
        if old is not None:  # calls already queued on the old instance finish there
            threading.Thread(target=old.close, daemon=True).start()
        return LoadDone(
            msg.request_id,
            Code.OK,
            signature=model.signature,
            load_ns=time.monotonic_ns() - t0,
            device_memory=model.device_memory,
        )

    def _load_graphs(self, msg: LoadModel) -> LoadDone:
        t0 = time.monotonic_ns()
        key = (msg.name, msg.version)
        same = msg.identity()
        with self._models_lock:
            current = self.graph_models.get(key)
        if current is not None and not msg.force and current.spec == same:
            return LoadDone(
                msg.request_id,
                Code.OK,
                current.reason or "",
                current.signature,
                device_memory=current.device_memory,
            )
        table = BucketTable.default(msg.max_batch_size)
        copier = None if self.region_io is None else self.region_io[1]

        def reconciled(sess: Any) -> ModelSignature:
            return reconcile(signature_of(sess), msg.declared, msg.max_batch_size)

        def make_graphs() -> GraphSet:
            if not self.device.startswith("cuda"):  # cpu_graphs: the same path on the CPU EP
                sess = make_session(msg.path, "cpu", msg.intra_op_threads)
                gs = GraphSet(
                    sess,
                    table,
                    reconciled(sess),
                    device_type="cpu",
                    device_lock=self.device_lock,
                    copier=copier,
                )
                gs.capture()
                return gs
            return GraphSet.load(
                msg.path,
                self.device_id,
                table,
                intra_op_threads=msg.intra_op_threads,
                signature=reconciled,
                device_lock=self.device_lock,
                copier=copier,
            )

        b = msg.batching
        batcher: Batcher[GraphQueued] = Batcher(
            msg.max_batch_size,
            preferred=[] if b is None else [p for p in b.preferred if p <= msg.max_batch_size],
            max_queue_delay_ns=0 if b is None else b.max_queue_delay_us * 1000,
            max_queue_size=1024 if b is None else b.max_queue_size,
            name=f"model '{msg.name}' version {msg.version}",
        )
        try:
            with self.memory.measure() as used:
                model = GraphModel.start(same, make_graphs, batcher)
        except (SessionError, SignatureMismatch, GoldenMismatch) as exc:
            return LoadDone(msg.request_id, Code.BAD_INPUT, str(exc))
        except Exception as exc:
            log.exception("loading %s version %d failed", msg.name, msg.version)
            return LoadDone(msg.request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        model.device_memory = used.nbytes
        with self._models_lock:
            old = self.graph_models.get(key)
            self.graph_models[key] = model
        if old is not None:  # calls already queued on the old instance finish there
            threading.Thread(target=self._released, args=(old.close,), daemon=True).start()
        if model.reason:
            log.warning(
                "%s version %d runs without CUDA graphs: %s", msg.name, msg.version, model.reason
            )
        note = f"running without CUDA graphs: {model.reason}" if model.reason else ""
        return LoadDone(
            msg.request_id,
            Code.OK,
            note,
            model.signature,
            time.monotonic_ns() - t0,
            model.device_memory,
        )

    def unload(self, msg: UnloadModel) -> UnloadDone:
        with self.memory.releasing():
            with self._models_lock:
                graph_model = self.graph_models.pop((msg.name, msg.version), None)
            if graph_model is not None:
                graph_model.close()  # drains what is queued
            with self._models_lock:
                plain = self.models.pop((msg.name, msg.version), None)
                batcher = self.batchers.pop((msg.name, msg.version), None)
            if batcher is not None:
                batcher.close()  # drains what is queued
            with self.gpu_lock or contextlib.nullcontext():
                del plain  # its session is freed here unless a call still runs it
        return UnloadDone(msg.request_id)

    def _start_batcher(self, model: LoadedModel, msg: LoadModel) -> Batcher[Queued] | None:
        if msg.batching is None or msg.max_batch_size < 1:
            return None
        b = msg.batching
        batcher: Batcher[Queued] = Batcher(
            msg.max_batch_size,
            preferred=[p for p in b.preferred if 1 <= p <= msg.max_batch_size],
            max_queue_delay_ns=b.max_queue_delay_us * 1000,
            max_queue_size=b.max_queue_size,
            name=f"model '{msg.name}' version {msg.version}",
        )

        def run_batch(batch: list[Pending[Queued]]) -> None:
            try:
                calls = []
                for p in batch:
                    conn, call, received = p.payload
                    calls.append((call, conn.arena_buf(), received))
                dones = execute_batch(model, calls)
            except Exception as exc:
                # Every call must be answered, or its caller (and its arena lease) waits forever.
                log.exception("batch of %s version %d failed", msg.name, msg.version)
                dones = [
                    InferDone(p.payload[1].call_id, Code.INTERNAL, type(exc).__name__)
                    for p in batch
                ]
            for p, done in zip(batch, dones, strict=True):
                p.payload[0].send_quiet(done)

        def expire(p: Pending[Queued]) -> None:
            conn, call, _ = p.payload
            conn.send_quiet(InferDone(call.call_id, Code.DEADLINE, "deadline expired while queued"))

        for i in range(max(1, b.instances)):  # each runs one batch at a time (instance_group)
            threading.Thread(
                target=batcher.run,
                args=(run_batch, expire),
                daemon=True,
                name=f"batch-{msg.name}-{msg.version}-{i}",
            ).start()
        return batcher


class Connection:
    """One front process: its arena and its socket."""

    def __init__(self, worker: Worker, sock: socket.socket) -> None:
        self.worker = worker
        self.sock = sock
        self.send_lock = threading.Lock()
        self.arena: Arena | None = None
        self.pinned: PinnedRegion | None = None
        io = worker.region_io
        self.regions = None if io is None else RegionTable(*io)
        self._reader = 0  # thread id of the reader, once it runs
        self._collect: list[bytes] | None = None
        # Unloads and region (un)registrations take the device lock, which a load or a capture
        # holds for seconds: they run here, in order, while the reader goes on reading.
        self._control = ThreadPoolExecutor(1, thread_name_prefix="control")

    def send(self, msg: Any) -> None:
        frame = encode(msg)
        if self._collect is not None and threading.get_ident() == self._reader:
            # Answers of calls run inline while handling one read leave in one write.
            self._collect.append(frame)
            return
        with self.send_lock:
            self.sock.sendall(frame)

    def _flush(self) -> None:
        out, self._collect = self._collect, None
        if out:
            with self.send_lock:
                self.sock.sendall(out[0] if len(out) == 1 else b"".join(out))

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
            self.sock.close()
            self._control.shutdown(wait=True)  # an (un)registration under way ends first
            if self.regions is not None:
                with self.worker.device_lock:
                    self.regions.close()
            if self.pinned is not None:
                with self.worker.device_lock:
                    self.pinned.close()
            if self.arena is not None:
                # The front is gone or done: nothing else will unlink its arena.
                self.arena.unlink()
                self.arena.close()

    def _loop(self) -> None:
        # Read what is there (up to 1 MiB) and handle every complete frame of it: under load
        # one recv carries many calls, instead of two recv syscalls per call.
        buf = bytearray()
        chunk = bytearray(1 << 20)
        hdr = FRAME_HEADER.size
        self._reader = threading.get_ident()
        while True:
            n = self.sock.recv_into(chunk)
            if n == 0:
                return
            buf += memoryview(chunk)[:n]
            pos, end = 0, len(buf)
            self._collect = []
            try:
                while end - pos >= hdr:
                    (size,) = FRAME_HEADER.unpack_from(buf, pos)
                    if size > MAX_FRAME:
                        raise ValueError(f"frame of {size} bytes")
                    if end - pos - hdr < size:
                        break
                    msg = decode_front(bytes(buf[pos + hdr : pos + hdr + size]))
                    pos += hdr + size
                    if not self._handle(msg):
                        return
            finally:
                self._flush()
            if pos:
                del buf[:pos]

    def _handle(self, msg: Any) -> bool:
        """Act on one message; False ends the connection."""
        if isinstance(msg, Infer):
            self._dispatch(msg, time.monotonic_ns())
        elif isinstance(msg, Hello):
            self._hello(msg)
        elif isinstance(msg, LoadModel):
            threading.Thread(target=self._load, args=(msg,), daemon=True).start()
        elif isinstance(msg, UnloadModel):
            self._control.submit(self._answer, self.worker.unload, msg)
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
            )
        )

    def _status(self, msg: GetStatus) -> WorkerStatus:
        """This front's calls waiting in batcher queues, and its arena's pinned bytes. Counted
        on the reader thread: a pass over queues that are short unless the worker is behind."""
        with self.worker._models_lock:
            plain = list(self.worker.batchers.items())
            graphs = [(key, gm.batcher) for key, gm in self.worker.graph_models.items()]
        answer = self.send_quiet  # graph models' calls carry their answer callback, not us
        counts = [((name, v), b.count_queued(lambda q: q[0] is self)) for (name, v), b in plain]
        counts += [((name, v), b.count_queued(lambda q: q[0] == answer)) for (name, v), b in graphs]
        pinned = self.pinned
        return WorkerStatus(
            msg.request_id,
            tuple(QueuedCalls(name, v, n) for (name, v), n in counts if n),
            0 if pinned is None or pinned.closed else pinned.size,
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
        self.send(self.worker.load(msg))

    def _dispatch(self, call: Infer, received_ns: int) -> None:
        """Batched models queue the call on their batcher (answered by its thread); others
        run it on the pool."""
        rows = call.inputs[0].shape[0] if call.inputs and call.inputs[0].shape else 1
        graph_model = self.worker.graph_models.get((call.name, call.version))
        if graph_model is not None and self.arena is not None:
            try:
                graph_model.submit(
                    Pending(
                        call.call_id,
                        rows,
                        received_ns,
                        call.deadline_ns,
                        payload=(self.send_quiet, call, self.arena.buf, received_ns, self.regions),
                    )
                )
            except QueueFull as exc:
                self.send_quiet(InferDone(call.call_id, Code.OVERLOADED, str(exc)))
            except BatcherClosed:
                self.send_quiet(
                    InferDone(
                        call.call_id,
                        Code.NOT_READY,
                        f"model '{call.name}' version {call.version} is being replaced or unloaded",
                    )
                )
            return
        batcher = self.worker.batchers.get((call.name, call.version))
        if batcher is not None and call.bound:
            batcher = None  # bound in place (runtime.engine.bound): runs alone, never inline
        if batcher is None:
            model = self.worker.models.get((call.name, call.version))
            inline = model is not None and model.avg_ns < INLINE_BELOW_NS and not call.bound
            del model  # never the last reference to a replaced version here (see _infer)
            lock = self.worker.gpu_lock
            # A fast model runs right here: a hop to the pool (thread wake-up, GIL handoff)
            # would cost more than the model itself. But on a GPU, a load or a graph capture
            # may hold the device for seconds: the reader never waits for it, or every call of
            # this front (other models' included) would stop behind this one. A pool thread
            # waits instead.
            if inline and (lock is None or lock.acquire(blocking=False)):
                try:
                    self._infer(call, received_ns)
                finally:
                    if lock is not None:
                        lock.release()
            else:
                self.worker.pool.submit(self._infer, call, received_ns)
            return
        try:
            batcher.submit(
                Pending(
                    call.call_id,
                    rows,
                    received_ns,
                    call.deadline_ns,
                    payload=(self, call, received_ns),
                )
            )
        except QueueFull as exc:
            self.send_quiet(InferDone(call.call_id, Code.OVERLOADED, str(exc)))
        except BatcherClosed:
            # Replaced or unloading: the new instance (if any) takes it.
            self.worker.pool.submit(self._infer, call, received_ns)

    def _infer(self, call: Infer, received_ns: int) -> None:
        # On a GPU the whole call runs under the lock, and so does the end of `_execute`'s
        # frame: the model it looked up may be the last reference to a version replaced
        # meanwhile (its session is freed there), and an error's traceback holds it too.
        with self.worker.gpu_lock or contextlib.nullcontext():
            done = self._execute(call, received_ns)
        with contextlib.suppress(OSError):
            self.send(done)

    def _execute(self, call: Infer, received_ns: int) -> InferDone:
        try:
            model = self.worker.models.get((call.name, call.version))
            if model is None:
                return InferDone(
                    call.call_id,
                    Code.NOT_LOADED,
                    f"model '{call.name}' version {call.version} is not loaded",
                )
            if self.arena is None:
                return InferDone(call.call_id, Code.INTERNAL, "no arena: Hello not received")
            return model.execute(call, self.arena.buf, received_ns, self.regions)
        except Exception as exc:
            log.exception("call %d failed", call.call_id)
            return InferDone(call.call_id, Code.INTERNAL, type(exc).__name__)


def run(settings_json: bytes) -> None:
    """Entry point of the spawned worker process."""
    settings = WorkerSettings.decode(settings_json)
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s",
    )
    # Native libraries' stderr lines become log records in the configured format (JSON lines
    # stay JSON lines).
    native = route_native_stderr()
    try:
        Worker(settings).serve_forever()
    finally:
        native.close()
