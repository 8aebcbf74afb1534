"""Prometheus metrics of one front process: the `microtune_` family, on a private registry.

Every series is written through a method with explicit arguments (`observe_request`,
`observe_execution`, ...), so label names and values live in this module only. Durations are in
seconds, sizes in bytes, routing weights in basis points (Prometheus base units).

Several front processes (`--frontends N`) each own a `Metrics`; `server.telemetry.aggregate`
merges their expositions into one pod-wide scrape. Each family is therefore either
*front-scoped*: each front counts its own requests, arena and in-flight work, and the pod's value
is the sum (counters, histograms, and the gauges inflight, pending, saturation, shm slots, pinned
bytes); or *pod-scoped*: every front reports the same fact about the shared worker, the model
configuration or the GPUs, and the pod's value is the max (`POD_SCOPED`).

Label values: `version` is the version that served a request ("" when none was resolved);
`reason` is the routing reason (pinned, label, canary, stable; "" before routing decides);
`model` is a name declared with `set_model_state`, any other name counts as `OTHER_MODEL`.
The saturation gauge is defined in `server.telemetry.saturation`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from enum import StrEnum
from typing import Final

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.telemetry.fastpath import (
    FastCounter,
    FastHistogram,
    HistogramSeries,
    RequestPathCollector,
)
from server.telemetry.http import MetricsHttpServer, start_http_server
from server.telemetry.saturation import Load, Saturation
from server.telemetry.served import ServedLog, Tally
from server.types import ModelState

__all__ = [
    "BATCH_BUCKETS",
    "DIFF_BUCKETS",
    "LATENCY_BUCKETS",
    "OTHER_MODEL",
    "POD_SCOPED",
    "Metrics",
    "ShadowOutcome",
]

_INFLIGHT = "microtune_inflight_requests"
_OK = grpc.StatusCode.OK
# 25 us .. 10 s: a `dense` request takes ~100-300 us end to end on CPU, so the low buckets matter.
LATENCY_BUCKETS: Final = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6,
    1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3,
    1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
# Powers of two, like the CUDA-graph batch buckets (issue 4).
BATCH_BUCKETS: Final = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
# le=0 isolates bit-identical shadow answers; then one bucket per decade up to "clearly wrong".
DIFF_BUCKETS: Final = (0.0, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

# The model name comes from the client: one series per invented name would let any client grow
# the exposition without bound, so undeclared names share this label value.
OTHER_MODEL: Final = "_other"

# Families every front reports identically; merged by max (see aggregate.merge_exposition).
POD_SCOPED: Final = frozenset(
    {
        "microtune_model_state",
        "microtune_model_load_duration_seconds",
        "microtune_model_device_memory_bytes",
        "microtune_routing_weight_basis_points",
        "microtune_gpu_utilization_ratio",
        "microtune_gpu_memory_used_bytes",
        "microtune_gpu_memory_total_bytes",
        "microtune_gpu_power_watts",
        "microtune_gpu_temperature_celsius",
    }
)

_MV: Final = ("model", "version")


class ShadowOutcome(StrEnum):
    MATCH = "match"  # the shadow answered and every output is within tolerance
    MISMATCH = "mismatch"  # it answered, but some output differs beyond tolerance
    ERROR = "error"  # the shadow call failed (never visible to the client)


class Metrics:
    """All `microtune_` series of one front process, on `self.registry` (not the global one)."""

    def __init__(
        self, *, saturation_tau_s: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        # No `_created` series: prometheus-client adds one per counter and histogram, and for
        # an unlabelled counter the text format shows it as a family of its own (an undocumented
        # `microtune_worker_send_stalls_created` on a lone front; the supervisor's pod view
        # drops them). Prometheus does not need them. (prometheus-client's switch is global:
        # the front owns its process, and exports nothing else.)
        disable_created_metrics()
        self.registry = r = CollectorRegistry()
        self._models: set[str] = set()  # declared model names (label values we accept)
        self._observed: dict[tuple[object, ...], _Observed] = {}  # see _entry
        self._weighted: dict[str, set[str]] = {}  # model -> versions with a weight series
        self._pending_labels: set[str] = set()  # model labels with a pending series

        def counter(name: str, doc: str, labels: Sequence[str] = _MV) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: Sequence[str] = _MV) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        def histogram(name: str, doc: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Histogram:
            return Histogram(name, doc, _MV, buckets=buckets, registry=r)

        # The families written on every request: plain counters and bucket lists (fastpath).
        self.requests = FastCounter(
            "microtune_requests",
            "Inference requests answered, by routing reason, outcome and gRPC status code.",
            [*_MV, "reason", "outcome", "code"],
        )
        self.request_seconds = FastHistogram(
            "microtune_request_duration_seconds",
            "End-to-end request time in the front process.",
            [*_MV, "reason", "outcome"],
            LATENCY_BUCKETS,
        )
        self.queue_seconds = FastHistogram(
            "microtune_queue_duration_seconds",
            "Time a request waited in the worker's queue.",
            _MV,
            LATENCY_BUCKETS,
        )
        self.compute_seconds = FastHistogram(
            "microtune_compute_duration_seconds",
            "Worker compute time of a request (input + infer + output).",
            _MV,
            LATENCY_BUCKETS,
        )
        self.inferences = FastCounter(
            "microtune_inferences", "Successful inferences (a batch-n request counts n).", _MV
        )
        self.executions = FastCounter(
            "microtune_executions",
            "Model executions (average batch = inferences / executions).",
            _MV,
        )
        self.batch_size = FastHistogram(
            "microtune_execution_batch_size",
            "Batch size of each model execution.",
            _MV,
            BATCH_BUCKETS,
        )
        self.graph_replays = FastCounter(
            "microtune_graph_replays", "Executions that replayed a captured CUDA graph.", _MV
        )
        self.eager_fallbacks = FastCounter(
            "microtune_eager_fallbacks",
            "Executions run eagerly on a model that has CUDA graphs (no bucket fits, or "
            "tensors bound in CUDA shared memory).",
            _MV,
        )
        # Successful requests: appended on the request path, counted in bulk (served.py).
        self.served = ServedLog(LATENCY_BUCKETS, BATCH_BUCKETS)
        r.register(
            RequestPathCollector(
                (
                    self.requests,
                    self.request_seconds,
                    self.queue_seconds,
                    self.compute_seconds,
                    self.inferences,
                    self.executions,
                    self.batch_size,
                    self.graph_replays,
                    self.eager_fallbacks,
                ),
                before=self.fold_served,
            )
        )
        self.saturation = Saturation(saturation_tau_s, clock)
        r.register(self.saturation)
        r.register(_InFlightCollector(self.saturation))  # the loads' request counts
        self.pending = gauge(
            "microtune_pending_requests",
            "Requests of this front waiting in the worker: in a batcher queue or for a thread"
            " of their version (sampled every second).",
            ["model"],
        )
        self.rollbacks = counter(
            "microtune_canary_rollbacks", "Canary guard rollbacks (the version's weight set to 0)."
        )
        self.shadow = counter(
            "microtune_shadow_comparisons",
            "Shadow requests compared with the served answer, by outcome.",
            [*_MV, "outcome"],
        )
        self.shadow_diff = histogram(
            "microtune_shadow_max_abs_diff",
            "Largest absolute difference between shadow and served outputs, per comparison.",
            DIFF_BUCKETS,
        )
        self.shm_in_use = gauge("microtune_shm_slots_in_use", "Arena slots leased to calls.", ())
        self.shm_capacity = gauge("microtune_shm_slots_capacity", "Arena slots in total.", ())
        self.pinned = gauge(
            "microtune_pinned_memory_bytes",
            "Bytes of this front's arena page-locked by the worker.",
            (),
        )
        self.send_stalls = counter(
            "microtune_worker_send_stalls",
            "Times the worker found this front's sockets full and left answers to a writer thread"
            " (this front's event loop fell behind reading them).",
            (),
        )
        self._send_stalls_seen = 0  # the worker's running count at the last report
        self.trace_chunks_lost = counter(
            "microtune_trace_chunks_lost",
            "Chunks of request spans (up to 1024 requests each) not exported, by reason:"
            " backlog (too many exports in flight) or export_failed (the collector refused"
            " them, or could not be reached).",
            ("reason",),
        )
        self.model_state = gauge(
            "microtune_model_state",
            "1 for the state a model version is in, 0 for the other states.",
            [*_MV, "state"],
        )
        self.load_seconds = gauge(
            "microtune_model_load_duration_seconds",
            "Time the last load of a version took (load, warm-up, self-test).",
        )
        self.device_memory = gauge(
            "microtune_model_device_memory_bytes", "Device memory attributed to a version at load."
        )
        self.weights = gauge(
            "microtune_routing_weight_basis_points",
            "Routing weight of a version in basis points of 10000 (a canary's share).",
        )

    # ------------------------------------------------------------ request path

    def observe_request(
        self,
        model: str,
        version: int | None,
        reason: str,
        code: grpc.StatusCode,
        seconds: float,
        *,
        queue_s: float | None = None,
        compute_s: float | None = None,
        batch: int = 1,
    ) -> None:
        """Record one answered ModelInfer.

        `version`: the version that served it (None: none was resolved); `seconds`: end to end in
        the front; `queue_s`/`compute_s`: the worker's times when the request ran; `batch`: the
        request's own batch size (inferences count it on success).
        """
        e = self._entry(model, version, reason, code)
        values = self.requests.values
        values[e.counter_key] = values.get(e.counter_key, 0.0) + 1
        e.latency.add(seconds)
        if queue_s is not None:
            self._queue_series(e).add(queue_s)
        if compute_s is not None:
            self._compute_series(e).add(compute_s)
        if e.ok:
            self.inferences.inc(e.mv, batch)

    def fold_served(self) -> None:
        """Count the successful requests appended to `served` since the last fold (the event
        loop calls this periodically, a scrape before collecting)."""
        self.served.fold(self._count_served)

    def _count_served(self, key: tuple[str, int, str], tally: Tally) -> None:
        model, version, reason = key
        e = self._entry(model, version, reason, _OK)
        values = self.requests.values
        values[e.counter_key] = values.get(e.counter_key, 0.0) + tally.requests
        e.latency.merge(tally.latency.counts, tally.latency.total)
        self._queue_series(e).merge(tally.queue.counts, tally.queue.total)
        self._compute_series(e).merge(tally.compute.counts, tally.compute.total)
        self.inferences.inc(e.mv, tally.inferences)
        if tally.executions:
            self.executions.inc(e.mv, tally.executions)
            self.batch_size.series_for(e.mv).merge(tally.batch.counts, tally.batch.total)
            if tally.replays:
                self.graph_replays.inc(e.mv, tally.replays)
            if tally.eager:
                self.eager_fallbacks.inc(e.mv, tally.eager)

    def _entry(
        self, model: str, version: int | None, reason: str, code: grpc.StatusCode
    ) -> _Observed:
        """The label tuples and series of one (model, version, reason, code), built once
        (bounded: the model is a declared one or OTHER_MODEL). The code is keyed by id: hashing
        an Enum member runs Python code (Enum.__hash__)."""
        m = model if model in self._models else OTHER_MODEL
        e = self._observed.get((m, version, reason, id(code)))
        return e if e is not None else self._request_entry(m, version, reason, code)

    def _queue_series(self, e: _Observed) -> HistogramSeries:
        if e.queue is None:
            e.queue = self.queue_seconds.series_for(e.mv)
        return e.queue

    def _compute_series(self, e: _Observed) -> HistogramSeries:
        if e.compute is None:
            e.compute = self.compute_seconds.series_for(e.mv)
        return e.compute

    def _request_entry(
        self, m: str, version: int | None, reason: str, code: grpc.StatusCode
    ) -> _Observed:
        if len(self._observed) >= 4096:
            self._observed.clear()
        v = "" if version is None else str(version)
        ok = code is grpc.StatusCode.OK
        outcome = "success" if ok else "failure"
        e = _Observed(
            (m, v, reason, outcome, code.name),
            self.request_seconds.series_for((m, v, reason, outcome)),
            (m, v),
            ok,
        )
        self._observed[(m, version, reason, id(code))] = e
        return e

    def observe_execution(
        self, model: str, version: int, batch_size: int, *, graph_replay: bool | None = None
    ) -> None:
        """Record one model execution.

        Call exactly once per execution: when a batch serves several requests (possibly from
        several fronts), only the reply the worker marks as the batch's first carries it, so the
        pod sum counts each execution once. `graph_replay`: True = replayed a CUDA graph, False =
        ran eagerly on a model that has graphs, None = graphs not in use (CPU).
        """
        mv = (model if model in self._models else OTHER_MODEL, str(version))
        with self.served.lock:  # a fold (the scrape thread's too) writes these series
            self.executions.inc(mv)
            self.batch_size.series_for(mv).add(batch_size)
            if graph_replay is True:
                self.graph_replays.inc(mv)
            elif graph_replay is False:
                self.eager_fallbacks.inc(mv)

    def inflight(self, model: str) -> Load:
        """The in-flight work of `model` (an undeclared name: OTHER_MODEL's): the request path
        calls `enter(inferences)` when a request is admitted and `leave(inferences)` when it is
        answered, failed or not; that is the in-flight gauge and the saturation signal."""
        return self.saturation.load(model if model in self._models else OTHER_MODEL)

    def track_inflight(self, model: str, batch: int = 1) -> AbstractContextManager[None]:
        """`with` block counting a request of `batch` inferences as in flight."""
        return _InFlight(self.inflight(model), batch)

    def set_pending(self, queued: Iterable[tuple[str, int]]) -> None:
        """Replace every model's pending count with `queued`: (model, calls) for each version
        with calls of this front waiting in the worker (batcher queue or lane), as the worker
        reported them (not per request: the front samples the worker off the request path).
        Declared models not in it have 0 waiting."""
        counts = dict.fromkeys(self._models | self._pending_labels, 0)
        for model, calls in queued:
            label = model if model in self._models else OTHER_MODEL
            counts[label] = counts.get(label, 0) + calls
        for label, calls in counts.items():
            self.pending.labels(label).set(calls)
        self._pending_labels = set(counts)

    # ------------------------------------------------------------ models and routing

    def set_model_state(self, model: str, version: int, state: ModelState) -> None:
        """Set a version's state (one series per state, 1 for the current one); this also
        declares `model` as a label value."""
        self._models.add(model)
        for s in ModelState:
            self.model_state.labels(model, str(version), s.value).set(1.0 if s is state else 0.0)

    def forget_model(self, model: str) -> None:
        """A model gone from the repository: its per-model gauges (in flight, saturation,
        pending) leave the exposition and its name is no longer a label value; its counters
        stay, as a version's do."""
        self._models.discard(model)
        self.saturation.forget(model)
        _remove(self.pending, model)
        self._pending_labels.discard(model)

    def forget_version(self, model: str, version: int) -> None:
        """Drop an unloaded version's gauges (counters stay: removing one would look like a
        reset to Prometheus)."""
        v = str(version)
        for s in ModelState:
            _remove(self.model_state, model, v, s.value)
        for g in (self.load_seconds, self.device_memory, self.weights):
            _remove(g, model, v)
        self._weighted.get(model, set()).discard(v)

    def observe_model_load(self, model: str, version: int, seconds: float) -> None:
        self.load_seconds.labels(model, str(version)).set(seconds)

    def set_model_device_memory(self, model: str, version: int, nbytes: int | None) -> None:
        """Device memory the worker attributed to the version's load; None (a CPU worker, or
        not attributable) leaves no series rather than a misleading 0."""
        if nbytes is None:
            _remove(self.device_memory, model, str(version))
        else:
            self.device_memory.labels(model, str(version)).set(nbytes)

    def set_capacity(self, model: str, inferences: int) -> None:
        """The model's pod capacity in inferences (`saturation.capacity_for`); 0 = not serving."""
        self.saturation.set_capacity(model, inferences)

    def set_routing_weights(self, model: str, weights: Mapping[int, int]) -> None:
        """Replace the model's routing weights (basis points per version)."""
        new = {str(v) for v in weights}
        for v in self._weighted.get(model, set()) - new:
            _remove(self.weights, model, v)
        self._weighted[model] = new
        for version, bp in weights.items():
            self.weights.labels(model, str(version)).set(bp)

    def count_rollback(self, model: str, version: int) -> None:
        """The canary guard set `version`'s weight to 0."""
        self.rollbacks.labels(model, str(version)).inc()

    def observe_shadow(
        self, model: str, version: int, outcome: ShadowOutcome, max_abs_diff: float | None = None
    ) -> None:
        """One shadow comparison of shadow `version`; `max_abs_diff` when outputs compared."""
        self.shadow.labels(model, str(version), outcome.value).inc()
        if max_abs_diff is not None:
            self.shadow_diff.labels(model, str(version)).observe(max_abs_diff)

    # ------------------------------------------------------------ resources and serving

    def track_shm_slots(self, in_use: Callable[[], int], capacity: Callable[[], int]) -> None:
        """Read the arena's slot counts at scrape time (nothing on the request path)."""
        self.shm_in_use.set_function(lambda: float(in_use()))
        self.shm_capacity.set_function(lambda: float(capacity()))

    def set_pinned_bytes(self, nbytes: int) -> None:
        """This front's arena bytes the worker reports page-locked (0: nothing pinned, e.g. a
        CPU worker)."""
        self.pinned.set(nbytes)

    def set_send_stalls(self, total: int) -> None:
        """The worker's running count of stalls of this front's sockets (WorkerStatus): the
        counter grows by what is new since the last report. A count below the last one is a new
        connection's (a restarted worker): all of it is new."""
        seen, self._send_stalls_seen = self._send_stalls_seen, total
        new = total - seen if total >= seen else total
        if new:
            self.send_stalls.inc(new)

    def trace_chunk_lost(self, reason: str) -> None:
        """server.telemetry.otlp_async.AsyncChunkSender.on_loss."""
        self.trace_chunks_lost.labels(reason).inc()

    def worker_restarted(self) -> None:
        """A new worker counts stalls from 0: its first report is all new, even when it is
        higher than the last report of the worker before (which the heuristic above would
        take for growth)."""
        self._send_stalls_seen = 0

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> MetricsHttpServer:
        """Serve this registry at http://host:port/metrics (port 0 picks a free port)."""
        return start_http_server(self.registry, port, host)


class _Observed:
    """What observe_request updates for one (model, version, reason, code)."""

    __slots__ = ("compute", "counter_key", "latency", "mv", "ok", "queue")

    def __init__(
        self, counter_key: tuple[str, ...], latency: HistogramSeries, mv: tuple[str, str], ok: bool
    ) -> None:
        self.counter_key = counter_key
        self.latency = latency
        self.mv = mv
        self.ok = ok
        self.queue: HistogramSeries | None = None  # made on first use: no empty series in /metrics
        self.compute: HistogramSeries | None = None


class _InFlight(AbstractContextManager[None]):
    __slots__ = ("batch", "load")

    def __init__(self, load: Load, batch: int) -> None:
        self.load, self.batch = load, batch

    def __enter__(self) -> None:
        self.load.enter(self.batch)

    def __exit__(self, *exc: object) -> None:
        self.load.leave(self.batch)


class _InFlightCollector(Collector):
    """`microtune_inflight_requests`, read from the loads at scrape time."""

    def __init__(self, saturation: Saturation) -> None:
        self._saturation = saturation

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(_INFLIGHT, "")]

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(
            _INFLIGHT, "Requests admitted by the front and not yet answered.", labels=["model"]
        )
        for model, load in sorted(self._saturation.loads()):
            fam.add_metric([model], load.requests)
        yield fam


def _remove(metric: Gauge, *labels: str) -> None:
    with suppress(KeyError):  # removing a series that was never set is fine
        metric.remove(*labels)
