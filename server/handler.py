"""The data plane: every RPC's logic, free of protobuf and gRPC.

Servicers (server/rpc) decode a request into domain types, call one method here, and encode the
result; errors are domain errors (server/errors) that server/rpc/status maps to gRPC codes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from msgspec.structs import replace as struct_replace

from runtime.client import (
    ArenaFull,
    CallFailed,
    OutputTensor,
    WorkerGone,
)
from runtime.ipc.file_slice import SliceTruncated
from runtime.ipc.protocol import Code, ModelSignature, Timings
from server import __version__
from server.cuda_regions import CudaRegions
from server.errors import (
    DataRejected,
    DeadlineExceeded,
    InvalidInput,
    MicrotuneError,
    ModelFailed,
    NotFound,
    NotReady,
    Overloaded,
    Unsupported,
)
from server.lifecycle import ModelManager
from server.models import ModelTable, VersionEntry
from server.repository import model_names
from server.request_shm import (
    OutputRegions,
    in_regions,
    response_tensor,
    served_outputs,
    shm_input,
)
from server.router import RouteHints, Router
from server.routing import compare_outputs, route_key_point, should_shadow
from server.routing.shadow import OutputLike
from server.shm_regions import SharedMemoryRegistry
from server.stats import VersionStats, merged
from server.stats_peers import Snapshot, StatsPeers
from server.telemetry.infer_trace import InferTrace
from server.telemetry.metrics import Metrics, ShadowOutcome
from server.telemetry.tracing import RequestTracer
from server.types import (
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelSpec,
    ModelState,
    Tensor,
)
from server.validation import Plan, plan_call
from server.versions import parse_version
from server.worker_link import WorkerLink

__all__ = ["EXTENSIONS", "InferenceHandler", "ModelView", "StatsRow"]

_NO_HINTS = RouteHints()

# How early a cancellation may come before the request's deadline and still be its expiry
# (grpc's timer and ours read the same clock at different instants).
DEADLINE_SLACK_S = 0.005

# What a response needs besides its outputs' bytes (names, shapes, parameters), at most: the
# outputs may take the rest of the largest message the server sends.
RESPONSE_HEADROOM = 64 * 1024

log = logging.getLogger("microtune.handler")


@dataclass(slots=True)
class _Routed:
    """Where routing sent a request, for the metrics of a request that then failed."""

    version: int | None = None
    reason: str = ""


# Only what is really implemented (ServerMetadata.extensions); the shared-memory ones are
# added where they are on (InferenceHandler.server_metadata).
EXTENSIONS = (
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
)


@dataclass(frozen=True, slots=True)
class ModelView:
    """What ModelMetadata and ModelConfig report for one version."""

    name: str
    version: int
    versions: tuple[int, ...]
    spec: ModelSpec
    signature: ModelSignature
    instances: int  # calls (batches, with dynamic batching) the worker runs at once


@dataclass(frozen=True, slots=True)
class StatsRow:
    name: str
    version: int
    stats: VersionStats


class InferenceHandler:
    def __init__(
        self,
        table: ModelTable,
        link: WorkerLink,
        manager: ModelManager,
        shm: SharedMemoryRegistry,
        router: Router,
        server_name: str,
        metrics: Metrics | None = None,
        tracer: RequestTracer | None = None,
        status_of: Callable[[BaseException | None], Any] = lambda exc: None,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.status_of = status_of
        self.shm = shm
        self.cuda = CudaRegions(shm, link)  # client CUDA shared memory: registry + worker
        self.router = router
        self._background: set[asyncio.Task[None]] = set()
        self.table = table
        self.link = link
        self.manager = manager
        self.server_name = server_name
        self.started = False  # the repository's first load pass has finished
        self.draining = False  # stopping (--shutdown-delay-s): not ready, still serving
        self.strict_readiness = True  # (Settings.strict_readiness: see ModelTable.failed)
        self.max_message_bytes = 2**62  # (Settings.max_message_bytes: see _check_response_size)
        self.peers: StatsPeers | None = None  # the pod's other fronts (--frontends N)
        link.on_orphan_execution = self._orphan_execution

    def _orphan_execution(self, model: str, version: int, t: Timings) -> None:
        """An execution counted on a call whose caller gave up (a cancellation, a deadline
        hit while it ran): its batch's other calls were answered, so it did run."""
        entry = self.table.models.get(model)
        ve = entry.versions.get(version) if entry is not None else None
        self._count_execution(model, version, ve, t)

    def _count_execution(
        self, model: str, version: int, ve: VersionEntry | None, t: Timings
    ) -> None:
        """Count the execution `t` carries (`t.executions`) in the statistics and the metrics,
        for a call that is no served request. The worker counts each execution on one call of
        its batch, whichever that is; served requests' executions are counted with them (bulk
        metrics: server.telemetry.served), any other call's here, or the execution is lost:
        a call whose caller gave up, a shadow call, a request that failed after its run."""
        if not t.executions:
            return
        if ve is not None:
            ve.stats.record_execution(t)
        if self.metrics is not None:
            replay = {"replay": True, "fallback": False}.get(t.mode)
            self.metrics.observe_execution(model, version, t.batch_size, graph_replay=replay)

    # ------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        if self.draining or not (self.started and self.link.ready) or self.table.loading():
            return False
        return not (self.strict_readiness and self.table.failed())

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        extensions = EXTENSIONS
        if self.shm.enabled:  # (--allow-client-shm: else every shared-memory RPC is refused)
            extensions += ("system_shared_memory",)
            welcome = self.link.welcome
            if welcome is not None and welcome.device.startswith("cuda"):
                extensions += ("cuda_shared_memory",)
        return self.server_name, __version__, extensions

    def model_ready(self, name: str, version: str) -> bool:
        # Unknown and unloaded models are simply not ready (OK status), as in Triton.
        if not name:
            raise InvalidInput("model name is required")
        return self.link.ready and self.table.is_ready(name, version)

    def model_view(self, name: str, version: str) -> ModelView:
        if not name:
            raise InvalidInput("model name is required")
        ve = self.table.resolve(name, version)
        entry = self.table.get(name)
        # The config the version serves with, which requests are checked against: the
        # model's last config may be that of a load that failed, leaving it serving as it was.
        assert ve.spec is not None and ve.signature is not None
        # As Triton: the version asked for, or every ready one.
        versions = (ve.version,) if version else tuple(entry.ready_versions())
        instances = self.manager.instances(ve.spec)
        return ModelView(name, ve.version, versions, ve.spec, ve.signature, instances)

    # ------------------------------------------------------------ inference

    def refused(self, model: str, exc: MicrotuneError, start_ns: int) -> None:
        """A request refused before `infer` (it did not decode): counted as any answered one,
        under `model` when it is a known name."""
        if self.metrics is not None:
            seconds = (time.perf_counter_ns() - start_ns) / 1e9
            self.metrics.observe_request(model, None, "", self.status_of(exc), seconds)

    async def infer(
        self,
        req: InferRequest,
        deadline: float | None,
        hints: RouteHints = _NO_HINTS,
        span: InferTrace | None = None,
    ) -> InferResponse:
        """Run one request. `deadline` is a time.monotonic() value (from the gRPC deadline);
        `span`: the request's trace record when it is sampled (the servicer starts and ends it)."""
        start = time.perf_counter_ns()
        routed = _Routed()
        timeout_us = req.parameters.get("timeout") if req.parameters else None
        if isinstance(timeout_us, int) and timeout_us > 0:
            # Triton's request timeout (tritonclient's `infer(timeout=...)`, microseconds):
            # a deadline of the request's own, the gRPC one's if that is sooner.
            own = time.monotonic() + timeout_us / 1e6
            deadline = own if deadline is None else min(deadline, own)
        try:
            return await self._infer(req, deadline, hints, start, routed, span)
        except BaseException as exc:
            counted: BaseException = exc
            if isinstance(exc, asyncio.CancelledError):
                # grpc cancels the call when its deadline passes before ours fires: that is a
                # DEADLINE_EXCEEDED (the client's status), counted as such. Any other
                # cancellation counts as CANCELLED (as Triton's failure counter counts them):
                # the client's own, and a deadline that fired at the client more than the
                # slack before ours (ours starts when the call's headers are read, later
                # under load), which reaches us as a cancellation, the client seeing
                # DEADLINE_EXCEEDED. Either way the request failed, as ModelStatistics counts
                # it (`fail`), and both views count the same failures.
                expired = deadline is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S
                if expired:
                    counted = DeadlineExceeded("deadline exceeded")
            if self.metrics is not None:
                seconds = (time.perf_counter_ns() - start) / 1e9
                self.metrics.observe_request(
                    req.model, routed.version, routed.reason, self.status_of(counted), seconds
                )
            if isinstance(exc, ModelFailed):
                # The model failed at run time: the operator's business, one attributed line.
                # Client errors log nothing (the client has the message); unexpected exceptions
                # are logged with their traceback by server.rpc.status.
                log.warning(
                    "inference failed: %s",
                    exc.message,
                    extra={
                        "request_id": req.id or None,
                        "model": req.model,
                        "version": None if routed.version is None else str(routed.version),
                    },
                )
            raise

    async def _infer(
        self,
        req: InferRequest,
        deadline: float | None,
        hints: RouteHints,
        start: int,
        routed: _Routed,
        span: InferTrace | None,
    ) -> InferResponse:
        if hints.routing_key is None and "routing_key" in req.parameters:
            hints = replace(hints, routing_key=str(req.parameters["routing_key"]))
        if span is not None:
            span.model, span.requested, span.route_start = req.model, req.version, time.time_ns()
        try:
            try:
                route = self.router.route(req.model, req.version, hints)
            except NotFound:
                if self.started:
                    raise
                # The repository is still being read: the model may well be in it (a lone
                # front listens at once, answering UNAVAILABLE until its models are loaded).
                raise NotReady(
                    f"model '{req.model}' is not available yet: the server is starting"
                ) from None
        except BaseException as exc:
            if span is not None:
                span.route_end = time.time_ns()
                span.route_error = (type(exc).__name__, str(exc))
            raise
        if span is not None:
            span.route_end = time.time_ns()
            span.served, span.reason = route.version, route.reason
        routed.version, routed.reason = route.version, route.reason
        ve = self.table.models[req.model].versions[route.version]
        spec, sig = ve.spec, ve.signature
        assert spec is not None and sig is not None
        if self.shm.directory is not None and (
            req.output_shm or any(t.shm is not None for t in req.inputs)
        ):
            # The one wait before the call: counted in flight (as from here to the answer,
            # below), or an unload that drains meanwhile would not wait for this request.
            ve.inflight += 1
            try:
                await self.cuda.adopt(req)
            finally:
                ve.inflight -= 1
        on_device = False  # some input stays in a client CUDA region (read by the worker)
        if any(t.shm is not None for t in req.inputs):
            req = struct_replace(req, inputs=tuple(shm_input(self.shm, t) for t in req.inputs))
            on_device = any(t.shm is not None for t in req.inputs)
        plan = plan_call(req, sig, spec.max_batch_size)
        if on_device:
            plan = struct_replace(plan, inputs=in_regions(plan.inputs, req))
        outs = OutputRegions(self.shm, req) if req.output_shm else None
        metrics = self.metrics
        # Counted from routing to the answer: unloading this version waits for it (drain).
        ve.inflight += 1
        load = metrics.inflight(req.model) if metrics is not None else None
        try:
            client = self.link.require()
            if load is not None:
                load.enter(plan.batch_size)
            try:
                result = await client.infer(
                    req.model,
                    ve.version,
                    plan.inputs,
                    plan.outputs,
                    plan.output_reserve,
                    deadline,
                    span.ref if span is not None else b"",
                    None if outs is None else outs.cuda,
                    None if outs is None else outs.sink,
                )
            finally:
                if load is not None:
                    load.leave(plan.batch_size)
        except BaseException as exc:
            elapsed = time.perf_counter_ns() - start
            ve.stats.record_failure(elapsed)
            err = _domain_error(exc, ve)
            # The guard counts what the version did: not requests refused before it ran, nor
            # those given up on; data the model refused as it ran, yes (a canary that refuses
            # what its stable version takes; the client data's share is the same for both).
            judged = isinstance(err, DataRejected) or not isinstance(
                err, InvalidInput | DeadlineExceeded | asyncio.CancelledError
            )
            if judged:
                self.router.observe(req.model, ve.version, elapsed / 1e9, ok=False)
            raise err from None
        finally:
            ve.inflight -= 1
        t = result.timings
        try:
            outputs = tuple(response_tensor(req, o, outs) for o in result.outputs)
            _check_response_size(req.id, outputs, self.max_message_bytes - RESPONSE_HEADROOM)
        except MicrotuneError:  # an output region too small, say: the client's, after the run
            ve.stats.record_failure(time.perf_counter_ns() - start)
            self._count_execution(req.model, ve.version, ve, t)  # the model did run
            raise
        elapsed = time.perf_counter_ns() - start
        ve.stats.record_success(elapsed, t, plan.batch_size)
        self.router.observe(req.model, ve.version, elapsed / 1e9, ok=True)
        if metrics is not None:  # counted in bulk (server.telemetry.served)
            entry = (req.model, ve.version, route.reason, elapsed, t, plan.batch_size)
            metrics.served.append(entry)
        if span is not None:
            span.timings, span.answer_ns = t, time.time_ns()
        self._maybe_shadow(req, route.version, plan, result.outputs, hints, outs)
        return InferResponse(req.model, str(ve.version), req.id, outputs, route.reason)

    def _maybe_shadow(
        self,
        req: InferRequest,
        served: int,
        plan: Plan,
        outputs: Sequence[OutputTensor],
        hints: RouteHints,
        outs: OutputRegions | None,
    ) -> None:
        """Mirror a sampled share of requests to the shadow version, off the response path."""
        model = req.model
        table = self.router.tables.get(model)
        shadow = None if table is None else table.shadow
        if shadow is None or shadow.version == served:
            return
        source: int | random.Random = (
            route_key_point(hints.routing_key, salt="shadow")
            if hints.routing_key is not None
            else self.router.rng
        )
        if not should_shadow(source, shadow.sample_bp):
            return
        ve = self.table.models[model].versions.get(shadow.version)
        if ve is None or ve.state is not ModelState.READY:
            return
        if any(t.region for t in plan.inputs):
            return  # device memory the client may reuse at once: nothing to mirror from
        served_out = served_outputs(outputs, outs)
        if served_out is None:
            return  # an output is in device memory: nothing to compare with
        # Shared-memory inputs may change once the client has its answer: copy them now.
        try:
            inputs = tuple(struct_replace(t, payload=bytes(t.payload)) for t in plan.inputs)
        except SliceTruncated:  # the client's region shrank meanwhile: nothing to mirror
            return
        task = asyncio.create_task(
            self._shadow(model, ve, struct_replace(plan, inputs=inputs), served_out)
        )
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shadow(
        self, model: str, ve: VersionEntry, plan: Plan, served: list[OutputLike]
    ) -> None:
        tally = self.router.shadow_tally(model)
        tally.requests += 1
        start = time.perf_counter()
        ve.inflight += 1
        try:
            result = await self.link.require().infer(
                model, ve.version, plan.inputs, plan.outputs, plan.output_reserve, None
            )
            # The worker may count a whole batch's execution on this call (it batches shadow
            # calls with the version's own requests).
            self._count_execution(model, ve.version, ve, result.timings)
            diff = compare_outputs(
                served, [(o.name, o.datatype, o.shape, o.data) for o in result.outputs]
            )
        except Exception:  # a shadow failure never reaches the client
            tally.errors += 1
            if self.metrics is not None:
                self.metrics.observe_shadow(model, ve.version, ShadowOutcome.ERROR)
            return
        finally:
            ve.inflight -= 1
            tally.latency_s += time.perf_counter() - start
        if not diff.identical:
            tally.mismatches += 1
        if diff.max_abs_diff is not None:
            tally.max_abs_diff = max(tally.max_abs_diff, diff.max_abs_diff)
        if self.metrics is not None:
            outcome = ShadowOutcome.MATCH if diff.identical else ShadowOutcome.MISMATCH
            self.metrics.observe_shadow(model, ve.version, outcome, diff.max_abs_diff)

    # ------------------------------------------------------------ statistics and repository

    async def statistics(self, name: str, version: str) -> list[StatsRow]:
        """Triton's ModelStatistics; with several fronts, summed over the pod's fronts."""
        rows = self._own_statistics(name, version)
        if self.peers is None or not rows:
            return rows
        others: dict[tuple[str, int], list[VersionStats]] = {}
        for snapshot in await self.peers.gather():
            for model, v, stats in snapshot:
                others.setdefault((model, v), []).append(stats)
        return [
            StatsRow(r.name, r.version, merged(r.stats, *others.get((r.name, r.version), ())))
            for r in rows
        ]

    def stats_snapshot(self) -> Snapshot:
        """This front's counts of every version (what the pod's other fronts ask for)."""
        models = self.table.models.values()
        return [(e.name, v, ve.stats) for e in models for v, ve in e.versions.items()]

    def _own_statistics(self, name: str, version: str) -> list[StatsRow]:
        # As Triton: the version string is checked first, whatever the name; without a name,
        # a valid one is ignored (every model's ready versions).
        number = parse_version(version) if version else None
        entries = [self.table.get(name)] if name else list(self.table.models.values())
        rows: list[StatsRow] = []
        for e in entries:
            if number is not None and name:
                ve = e.versions.get(number)
                if ve is None:
                    raise NotFound(f"model '{name}' has no version {version}")
                rows.append(StatsRow(e.name, ve.version, ve.stats))
                continue
            rows.extend(StatsRow(e.name, v, e.versions[v].stats) for v in e.ready_versions())
        return rows

    async def repository_index(self, ready_only: bool) -> list[ModelIndexEntry]:
        on_disk = None
        if not ready_only and self.started and self.manager.mode != "poll":
            # Explicit and none modes load only what they are told, yet the index shows the
            # repository as it is now, as Triton's does (it polls the repository for it): a
            # model added since start-up is listed as not loaded, one removed and not loaded
            # is not listed. (Poll mode's table follows the repository at every poll; until
            # the start-up scan has filled the table, a model about to load is not "not
            # loaded".)
            try:
                names = await asyncio.to_thread(model_names, self.manager.repository)
                on_disk = frozenset(names)
            except OSError:  # the repository's volume gone: the table is all there is
                pass
        return self.table.index(ready_only, on_disk)

    async def load_model(
        self, name: str, config_json: str | None, files: Mapping[str, bytes]
    ) -> None:
        if not name:
            raise InvalidInput("model_name is required")
        await self.manager.load(name, config_json, files)

    async def unload_model(self, name: str) -> None:
        if not name:
            raise InvalidInput("model_name is required")
        await self.manager.unload(name)

    def unsupported(self, rpc: str, why: str) -> MicrotuneError:
        return Unsupported(f"{rpc} is not supported by this server: {why}")


def _check_response_size(request_id: str, outputs: Sequence[Tensor], limit: int) -> None:
    """Refuse a response gRPC would not send: it failed the call as it was sent, after the
    request was counted a success, and on ModelStreamInfer it ended the whole stream. Besides
    the outputs' bytes, a response echoes what the client chose, as large as its request may
    be: the request's id and the names of the regions outputs were written to (the rest, the
    model's names and shapes, fits in RESPONSE_HEADROOM)."""
    size = 0
    echoed = len(request_id.encode())
    for t in outputs:
        size += len(t.data)
        if t.shm is not None:
            echoed += len(t.shm.region.encode())
    if size + echoed > limit:
        raise Overloaded(
            f"the response would take {size + echoed} bytes ({size} of outputs, {echoed} of the "
            "request's id and output region names), more than a response may carry "
            f"({limit} bytes: --max-message-bytes less room for the rest of the message); ask "
            "for fewer outputs or a smaller batch, have them written to shared memory, or send "
            "a shorter id"
        )


def _domain_error(exc: BaseException, ve: VersionEntry) -> BaseException:
    if isinstance(exc, MicrotuneError):
        return exc
    if isinstance(exc, WorkerGone):
        return NotReady(f"the runtime worker is unavailable ({exc}); retry")
    if isinstance(exc, ArenaFull):
        return Overloaded(str(exc))
    if isinstance(exc, SliceTruncated):  # a client region truncated while its bytes were read
        return InvalidInput(str(exc))
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return DeadlineExceeded("deadline exceeded before the model returned")
    if isinstance(exc, CallFailed):
        match exc.code:
            case Code.BAD_INPUT:
                return InvalidInput(exc.message)
            case Code.DATA_REJECTED:
                return DataRejected(exc.message)
            case Code.NOT_LOADED | Code.NOT_READY:
                return NotReady(f"model '{ve.model}' version {ve.version} is not loaded")
            case Code.OVERLOADED:
                return Overloaded(exc.message)
            case Code.DEADLINE:
                return DeadlineExceeded(exc.message)
            case Code.MODEL_FAILED:
                return ModelFailed(f"model '{ve.model}' version {ve.version} failed: {exc.message}")
    return exc  # unexpected: the status layer logs it and answers INTERNAL
