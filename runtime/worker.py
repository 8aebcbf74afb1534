"""The runtime worker process: owns the onnxruntime sessions and executes calls from fronts.

Started by the front with multiprocessing `spawn` (never fork: a CUDA context does not survive
it). It listens on a Unix socket; each front connects, says Hello with the name of its
shared-memory arena, then sends typed messages (runtime.ipc.protocol), read and acted on by
that front's `Connection` (runtime.worker_connection). The Worker holds what all fronts
share: the loaded versions (plain sessions, batchers, graph models), the device and its lock,
each plain version's lane of threads (runtime.lanes), and loading and unloading.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

from runtime.channels import Channel, ChannelTable, Front, Waker
from runtime.engine.batcher import Batcher
from runtime.engine.buckets import BucketTable
from runtime.engine.golden import GoldenMismatch
from runtime.engine.graph_model import GraphModel, queue_call
from runtime.engine.graph_model import Queued as GraphQueued
from runtime.engine.graphs import GraphSet
from runtime.engine.memory import DeviceMemoryMeter, Probe
from runtime.engine.model import LoadedModel
from runtime.engine.regions import (
    Copier,
    Opener,
    SharedOpener,
    cuda_copier,
    cuda_opener,
    fake_opener,
    host_copier,
)
from runtime.engine.reshape import ReshapeError, model_file
from runtime.engine.session import (
    SessionError,
    choose_device,
    device_index,
    make_session,
    preload_cuda_libraries,
    signature_of,
)
from runtime.engine.signature import SignatureMismatch, reconcile
from runtime.ipc.pinning import device_memory_used
from runtime.ipc.protocol import (
    Code,
    Infer,
    LoadDone,
    LoadModel,
    ModelSignature,
    UnloadDone,
    UnloadModel,
)
from runtime.ipc.shm import pid_alive
from runtime.lanes import Lane
from runtime.native_stderr import route_native_stderr
from runtime.plain_batching import drain_channels, run_alone, start_batcher
from runtime.process import WORKER_CANNOT_START
from runtime.settings import WorkerSettings
from runtime.worker_connection import Connection, Queued

__all__ = ["Worker", "run"]

log = logging.getLogger("microtune.worker")

Key = tuple[str, int]  # (model name, version)


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.device = choose_device(settings.device)
        self.models: dict[tuple[str, int], LoadedModel] = {}
        self.batchers: dict[tuple[str, int], Batcher[Queued]] = {}
        # Batched models on a CUDA device (or on the CPU with cpu_graphs, for tests): served
        # from captured graphs, each on its own thread (runtime.engine.graph_model).
        self.graph_models: dict[tuple[str, int], GraphModel] = {}
        # Their direct channels (runtime.channels), one listening socket per version, kept
        # across reloads of the version; fronts find them by their connection's id.
        self.channels = ChannelTable(settings.socket_path, self._front)
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
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
        # The fronts (connections) that loaded each version: it is unloaded only when the last
        # of them unloads it. With several fronts, each drains and unloads on its own schedule
        # (a poll of the repository, a hot swap); the others still route to the version.
        self._holders: dict[tuple[str, int], set[object]] = {}
        # Fronts gone (`release`): a load of theirs that ends after it holds nothing for them.
        self._gone: weakref.WeakSet[object] = weakref.WeakSet()
        # One load or unload of a version at a time: a front's load that finds the version
        # loaded must register its hold before another front's unload can decide it is free.
        self._version_locks: dict[tuple[str, int], threading.Lock] = {}
        # Each plain version's threads for its calls that run neither inline nor batched
        # (runtime.lanes): a version's calls wait only for its own. Set before the version
        # appears in `models`, so a call that finds the version finds its lane.
        self.lanes: dict[Key, Lane] = {}
        # Beside the socket, in the directory the front made (server/rundir.py): what the
        # worker writes there (a reshaped model while it loads) goes with it, crash included.
        self.run_dir = os.path.dirname(settings.socket_path) or None
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
                connection = Connection(self, conn, next(self._ids))
                self.connections[connection.id] = connection
                threading.Thread(target=connection.run, daemon=True).start()
        finally:
            srv.close()
            self.channels.close_all()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.close_lanes()

    def batchers_now(
        self,
    ) -> tuple[list[tuple[Key, Batcher[Queued]]], list[tuple[Key, Batcher[GraphQueued]]]]:
        """The batchers of plain batched versions and of graph versions, as they are now."""
        with self._models_lock:
            plain = list(self.batchers.items())
            graphs = [(key, gm.batcher) for key, gm in self.graph_models.items()]
        return plain, graphs

    def queue_alone(self, key: Key, fn: Callable[..., object], *args: object) -> bool:
        """Queue `fn(accepted, *args)` on the lane of version `key`; False when it has none
        (not loaded, or no longer). `accepted` is a list holding the version's instance as it
        is now: a queued call runs on the instance it was accepted for, though the version be
        reloaded or unloaded while it waits, as a batched version's queued calls finish on
        their batcher's instance (it ran on the new one: another model file's answer, or an
        onnxruntime error for the output names it had been checked against). `fn` takes the
        instance out under the GPU lock: it may be the last reference to a replaced version."""
        with self._models_lock:
            # Under the lock: a lane is retired only once it is out of `lanes` (a reload with
            # another count, an unload, the worker's stop), so the lane found takes the call.
            lane = self.lanes.get(key)
            return lane is not None and lane.submit(fn, [self.models.get(key)], *args)

    def close_lanes(self) -> None:
        """The worker stops: every lane is retired, its queued calls dropped (under the GPU
        lock: each holds the instance it was accepted for, maybe the last reference to it)."""
        with self._models_lock:
            lanes, self.lanes = list(self.lanes.values()), {}
        with self.gpu_lock or contextlib.nullcontext():
            for lane in lanes:
                lane.retire(drop_queued=True)

    def _lane(self, msg: LoadModel) -> Lane:
        """The lane of the plain version `msg` loads: the one it has if its size is still
        right (a reload in place keeps its queue and order), else a new one. Its size is the
        version's instance count: the batch threads' with dynamic batching (what runs on the
        lane then is the calls a batch does not take), else `msg.instances`, the config's
        instance_group counts (the worker's `exec_threads` without)."""
        b = msg.batching
        if b is not None and msg.max_batch_size > 0:
            threads = max(1, b.instances)
        else:
            threads = msg.instances or self.settings.exec_threads
        lane = self.lanes.get((msg.name, msg.version))
        if lane is not None and lane.threads == threads:
            return lane
        return Lane(msg.name, msg.version, threads)

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

    def load(self, msg: LoadModel, holder: object = None) -> LoadDone:
        """Load a version (or find it loaded: the first front's load serves every front) for
        `holder`, the front asking."""
        key = (msg.name, msg.version)
        with self._version_lock(key):
            graphs = self.use_graphs and msg.max_batch_size > 0
            done = self._load_graphs(msg) if graphs else self._load_plain(msg)
            if done.code == Code.OK:
                # A config change can move a version between the two kinds (max_batch_size 0
                # is never graph-served): the instance of the other kind goes, or calls would
                # still find it first (Connection._dispatch) and run the old files and config.
                self._drop_other_kind(key, graphs)
                with self._models_lock:
                    if holder is None or holder not in self._gone:
                        self._holders.setdefault(key, set()).add(holder)
        return done

    def _drop_other_kind(self, key: Key, graphs: bool) -> None:
        """After `key` loaded as a graph version (`graphs`) or a plain one: the instance of
        the other kind, if any, finishes what it has queued and is freed."""
        with self._models_lock:
            if graphs:
                plain, batcher, graph = (
                    self.models.pop(key, None),
                    self.batchers.pop(key, None),
                    None,
                )
                lane = self.lanes.pop(key, None)
            else:
                plain, batcher, graph, lane = None, None, self.graph_models.pop(key, None), None
        if lane is not None:
            lane.retire()  # (its queued calls run on the plain instance they were accepted for)
        if batcher is not None:
            threading.Thread(target=batcher.close, daemon=True).start()
        if graph is not None:
            threading.Thread(target=self._released, args=(graph.close,), daemon=True).start()
        if plain is not None:
            with self.memory.releasing(), self.gpu_lock or contextlib.nullcontext():
                del plain  # freed here unless a call still runs it

    def holders(self, name: str, version: int) -> int:
        """How many fronts hold the version."""
        with self._models_lock:
            return len(self._holders.get((name, version), ()))

    def _version_lock(self, key: tuple[str, int]) -> threading.Lock:
        with self._models_lock:
            return self._version_locks.setdefault(key, threading.Lock())

    def release(self, holder: object) -> None:
        """A front is gone: it holds nothing any more (what it held stays loaded for the others,
        and for its restart, until a front unloads it)."""
        self.connections.pop(getattr(holder, "id", 0), None)
        with self._models_lock:
            self._gone.add(holder)
            for holders in self._holders.values():
                holders.discard(holder)

    def _load_plain(self, msg: LoadModel) -> LoadDone:
        t0 = time.monotonic_ns()
        key = (msg.name, msg.version)
        with self._models_lock:
            current = self.models.get(key)
        channels = self.channels.get(key)
        if current is not None and msg.served_by(current.spec):
            # Several fronts load the same models: the first load serves them all.
            return LoadDone(
                msg.request_id,
                Code.OK,
                signature=current.signature,
                device_memory=current.device_memory,
                reused=True,
                channel="" if channels is None else channels.path,
            )
        failed: LoadDone | None = None
        try:  # (a config reshape's rewrite of the graph: CPU work, outside the device lock)
            with (
                model_file(msg, self.run_dir) as path,
                self.memory.measure() as used,
                self.gpu_lock or contextlib.nullcontext(),
            ):
                # Errors are caught inside the lock: their tracebacks hold the failed load's
                # frames, and with them its session, which must be freed under the lock too.
                try:
                    model = LoadedModel.load(msg, self.device, path)
                except (SessionError, SignatureMismatch, GoldenMismatch) as exc:
                    failed = LoadDone(msg.request_id, Code.BAD_INPUT, str(exc))
                except Exception as exc:
                    log.exception("loading %s version %d failed", msg.name, msg.version)
                    failed = LoadDone(msg.request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        except ReshapeError as exc:
            failed = LoadDone(msg.request_id, Code.BAD_INPUT, str(exc))
        if failed is not None:
            return failed
        model.device_memory = used.nbytes
        b = msg.batching
        if channels is None and b is not None and msg.max_batch_size > 0 and b.instances <= 1:
            # One batch thread: it can read the version's calls itself (runtime.channels).
            # Several would wait for the one that reads while it runs a batch.
            channels = self.channels.open(key)
        batcher, waker = start_batcher(model, msg, channels)
        drain = None
        if channels is not None and waker is None:
            # Reloaded without batching: no batch thread reads them. The fronts hear it in
            # LoadDone and go back to their links; what they sent meanwhile runs alone.
            drain = Waker(channels, run_alone)
        lane = self._lane(msg)
        # Replacing a loaded instance frees its session: a release for loads measured meanwhile.
        with self.memory.releasing() if current is not None else contextlib.nullcontext():
            with self._models_lock:
                old_lane = self.lanes.get(key)
                self.lanes[key] = lane  # first: a call that finds the model finds its lane
                self.models[key] = model
                old = self.batchers.pop(key, None)
                if batcher is not None:
                    self.batchers[key] = batcher
            if channels is not None:
                channels.hand_to(waker or drain)  # the old instance drains what it queued
            with self.gpu_lock or contextlib.nullcontext():
                del current  # the replaced session is freed here unless a call still runs it
        if drain is not None:  # the channels are `drain`'s now; LoadDone names none
            self.channels.pop(key)
            channels = None
            threading.Thread(
                target=drain_channels,
                args=(drain,),
                daemon=True,
                name=f"drain-{msg.name}-{msg.version}",
            ).start()
        if old is not None:  # calls already queued on the old instance finish there
            threading.Thread(target=old.close, daemon=True).start()
        if old_lane is not None and old_lane is not lane:
            # Another instance count: the old lane's queued calls still run, on the instance
            # they were accepted for (queue_alone), beside the new lane's.
            old_lane.retire()
        return LoadDone(
            msg.request_id,
            Code.OK,
            signature=model.signature,
            load_ns=time.monotonic_ns() - t0,
            device_memory=model.device_memory,
            channel="" if channels is None else channels.path,
        )

    def _load_graphs(self, msg: LoadModel) -> LoadDone:
        t0 = time.monotonic_ns()
        key = (msg.name, msg.version)
        same = msg.identity()
        with self._models_lock:
            current = self.graph_models.get(key)
        channels = self.channels.get(key)
        channel = "" if channels is None else channels.path
        if current is not None and msg.served_by(current.spec):
            return LoadDone(
                msg.request_id,
                Code.OK,
                current.reason or "",
                current.signature,
                device_memory=current.device_memory,
                reused=True,
                channel=channel,
            )
        if channels is None:
            channels = self.channels.open(key)
            channel = "" if channels is None else channels.path
        table = BucketTable.default(msg.max_batch_size)
        copier = None if self.region_io is None else self.region_io[1]

        def reconciled(sess: Any) -> ModelSignature:
            return reconcile(signature_of(sess), msg.declared, msg.max_batch_size)

        def make_graphs() -> GraphSet:
            with model_file(msg, self.run_dir) as path:
                return graphs_from(path)

        def graphs_from(path: str) -> GraphSet:
            if not self.device.startswith("cuda"):  # cpu_graphs: the same path on the CPU EP
                sess = make_session(path, "cpu", msg.intra_op_threads)
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
                path,
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

        def waker(model: GraphModel) -> Waker:
            def queue(call: Infer, chan: Channel, received_ns: int) -> None:
                buf, regions = chan.arena_buf(), chan.regions
                queue_call(
                    model,
                    call,
                    chan.answer,
                    buf,
                    regions,
                    received_ns,
                    lambda: self.graph_models.get(key),
                )

            return Waker(channels, queue)

        try:
            with self.memory.measure() as used:
                model = GraphModel.start(same, make_graphs, batcher, idle=waker)
        except (SessionError, SignatureMismatch, GoldenMismatch, ReshapeError) as exc:
            self._close_unused_channels(key)
            return LoadDone(msg.request_id, Code.BAD_INPUT, str(exc))
        except Exception as exc:
            log.exception("loading %s version %d failed", msg.name, msg.version)
            self._close_unused_channels(key)
            return LoadDone(msg.request_id, Code.INTERNAL, f"{type(exc).__name__}: {exc}")
        model.device_memory = used.nbytes
        with self._models_lock:
            old = self.graph_models.get(key)
            self.graph_models[key] = model
        if channels is not None:
            # From now on the new instance reads the channels; what the fronts send meanwhile
            # waits in the sockets for it, and the old one drains only what it has queued.
            assert isinstance(model.idle, Waker)
            channels.hand_to(model.idle)
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
            channel=channel,
        )

    def _close_unused_channels(self, key: Key) -> None:
        """After a failed load: the channels go unless an instance already serves them."""
        with self._models_lock:
            unused = key not in self.graph_models
        channels = self.channels.pop(key) if unused else None
        if channels is not None:
            channels.close()

    def _front(self, connection: int) -> Front | None:
        """A front's connection by its id (a direct channel's Attach), once it said Hello."""
        conn = self.connections.get(connection)
        return conn if conn is not None and conn.arena is not None else None

    def unload(self, msg: UnloadModel, holder: object = None) -> UnloadDone:
        """`holder` lets go of the version; unloaded once no other front holds it."""
        key = (msg.name, msg.version)
        with self._version_lock(key):
            with self._models_lock:
                holders = self._holders.get(key, set())
                holders.discard(holder)
                if holders:
                    return UnloadDone(msg.request_id)  # another front still serves it
                self._holders.pop(key, None)
            return self._unload(msg)

    def _unload(self, msg: UnloadModel) -> UnloadDone:
        with self.memory.releasing():
            with self._models_lock:
                graph_model = self.graph_models.pop((msg.name, msg.version), None)
            channels = self.channels.pop((msg.name, msg.version))
            if channels is not None:
                # Read no more: the fronts drained their calls before unloading. A front that
                # still sends sees its channel end, and its calls fail, never half computed.
                channels.hand_to(None)
            if graph_model is not None:
                graph_model.close()  # drains what is queued
            with self._models_lock:
                plain = self.models.pop((msg.name, msg.version), None)
                batcher = self.batchers.pop((msg.name, msg.version), None)
                lane = self.lanes.pop((msg.name, msg.version), None)
            if lane is not None:
                lane.retire()  # what it queued runs on the instance it was accepted for
            if batcher is not None:
                batcher.close()  # drains what is queued
            if channels is not None:
                channels.close()
            with self.gpu_lock or contextlib.nullcontext():
                del plain  # its session is freed here unless a call still runs it
        return UnloadDone(msg.request_id)


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
        try:
            worker = Worker(settings)
        except SessionError as exc:  # the device asked for: one line, no traceback
            logging.getLogger("microtune.worker").error("cannot start: %s", exc)
            raise SystemExit(WORKER_CANNOT_START) from None
        worker.serve_forever()
    finally:
        native.close()
