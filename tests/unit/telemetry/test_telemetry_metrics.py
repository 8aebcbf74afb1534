"""Metrics: family names, types, labels and units as a scraper sees them; saturation; /metrics."""

from __future__ import annotations

import math
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from runtime.ipc.protocol import Timings
from server.telemetry.gpu import GpuSample, GpuSampler
from server.telemetry.metrics import LATENCY_BUCKETS, OTHER_MODEL, Metrics, ShadowOutcome
from server.telemetry.saturation import Load, capacity_for
from server.types import ModelState

OK = grpc.StatusCode.OK

# name -> (type, label names) for every family a fully exercised Metrics exports.
FAMILIES: dict[str, tuple[str, set[str]]] = {
    "microtune_requests": ("counter", {"model", "version", "reason", "outcome", "code"}),
    "microtune_request_duration_seconds": ("histogram", {"model", "version", "reason", "outcome"}),
    "microtune_queue_duration_seconds": ("histogram", {"model", "version"}),
    "microtune_compute_duration_seconds": ("histogram", {"model", "version"}),
    "microtune_inferences": ("counter", {"model", "version"}),
    "microtune_executions": ("counter", {"model", "version"}),
    "microtune_execution_batch_size": ("histogram", {"model", "version"}),
    "microtune_graph_replays": ("counter", {"model", "version"}),
    "microtune_eager_fallbacks": ("counter", {"model", "version"}),
    "microtune_inflight_requests": ("gauge", {"model"}),
    "microtune_pending_requests": ("gauge", {"model"}),
    "microtune_saturation_ratio": ("gauge", {"model"}),
    "microtune_canary_rollbacks": ("counter", {"model", "version"}),
    "microtune_shadow_comparisons": ("counter", {"model", "version", "outcome"}),
    "microtune_shadow_max_abs_diff": ("histogram", {"model", "version"}),
    "microtune_shm_slots_in_use": ("gauge", set()),
    "microtune_shm_slots_capacity": ("gauge", set()),
    "microtune_pinned_memory_bytes": ("gauge", set()),
    "microtune_worker_send_stalls": ("counter", set()),
    "microtune_trace_chunks_lost": ("counter", {"reason"}),
    "microtune_model_state": ("gauge", {"model", "version", "state"}),
    "microtune_model_load_duration_seconds": ("gauge", {"model", "version"}),
    "microtune_model_device_memory_bytes": ("gauge", {"model", "version"}),
    "microtune_routing_weight_basis_points": ("gauge", {"model", "version"}),
    "microtune_gpu_utilization_ratio": ("gauge", {"gpu", "uuid"}),
    "microtune_gpu_memory_used_bytes": ("gauge", {"gpu", "uuid"}),
    "microtune_gpu_memory_total_bytes": ("gauge", {"gpu", "uuid"}),
    "microtune_gpu_power_watts": ("gauge", {"gpu", "uuid"}),
    "microtune_gpu_temperature_celsius": ("gauge", {"gpu", "uuid"}),
}


class _FixedProbe:
    def devices(self) -> list[GpuSample]:
        return [GpuSample(0, "GPU-a", 0.5, 1 << 30, 80 << 30, 300.0, 61.0)]

    def close(self) -> None:
        pass


def exercise(m: Metrics) -> None:
    """Touch every family once, the way the server will."""
    with m.track_inflight("dense", 2):
        m.observe_request("dense", 1, "stable", OK, 3e-4, queue_s=2e-5, compute_s=2e-4, batch=2)
    m.set_pending([("dense", 1)])
    m.observe_request("nope", None, "", grpc.StatusCode.NOT_FOUND, 1e-5)
    m.observe_execution("dense", 1, 2, graph_replay=True)
    m.observe_execution("dense", 1, 512, graph_replay=False)
    m.count_rollback("dense", 2)
    m.observe_shadow("dense", 2, ShadowOutcome.MISMATCH, 0.25)
    m.track_shm_slots(lambda: 3, lambda: 64)
    m.set_pinned_bytes(64 << 20)
    m.set_send_stalls(2)
    m.trace_chunk_lost("export_failed")
    m.observe_model_load("dense", 1, 0.75)
    m.set_model_device_memory("dense", 1, 12 << 20)
    m.set_routing_weights("dense", {1: 9000, 2: 1000})
    m.set_capacity("dense", capacity_for([8, 8]))
    sampler = GpuSampler(m.registry, probe_factory=_FixedProbe)
    assert sampler.open()
    sampler.sample_once()


def test_every_family_has_its_type_and_labels(metrics: Metrics) -> None:
    exercise(metrics)
    seen: dict[str, tuple[str, set[str]]] = {}
    for fam in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        if fam.name.endswith("_created"):
            continue
        labels = {n for s in fam.samples for n in s.labels if n not in ("le",)}
        seen[fam.name] = (fam.type, labels)
    assert seen == FAMILIES


def test_exposition_passes_promtool(
    metrics: Metrics, check_metrics: Callable[[bytes], None]
) -> None:
    exercise(metrics)
    check_metrics(generate_latest(metrics.registry))


def test_observe_request_counts_labels_and_seconds(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    metrics.observe_request("dense", 1, "canary", OK, 3e-4, queue_s=4e-5, compute_s=2e-4, batch=4)
    metrics.observe_request("dense", 1, "canary", grpc.StatusCode.DEADLINE_EXCEEDED, 2.0)
    s = scrape(metrics.registry)
    mv = {"model": "dense", "version": "1"}
    ok = {**mv, "reason": "canary", "outcome": "success"}
    bad = {**mv, "reason": "canary", "outcome": "failure"}
    assert s[k("microtune_requests_total", **ok, code="OK")] == 1
    assert s[k("microtune_requests_total", **bad, code="DEADLINE_EXCEEDED")] == 1
    # 300 us is above the 250 us bucket and inside the 500 us one: sub-ms work is resolved.
    hist = "microtune_request_duration_seconds_bucket"
    assert s[k(hist, **ok, le="0.00025")] == 0
    assert s[k(hist, **ok, le="0.0005")] == 1
    assert s[k(hist, **bad, le="1.0")] == 0 and s[k(hist, **bad, le="2.5")] == 1
    assert s[k("microtune_request_duration_seconds_sum", **ok)] == pytest.approx(3e-4)
    assert s[k("microtune_queue_duration_seconds_bucket", **mv, le="5e-05")] == 1
    assert s[k("microtune_compute_duration_seconds_sum", **mv)] == pytest.approx(2e-4)
    # Only the successful batch-4 request counts inferences, and counts 4.
    assert s[k("microtune_inferences_total", **mv)] == 4


def test_latency_buckets_span_50us_to_10s() -> None:
    assert LATENCY_BUCKETS[0] <= 50e-6 and LATENCY_BUCKETS[-1] == 10.0
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    assert sum(b < 1e-3 for b in LATENCY_BUCKETS) >= 4


def test_undeclared_model_names_share_one_label(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    for i in range(50):
        metrics.observe_request(f"made-up-{i}", None, "", grpc.StatusCode.NOT_FOUND, 1e-5)
        with metrics.track_inflight(f"made-up-{i}"):
            pass
    s = scrape(metrics.registry)
    labels = {"model": OTHER_MODEL, "version": "", "reason": "", "outcome": "failure"}
    assert s[k("microtune_requests_total", **labels, code="NOT_FOUND")] == 50
    assert not any("made-up" in v for _, lbls in s for _, v in lbls)


def test_observe_execution_batches_and_graphs(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    metrics.observe_execution("dense", 1, 8, graph_replay=True)
    metrics.observe_execution("dense", 1, 8, graph_replay=True)
    metrics.observe_execution("dense", 1, 300, graph_replay=False)
    metrics.observe_execution("simple", 1, 1)  # CPU: no graphs
    s = scrape(metrics.registry)
    d = {"model": "dense", "version": "1"}
    assert s[k("microtune_executions_total", **d)] == 3
    assert s[k("microtune_graph_replays_total", **d)] == 2
    assert s[k("microtune_eager_fallbacks_total", **d)] == 1
    assert s[k("microtune_execution_batch_size_bucket", **d, le="8.0")] == 2
    assert s[k("microtune_execution_batch_size_bucket", **d, le="256.0")] == 2
    assert s[k("microtune_execution_batch_size_sum", **d)] == 316
    assert k("microtune_graph_replays_total", model="simple", version="1") not in s


def test_inflight_returns_to_zero_on_errors(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    with metrics.track_inflight("dense", 3):
        s = scrape(metrics.registry)
        assert s[k("microtune_inflight_requests", model="dense")] == 1
    with pytest.raises(RuntimeError), metrics.track_inflight("dense"):
        raise RuntimeError("boom")
    s = scrape(metrics.registry)
    assert s[k("microtune_inflight_requests", model="dense")] == 0


def test_pending_is_replaced_by_each_report(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    """set_pending takes the worker's (model, calls) per version: versions add up per model,
    models left out have none waiting, an undeclared name counts as OTHER_MODEL."""
    metrics.set_pending([("dense", 2), ("dense", 3), ("typo", 1)])
    s = scrape(metrics.registry)
    assert s[k("microtune_pending_requests", model="dense")] == 5
    assert s[k("microtune_pending_requests", model="simple")] == 0
    assert s[k("microtune_pending_requests", model=OTHER_MODEL)] == 1
    metrics.set_pending([("simple", 1)])
    s = scrape(metrics.registry)
    assert s[k("microtune_pending_requests", model="dense")] == 0
    assert s[k("microtune_pending_requests", model="simple")] == 1
    assert s[k("microtune_pending_requests", model=OTHER_MODEL)] == 0


def test_saturation_is_the_inflight_average_over_capacity(metrics: Metrics, clock: Any) -> None:
    metrics.set_capacity("dense", capacity_for([8]))  # 16 inferences
    assert capacity_for([8]) == 16 and capacity_for([0, 4], executions_per_version=3) == 15
    inflight = metrics.track_inflight("dense", 8)  # half the capacity, from now on
    inflight.__enter__()
    assert metrics.saturation.value("dense") == 0.0
    clock.now += 10.0  # one time constant
    assert metrics.saturation.value("dense") == pytest.approx(0.5 * (1 - math.exp(-1)))
    clock.now += 1000.0
    assert metrics.saturation.value("dense") == pytest.approx(0.5)
    inflight.__exit__(None, None, None)
    clock.now += 10.0
    assert metrics.saturation.value("dense") == pytest.approx(0.5 * math.exp(-1))


def test_saturation_of_a_burst_is_its_time_average(metrics: Metrics, clock: Any) -> None:
    """A short burst counts by its area (inferences x seconds / tau), whenever it happens, so a
    scrape cannot miss it or catch only its peak."""
    metrics.set_capacity("dense", 10)
    with metrics.track_inflight("dense", 100):
        clock.now += 0.1
    burst = metrics.saturation.value("dense")
    assert burst == pytest.approx(100 * (1 - math.exp(-0.01)) / 10, rel=1e-9)
    assert burst == pytest.approx(100 * 0.1 / 10.0 / 10, rel=0.01)  # area / tau / capacity


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.0, 0.05), st.integers(1, 16), st.booleans()), min_size=1, max_size=400
    )
)
def test_saturation_matches_the_exact_average(events: list[tuple[float, int, bool]]) -> None:
    """Against the exact EWMA of the step function (an exp per change): within 0.05 % of the
    peak in-flight count, whatever the traffic."""
    now = [1000.0]
    load = Load(10.0, lambda: now[0])
    exact, level, peak = 0.0, 0, 0
    held: list[int] = []
    for gap, rows, start in events:
        now[0] += gap
        exact = level + (exact - level) * math.exp(-gap / 10.0)
        if start or not held:
            load.enter(rows)
            held.append(rows)
            level += rows
        else:
            rows = held.pop()
            load.leave(rows)
            level -= rows
        peak = max(peak, level)
        assert load.requests == len(held) and load.inferences == level
    for tail in (0.0, 0.003, 5.0):
        now[0] += tail
        exact = level + (exact - level) * math.exp(-tail / 10.0)
        assert load._average(now[0]) == pytest.approx(exact, abs=5e-4 * peak + 1e-12)


def test_saturation_error_is_bounded_for_traffic_in_phase_with_the_cells() -> None:
    """The worst case of the cell approximation: work present in the first half of every cell
    only. Still within 0.05 % of the peak."""
    from server.telemetry.saturation import CELL_S

    now = [1000.0]
    load = Load(10.0, lambda: now[0])
    exact, peak = 0.0, 100
    for _ in range(3000):  # 30 s of 10 ms cells at CELL_S = 10 ms: three time constants
        load.enter(peak)
        now[0] += CELL_S / 2
        exact = peak + (exact - peak) * math.exp(-CELL_S / 2 / 10.0)
        load.leave(peak)
        now[0] += CELL_S / 2
        exact *= math.exp(-CELL_S / 2 / 10.0)
    assert load._average(now[0]) == pytest.approx(exact, abs=5e-4 * peak)
    assert exact == pytest.approx(peak / 2 * (1 - math.exp(-3)), rel=0.01)  # half, charging


def test_saturation_exported_per_model(
    metrics: Metrics, clock: Any, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    metrics.set_capacity("simple", 2)
    with metrics.track_inflight("simple", 1):
        clock.now += 1e6
        s = scrape(metrics.registry)
    assert s[k("microtune_saturation_ratio", model="simple")] == pytest.approx(0.5)


def test_model_state_is_one_hot_and_forgotten(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    metrics.set_model_state("dense", 2, ModelState.READY)
    metrics.observe_model_load("dense", 2, 1.5)
    s = scrape(metrics.registry)
    states = {st.value: s[k("microtune_model_state", model="dense", version="2", state=st.value)]
              for st in ModelState}  # fmt: skip
    assert states == {"LOADING": 0, "READY": 1, "UNAVAILABLE": 0, "UNLOADING": 0}
    assert s[k("microtune_model_load_duration_seconds", model="dense", version="2")] == 1.5
    metrics.forget_version("dense", 2)
    s = scrape(metrics.registry)
    assert not [key for key in s if ("version", "2") in key[1] and "model_" in key[0]]


def test_device_memory_unknown_has_no_series(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    dm = "microtune_model_device_memory_bytes"
    metrics.set_model_device_memory("dense", 1, None)  # a CPU worker: nothing, not 0
    assert k(dm, model="dense", version="1") not in scrape(metrics.registry)
    metrics.set_model_device_memory("dense", 1, 48 << 20)
    assert scrape(metrics.registry)[k(dm, model="dense", version="1")] == 48 << 20
    metrics.set_model_device_memory("dense", 1, None)  # reloaded without a figure
    assert k(dm, model="dense", version="1") not in scrape(metrics.registry)


def test_routing_weights_replace_the_previous_table(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    metrics.set_routing_weights("dense", {1: 9000, 2: 1000})
    metrics.set_routing_weights("dense", {1: 10000})  # guard rollback
    metrics.count_rollback("dense", 2)
    s = scrape(metrics.registry)
    w = "microtune_routing_weight_basis_points"
    assert s[k(w, model="dense", version="1")] == 10000
    assert k(w, model="dense", version="2") not in s
    assert s[k("microtune_canary_rollbacks_total", model="dense", version="2")] == 1


def test_send_stalls_count_what_each_report_adds_and_never_go_down(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    stalls = k("microtune_worker_send_stalls_total")
    seen = []
    for total in (0, 3, 3, 5, 2, 4):  # 2: a restarted worker's new connection counts from 0
        metrics.set_send_stalls(total)
        seen.append(scrape(metrics.registry)[stalls])
    assert seen == [0, 3, 3, 5, 7, 9]
    metrics.worker_restarted()  # the front reconnected: the next report is all new ...
    metrics.set_send_stalls(20)  # ... even above the last one (4)
    assert scrape(metrics.registry)[stalls] == 29


def test_shadow_and_resources(
    metrics: Metrics, scrape: Callable[..., Any], k: Callable[..., Any]
) -> None:
    slots = {"used": 5}
    metrics.track_shm_slots(lambda: slots["used"], lambda: 128)
    metrics.set_pinned_bytes(1 << 26)
    metrics.observe_shadow("dense", 2, ShadowOutcome.MATCH, 0.0)
    metrics.observe_shadow("dense", 2, ShadowOutcome.ERROR)
    slots["used"] = 7  # read at scrape time
    s = scrape(metrics.registry)
    assert s[k("microtune_shm_slots_in_use")] == 7
    assert s[k("microtune_shm_slots_capacity")] == 128
    assert s[k("microtune_pinned_memory_bytes")] == 1 << 26
    sc = "microtune_shadow_comparisons_total"
    assert s[k(sc, model="dense", version="2", outcome="match")] == 1
    assert s[k(sc, model="dense", version="2", outcome="error")] == 1
    assert s[k("microtune_shadow_max_abs_diff_bucket", model="dense", version="2", le="0.0")] == 1
    assert s[k("microtune_shadow_max_abs_diff_count", model="dense", version="2")] == 1


def test_registry_is_private(metrics: Metrics) -> None:
    from prometheus_client import REGISTRY

    exercise(metrics)
    assert b"microtune_" not in generate_latest(REGISTRY)
    Metrics()  # a second instance registers the same names on its own registry without clash


def test_http_server_serves_metrics_only_at_metrics(metrics: Metrics) -> None:
    exercise(metrics)
    server = metrics.start_http_server(0, "127.0.0.1")
    try:
        assert server.port > 0 and server.url.endswith(f":{server.port}/metrics")
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            body = resp.read()
            assert resp.headers["Content-Type"].startswith("text/plain")
        assert b"microtune_requests_total" in body
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
        assert err.value.code == 404
    finally:
        server.close()


_TIMINGS = st.builds(
    Timings,
    queue_ns=st.integers(0, 5 * 10**9),
    input_ns=st.integers(0, 10**7),
    infer_ns=st.integers(0, 10**10),
    output_ns=st.integers(0, 10**7),
    batch_size=st.integers(1, 600),
    executions=st.sampled_from([0, 1]),
    padded_batch=st.sampled_from([0, 8, 512]),
    mode=st.sampled_from(["eager", "replay", "fallback"]),
)
_ENTRIES = st.lists(
    st.tuples(
        st.sampled_from(["dense", "simple", "made-up"]),
        st.sampled_from([1, 2]),
        st.sampled_from(["stable", "canary", "pinned"]),
        st.integers(0, 20 * 10**9),  # front nanoseconds
        _TIMINGS,
        st.integers(1, 16),  # the request's batch
    ),
    max_size=60,
)


def _samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
        for s in fam.samples
        if not s.name.endswith("_created")
    }


@settings(max_examples=60, deadline=None)
@given(entries=_ENTRIES, split=st.integers(0, 60))
def test_requests_counted_in_bulk_equal_per_request_counting(
    entries: list[tuple[str, int, str, int, Timings, int]], split: int
) -> None:
    """What the handler appends to `served`, folded (in two folds here), scrapes as the same
    series as the per-request methods fed the same requests."""
    bulk, each = Metrics(), Metrics()
    for m in (bulk, each):
        m.set_model_state("dense", 1, ModelState.READY)
        m.set_model_state("simple", 2, ModelState.READY)
    for i, entry in enumerate(entries):
        bulk.served.append(entry)
        if i == split:
            bulk.fold_served()
        model, version, reason, ns, t, batch = entry
        each.observe_request(model, version, reason, OK, ns / 1e9,
                             queue_s=t.queue_ns / 1e9,
                             compute_s=(t.input_ns + t.infer_ns + t.output_ns) / 1e9,
                             batch=batch)  # fmt: skip
        if t.executions:
            # A replay, an eager fallback of a version with graphs, or neither (no graphs).
            replay = {"replay": True, "fallback": False}.get(t.mode)
            each.observe_execution(model, version, t.batch_size, graph_replay=replay)
    got = _samples(bulk)  # the scrape folds the rest
    want = _samples(each)
    assert got.keys() == want.keys()
    for name, value in want.items():
        assert got[name] == pytest.approx(value, rel=1e-12), name  # sums: another order


def test_a_fold_on_another_thread_loses_no_request() -> None:
    m = Metrics()
    m.set_model_state("dense", 1, ModelState.READY)
    n = 50_000
    t = Timings(batch_size=1)

    def serve() -> None:
        for _ in range(n):
            m.served.append(("dense", 1, "stable", 1000, t, 1))

    worker = threading.Thread(target=serve)
    worker.start()
    while worker.is_alive():
        m.fold_served()  # as a scrape does, while requests are appended
    worker.join()
    m.fold_served()
    assert m.requests.values[("dense", "1", "stable", "success", "OK")] == n
    assert sum(m.request_seconds.series[("dense", "1", "stable", "success")].counts) == n


def test_an_execution_counted_on_the_loop_during_a_fold_is_not_lost() -> None:
    """The loop counts an execution no served request carries (`observe_execution`: an
    abandoned call's, say) in the series a fold writes, which the scrape thread runs: both
    read-modified-wrote the same value without a common lock, and counts were lost (about 1 %
    here, with thread switches made frequent)."""
    m = Metrics()
    m.set_model_state("dense", 1, ModelState.READY)
    n = 100_000
    t = Timings(batch_size=2)

    def loop() -> None:
        for _ in range(n):
            m.observe_execution("dense", 1, 2)

    def scrape() -> None:
        for _ in range(n // 10):
            for _ in range(10):
                m.served.append(("dense", 1, "stable", 1000, t, 2))
            m.fold_served()

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # a switch between any two bytecodes, as a busy server may
    try:
        threads = [threading.Thread(target=loop), threading.Thread(target=scrape)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        sys.setswitchinterval(interval)
    assert m.executions.values[("dense", "1")] == 2 * n
    series = m.batch_size.series[("dense", "1")]
    assert sum(series.counts) == 2 * n
    assert series.total == 4 * n
