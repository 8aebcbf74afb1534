"""Composition root of the front process: builds every piece, starts and stops them in order.

settings -> WorkerLink (spawns the worker) -> ModelTable + ModelManager (loads models)
         -> InferenceHandler -> InferenceServicer + health + reflection on grpc.aio
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export import SpanExporter

from server import __version__
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.microtune import admin_pb2 as apb
from server._proto.microtune import admin_pb2_grpc as apb_grpc
from server.admin_sync import AdminSync
from server.control_sync import ControlSync
from server.errors import CannotStart
from server.handler import InferenceHandler
from server.lifecycle import ModelManager
from server.models import ModelEntry, ModelTable
from server.restarts import EXIT_GAVE_UP
from server.router import Router
from server.rpc.admin import RoutingAdminServicer
from server.rpc.health import HealthState
from server.rpc.reflection import add_reflection
from server.rpc.servicer import InferenceServicer, add_to_server
from server.rpc.status import status_of
from server.settings import Settings
from server.shm_directory import RegionDirectory
from server.shm_regions import SharedMemoryRegistry
from server.stats_peers import StatsPeers
from server.telemetry import GpuSampler, Metrics, MetricsHttpServer, capacity_for
from server.telemetry.tracing import make_tracing, register_services
from server.types import ModelState
from server.worker_link import WorkerLink

__all__ = ["App", "serve"]

log = logging.getLogger("microtune")


class App:
    def __init__(self, settings: Settings, span_exporter: SpanExporter | None = None) -> None:
        """`span_exporter` replaces the configured trace exporter (tests)."""
        self.settings = settings
        # First: a tracing configuration that cannot work stops the server here (CannotStart),
        # before anything below makes a run directory that nothing would remove.
        self.tracing = make_tracing(
            settings.tracing, settings.trace_sampling_ratio, __version__, span_exporter
        )
        self.table = ModelTable()
        self.link = WorkerLink(settings, settings.frontend_index)
        self.manager = ModelManager(
            settings.model_repository,
            self.link,
            self.table,
            settings.intra_op_threads,
            settings.model_control_mode,
            settings.load_model,
        )
        self.manager.batching_enabled = settings.dynamic_batching
        self.manager.worker_threads = settings.worker_threads
        # A front of server.supervisor shares the port and this directory (beside the worker's
        # socket) with the pod's other fronts; a lone front has neither.
        self.pod_dir = pod_dir = (
            Path(settings.worker_socket).parent if settings.worker_socket else None
        )
        shared = RegionDirectory(pod_dir) if pod_dir is not None else None
        self.shm = SharedMemoryRegistry(settings.allow_client_shm, shared)
        self.metrics = Metrics() if settings.metrics_port >= 0 else None
        if self.metrics is not None and self.tracing is not None and self.tracing.sender:
            self.tracing.sender.on_loss = self.metrics.trace_chunk_lost
        self.router = Router(self.table, on_rollback=self._rolled_back)
        self.manager.on_model_changed = self._model_changed
        self.handler = InferenceHandler(
            self.table,
            self.link,
            self.manager,
            self.shm,
            self.router,
            settings.server_name,
            metrics=self.metrics,
            tracer=None if self.tracing is None else self.tracing.request_tracer(),
            status_of=status_of,
        )
        self.admin_sync: AdminSync | None = None
        self.control_sync: ControlSync | None = None
        if pod_dir is not None:
            # Several fronts: ModelStatistics answers for the pod (server.stats_peers), and
            # routing admin decisions and model control are the pod's (server.admin_sync,
            # server.control_sync).
            self.handler.peers = StatsPeers(
                pod_dir, settings.frontend_index, self.handler.stats_snapshot
            )
            self.admin_sync = AdminSync(
                pod_dir, self.router, settings.frontend_index, settings.frontends
            )
            self.router.on_admin = self.admin_sync.publish
            if settings.model_control_mode != "none":
                self.control_sync = ControlSync(
                    pod_dir, self.manager, settings.frontend_index, settings.frontends
                )
                self.manager.control = self.control_sync
                self.manager.overrides.directory = pod_dir
        reload_models = self.link.on_restart

        async def after_worker_restart() -> None:
            if self.metrics is not None:
                self.metrics.worker_restarted()
            await self.handler.cuda.reopen()  # before the models take traffic again
            if reload_models is not None:
                await reload_models()

        self.link.on_restart = after_worker_restart
        self.metrics_server: MetricsHttpServer | None = None
        self.gpu_sampler: GpuSampler | None = None
        self.health = HealthState()
        self.port = 0
        self.server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> int:
        s = self.settings
        if not s.model_repository.is_dir():  # a typo'd path or a volume not mounted
            raise CannotStart(f"model repository {s.model_repository} is not a directory")
        opts = [
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
            # Several fronts share the port (server.supervisor); a lone one keeps it alone.
            ("grpc.so_reuseport", 1 if s.worker_socket else 0),
        ]
        if s.max_connection_age_s > 0:
            # grpc adds +-10 % jitter, so that connections opened together do not all go at once.
            opts.append(("grpc.max_connection_age_ms", int(s.max_connection_age_s * 1000)))
            if s.max_connection_age_grace_s > 0:  # else grpc's default: no limit
                grace_ms = int(s.max_connection_age_grace_s * 1000)
                opts.append(("grpc.max_connection_age_grace_ms", grace_ms))
        server = grpc.aio.server(options=opts)
        names = (
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
            apb.DESCRIPTOR.services_by_name["RoutingAdmin"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        )
        settle = None if self.admin_sync is None else self.admin_sync.settled
        infer, admin = InferenceServicer(self.handler), RoutingAdminServicer(self.router, settle)
        await register_services(
            server,
            (
                lambda s: add_to_server(infer, s),
                lambda s: health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, s),
                lambda s: apb_grpc.add_RoutingAdminServicer_to_server(admin, s),
                lambda s: add_reflection(names, s),
            ),
            self.tracing,
        )
        await self.health.start()
        # A lone front listens at once: while its models load, probes find it NOT_SERVING and
        # requests get UNAVAILABLE. A front that shares the port with others (server.supervisor)
        # listens only once its models are loaded: the kernel gives every listener of the port
        # its share of new connections, so a front still loading (at start, or restarted after
        # a crash) would answer its share NOT_FOUND or UNAVAILABLE while another could serve.
        shared_port = self.pod_dir is not None
        if not shared_port:
            await self._listen(server)
        if self.handler.peers is not None:
            await self.handler.peers.start()
        self._start_metrics()
        await self.link.start()
        await self.manager.load_repository()  # (each model's routing table as it loads)
        if s.routing_file is not None:
            self.router.reload_file(s.routing_file)
            path = s.routing_file

            async def reload_routing_file() -> None:
                # A mounted ConfigMap changes by an atomic symlink swap: polling catches it.
                self.router.reload_file(path)

            self._background(1.0, "routing file reload", reload_routing_file)
        self.handler.strict_readiness = s.strict_readiness
        self.handler.max_message_bytes = s.max_message_bytes
        self.handler.started = True
        if self.metrics is not None:
            self._background(1.0, "metrics refresh", self._sync_metrics)
            self._background(0.05, "served-requests fold", self._fold_metrics)
        # Readiness can change under our feet (worker death, loads): re-derived often.
        self._background(0.1, "readiness", self._set_readiness)
        if self.shm.directory is not None and self.shm.enabled:
            self._background(1.0, "CUDA region sweep", self.handler.cuda.sweep)
        if s.model_control_mode == "poll":
            self._tasks.append(asyncio.create_task(self.manager.poll_forever(s.repository_poll_s)))
        if self.control_sync is not None:
            await self.control_sync.poll()  # the models other fronts loaded or unloaded
        if self.admin_sync is not None:
            self.admin_sync.poll()  # route by the pod's admin tables from the first request
            self._background(0.25, "pod poll", self._poll_pod)
        if shared_port:
            await self.health.set_ready(self.handler.ready())
            await self._listen(server)
        return self.port

    async def _listen(self, server: grpc.aio.Server) -> None:
        s = self.settings
        try:
            self.port = server.add_insecure_port(f"{s.grpc_host}:{s.grpc_port}")
        except RuntimeError as exc:  # grpc's "Failed to bind to address ...": a port in use
            raise CannotStart(
                f"cannot listen on {s.grpc_host}:{s.grpc_port}: the address is in use "
                "or not this machine's"
            ) from exc
        await server.start()
        self.server = server
        log.info("gRPC listening on %s:%d", s.grpc_host, self.port)
        if s.port_file is not None:
            try:
                s.port_file.write_text(str(self.port))
            except OSError as exc:  # (a directory that is not writable, a full disk)
                raise CannotStart(f"cannot write the port file {s.port_file}: {exc}") from None

    def _start_metrics(self) -> None:
        s, m = self.settings, self.metrics
        if m is None:
            return
        # An unloaded version's series leave the exposition (its counters stay; see forget_version).
        self.manager.on_version_unloaded = m.forget_version
        self.manager.on_model_removed = m.forget_model
        m.track_shm_slots(
            lambda: self.link.client.pool.in_use if self.link.client else 0,
            lambda: self.link.client.pool.slots if self.link.client else 0,
        )
        if self.pod_dir is not None:
            # Under the supervisor: a private port, announced in a file the supervisor reads
            # to merge every front's metrics into the pod's one scrape.
            self.metrics_server = m.start_http_server(0, "127.0.0.1")
            announce = self.pod_dir / f"metrics-{s.frontend_index}"
            announce.write_text(f"{os.getpid()} {self.metrics_server.url}")
            return
        try:
            self.metrics_server = m.start_http_server(s.metrics_port, s.grpc_host.strip("[]"))
        except OSError as exc:
            raise CannotStart(f"cannot serve metrics on port {s.metrics_port}: {exc}") from None
        log.info("metrics on %s", self.metrics_server.url)
        self.gpu_sampler = GpuSampler(m.registry)
        if self.gpu_sampler.open():
            self.gpu_sampler.start()
        else:
            self.gpu_sampler = None

    def _background(self, period_s: float, what: str, step: Callable[[], Awaitable[None]]) -> None:
        self._tasks.append(asyncio.create_task(_every(period_s, what, step)))

    async def _sync_metrics(self) -> None:
        """Model states, load times, capacities and weights, and the worker's report on this
        front (queued calls, pinned arena), refreshed off the request path."""
        m = self.metrics
        assert m is not None
        for name, entry in self.table.models.items():
            self._sync_model_metrics(m, name, entry)
        with contextlib.suppress(TimeoutError):  # a busy worker: keep the last sample
            status = await self.link.status(timeout_s=1.0)
            m.set_pending(() if status is None else ((q.name, q.calls) for q in status.queued))
            m.set_pinned_bytes(0 if status is None else status.pinned_bytes)
            if status is not None:
                m.set_send_stalls(status.send_stalls)

    def _sync_model_metrics(self, m: Metrics, name: str, entry: ModelEntry) -> None:
        """One model's version states (which also declare its name as a label value), load
        times, device memory, capacity and routing weights."""
        ready_batches = []
        for v, ve in entry.versions.items():
            if ve.unloaded:  # its series were dropped at unload
                continue
            m.set_model_state(name, v, ve.state)
            if ve.load_ns:
                m.observe_model_load(name, v, ve.load_ns / 1e9)
            m.set_model_device_memory(name, v, ve.device_memory)
            if ve.state is ModelState.READY and ve.spec is not None:
                ready_batches.append(ve.spec.max_batch_size)
        m.set_capacity(name, capacity_for(ready_batches))
        table = self.router.tables.get(name)
        # Only the versions the model has and has not unloaded: a routing table outlives an
        # unload (and may name a version that never was), and its weights would show a share
        # of traffic for versions that serve none.
        weights = {} if table is None else table.weights
        m.set_routing_weights(
            name,
            {
                v: bp
                for v, bp in weights.items()
                if (ve := entry.versions.get(v)) is not None and not ve.unloaded
            },
        )

    async def _fold_metrics(self) -> None:
        """Count the answered requests in bulk (server.telemetry.served), often enough that a
        fold stays short (~350 requests at 7k/s: ~0.5 ms of the loop)."""
        assert self.metrics is not None
        self.metrics.fold_served()

    def _rolled_back(self, model: str, version: int, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.count_rollback(model, version)

    def _model_changed(self, name: str) -> None:
        entry = self.table.models.get(name)
        if entry is None or not entry.requested:
            # Unloaded, removed or never loaded: the table of what it served goes, and its
            # next load is routed as its first (Router.forget_config).
            self.router.forget_config(name)
        else:
            spec = entry.in_force  # (not a failed load's config)
            table = None if spec is None else spec.parameters.get("routing")
            self.router.set_config_table(name, table)
        if self.metrics is not None and entry is not None:
            # Now, not at the next sync: until its name is declared, the model's requests
            # would be counted under "_other".
            self._sync_model_metrics(self.metrics, name, entry)

    async def _poll_pod(self) -> None:
        """Several fronts: apply what the others decided (model control first: a routing table
        may name a version it loads)."""
        if self.control_sync is not None:
            await self.control_sync.poll()
        assert self.admin_sync is not None
        self.admin_sync.poll()

    async def _set_readiness(self) -> None:
        await self.health.set_ready(self.handler.ready())

    async def stop(self) -> None:
        grace = self.settings.shutdown_grace_s
        # Model control and routing admin RPCs in flight answer once done here, without the
        # other fronts' acknowledgements: they stop too (pod_records.Acks.stopping).
        for records in (self.control_sync, self.admin_sync):
            if records is not None:
                records.stop_waiting()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            # Bounded: a task that lost its cancellation (asyncio.wait_for on Python 3.11 can
            # swallow one that races its result) would otherwise hold the stop for ever.
            _, left = await asyncio.wait(self._tasks, timeout=5)
            if left:
                log.warning("%d background task(s) did not stop; shutting down anyway", len(left))
        await self.health.shutdown()
        if self.server is not None:
            await self.server.stop(grace)
        if self.handler.peers is not None:
            await self.handler.peers.close()
        await self.link.stop()
        self.manager.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.gpu_sampler is not None:
            self.gpu_sampler.stop()
        if self.tracing is not None:
            await self.tracing.shutdown()
        self.shm.close()


async def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT (0), or until the runtime worker kept dying and the front
    gave up on it (EXIT_GAVE_UP: the container should be restarted)."""
    app = App(settings)
    stop = asyncio.Event()
    app.link.on_give_up = stop.set
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    orphan_watch = None
    if settings.worker_socket:  # a front of server.supervisor: it goes when the supervisor goes
        orphan_watch = asyncio.create_task(_exit_with_parent(os.getppid(), stop))
    starting = asyncio.create_task(app.start())
    stopping = asyncio.create_task(stop.wait())
    try:
        # A stop during start-up (a pod deleted while its models load) is acted on at once,
        # not once every model has loaded: the kubelet would SIGKILL it at the grace period.
        await asyncio.wait((starting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if starting.done():
            starting.result()  # a start-up failure raises here
            _say_started(app)
            await stopping
            if settings.shutdown_delay_s > 0 and not app.link.gave_up:
                # Not ready, still serving: health checkers see NOT_SERVING and move traffic
                # away before the listener closes (it refuses new calls: no NOT_SERVING then).
                app.handler.draining = True
                await app.health.set_ready(False)
                delay = settings.shutdown_delay_s
                log.info("not ready; serving %.1f s more before the drain", delay)
                await asyncio.sleep(delay)
        log.info("shutting down")
    finally:
        for task in (starting, stopping):
            if not task.done():
                task.cancel()
                # (a start-up cut short may fail otherwise than cancelled: we stop anyway)
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if orphan_watch is not None:
            orphan_watch.cancel()
        await app.stop()
    return EXIT_GAVE_UP if app.link.gave_up else 0


def _say_started(app: App) -> None:
    """The start-up's last line says what readiness says, and which models failed: with strict
    readiness one refused config keeps the server NOT_SERVING for good, and a line saying
    "ready" sent whoever read the log looking elsewhere."""
    models, failed = len(app.table.models), app.table.failed_models()
    ready = app.handler.ready()
    if ready and not failed:
        log.info("microtune ready: %d model(s)", models)
        return
    named = ", ".join(failed[:_NAMED]) + (", ..." if len(failed) > _NAMED else "")
    unavailable = f", {len(failed)} unavailable ({named})" if failed else ""
    if ready:
        log.warning("microtune ready: %d model(s)%s", models, unavailable)
    elif failed and app.settings.strict_readiness:
        log.warning(
            "microtune started, not ready: %d model(s)%s; readiness stays NOT_SERVING while "
            "they fail (--strict-readiness)",
            models,
            unavailable,
        )
    else:
        log.warning("microtune started, not ready: %d model(s)%s", models, unavailable)


_NAMED = 10  # failed models the start-up line names


async def _exit_with_parent(parent: int, stop: asyncio.Event) -> None:
    """A supervisor killed outright (SIGKILL, the OOM killer) cannot stop its fronts: each
    would go on holding the shared port and its arena, answering UNAVAILABLE without a worker,
    and a new server on the port would share its connections with them. So a front that finds
    itself reparented shuts down as on SIGTERM."""
    while True:  # (getppid has no event to wait on)
        await asyncio.sleep(0.5)
        if os.getppid() != parent:
            break
    log.warning("supervisor %d is gone; this front shuts down", parent)
    stop.set()


async def _every(period_s: float, what: str, step: Callable[[], Awaitable[None]]) -> None:
    """Run `step` now and then every `period_s` until cancelled. A step that raises is logged
    (once per run of failures) and the loop goes on: a full disk under the pod's records or a
    worker lost in the middle of a step must not end a front's background duty for good."""
    failing = False
    while True:
        try:
            await step()
        except Exception:
            if not failing:
                log.exception("%s failed; retrying every %g s", what, period_s)
            failing = True
        else:
            if failing:
                log.info("%s works again", what)
            failing = False
        await asyncio.sleep(period_s)
