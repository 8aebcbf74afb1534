"""One pod-wide scrape over several fronts: the merge rules and PodMetrics' carry-over."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.telemetry.aggregate import PodMetrics, merge_exposition, merge_families
from server.telemetry.gpu import GpuSample, GpuSampler
from server.telemetry.http import MetricsHttpServer
from server.telemetry.metrics import Metrics
from server.types import ModelState

OK = grpc.StatusCode.OK
D1 = {"model": "dense", "version": "1"}


class _Probe:
    def devices(self) -> list[GpuSample]:
        return [GpuSample(0, "GPU-a", 0.25, 2 << 30, 80 << 30, 250.0, 55.0)]

    def close(self) -> None:
        pass


def samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text.decode())
        for s in fam.samples
    }


def front(requests: int, inflight: int = 0, *, clock: Callable[[], float] = lambda: 0.0) -> Metrics:
    """A front's Metrics after `requests` successful batch-2 requests of 300 us."""
    m = Metrics(clock=clock)
    m.set_model_state("dense", 1, ModelState.READY)
    m.set_capacity("dense", 16)
    m.observe_model_load("dense", 1, 0.5)
    m.set_routing_weights("dense", {1: 10000})
    m.set_pinned_bytes(1000)
    m.set_send_stalls(requests)
    for _ in range(requests):
        m.observe_request("dense", 1, "stable", OK, 3e-4, queue_s=1e-5, compute_s=2e-4, batch=2)
        m.observe_execution("dense", 1, 2)
    for _ in range(inflight):
        m.track_inflight("dense", 1).__enter__()
    sampler = GpuSampler(m.registry, probe_factory=_Probe)
    assert sampler.open()
    sampler.sample_once()
    return m


def test_merge_sums_per_front_series_and_maxes_pod_scoped_ones(k: Callable[..., Any]) -> None:
    a, b = front(3, inflight=2), front(5, inflight=1)
    merged = merge_exposition([generate_latest(a.registry), generate_latest(b.registry)])
    s = samples(merged)
    ok = {**D1, "reason": "stable", "outcome": "success"}
    assert s[k("microtune_requests_total", **ok, code="OK")] == 8
    assert s[k("microtune_inferences_total", **D1)] == 16
    assert s[k("microtune_executions_total", **D1)] == 8
    assert s[k("microtune_request_duration_seconds_bucket", **ok, le="0.0005")] == 8
    assert s[k("microtune_request_duration_seconds_bucket", **ok, le="0.00025")] == 0
    assert s[k("microtune_request_duration_seconds_count", **ok)] == 8
    assert s[k("microtune_request_duration_seconds_sum", **ok)] == pytest.approx(8 * 3e-4)
    # per front: summed
    assert s[k("microtune_inflight_requests", model="dense")] == 3
    assert s[k("microtune_pinned_memory_bytes")] == 2000
    assert s[k("microtune_worker_send_stalls_total")] == 8
    # about the shared worker, config and GPUs: the same in every front, so not doubled
    assert s[k("microtune_model_state", **D1, state="READY")] == 1
    assert s[k("microtune_model_load_duration_seconds", **D1)] == 0.5
    assert s[k("microtune_routing_weight_basis_points", **D1)] == 10000
    assert s[k("microtune_gpu_memory_total_bytes", gpu="0", uuid="GPU-a")] == 80 << 30
    assert not [name for name, _ in s if name.endswith("_created")]


def test_merged_saturation_is_the_pods(clock: Any) -> None:
    """Each front divides its own in-flight work by the pod capacity: the sum is the pod's."""
    fronts = [front(0, inflight=n, clock=clock) for n in (4, 8)]
    clock.now += 1e6
    merged = samples(merge_exposition([generate_latest(f.registry) for f in fronts]))
    sat = merged[("microtune_saturation_ratio", frozenset({("model", "dense")}))]
    assert sat == pytest.approx((4 + 8) / 16)


def test_merged_exposition_passes_promtool(check_metrics: Callable[[bytes], None]) -> None:
    texts = [generate_latest(front(n, inflight=1).registry) for n in (1, 2, 3)]
    check_metrics(merge_exposition(texts))


def test_merge_of_one_is_the_same_exposition() -> None:
    text = generate_latest(front(2).registry)
    again = merge_exposition([text])
    assert merge_exposition([again]) == again
    assert {line for line in text.decode().splitlines() if "_created" not in line} == set(
        again.decode().splitlines()
    )


def test_merge_rejects_one_name_with_two_types() -> None:
    a = b"# TYPE x counter\nx_total 1\n"
    b = b"# TYPE x gauge\nx 1\n"
    with pytest.raises(ValueError, match="x is a counter and a gauge"):
        merge_exposition([a, b])


def test_merge_drops_summary_quantiles_and_keeps_count_and_sum() -> None:
    text = b'# TYPE s summary\ns{quantile="0.5"} 1\ns_count 2\ns_sum 3\n'
    merged = merge_exposition([text, text]).decode()
    assert "quantile" not in merged and "s_count 4.0" in merged and "s_sum 6.0" in merged


def test_max_families_are_configurable() -> None:
    a, b = b"# TYPE g gauge\ng 2\n", b"# TYPE g gauge\ng 5\n"
    assert b"g 7.0" in merge_exposition([a, b])
    assert b"g 5.0" in merge_exposition([a, b], max_families={"g"})
    families = merge_families([[], []])
    assert families == []


# ---------------------------------------------------------------- PodMetrics over HTTP


@pytest.fixture
def fronts() -> Iterator[list[tuple[Metrics, MetricsHttpServer]]]:
    started: list[tuple[Metrics, MetricsHttpServer]] = []
    for n in (2, 3):
        m = front(n)
        started.append((m, m.start_http_server(0, "127.0.0.1")))
    yield started
    for _, server in started:
        server.close()


def _requests(pod: PodMetrics) -> float:
    s = samples(generate_latest(pod.registry))
    ok = {**D1, "reason": "stable", "outcome": "success", "code": "OK"}
    return s.get(("microtune_requests_total", frozenset(ok.items())), 0.0)


def test_pod_metrics_sums_fronts_and_survives_restarts(
    fronts: list[tuple[Metrics, MetricsHttpServer]],
) -> None:
    sources = {f"{i}:100{i}": srv.url for i, (_, srv) in enumerate(fronts)}
    local = front(1)  # the serving process may be a front too
    pod = PodMetrics(lambda: sources, local=local.registry, timeout_s=2.0)
    try:
        assert _requests(pod) == 2 + 3 + 1
        fronts[0][0].observe_request("dense", 1, "stable", OK, 1e-3)
        assert _requests(pod) == 7

        # front 0 restarts: a new process (new key, new port) whose counters start at 0
        restarted = front(0)
        server = restarted.start_http_server(0, "127.0.0.1")
        try:
            sources.pop("0:1000")
            sources["0:2000"] = server.url
            assert _requests(pod) == 7  # its old counts are carried, not lost
            restarted.observe_request("dense", 1, "stable", OK, 1e-3)
            assert _requests(pod) == 8
        finally:
            server.close()

        # a front that does not answer keeps its last values instead of dropping out
        assert _requests(pod) == 8
    finally:
        pod.close()


def test_pod_metrics_detects_a_restart_behind_the_same_key(
    fronts: list[tuple[Metrics, MetricsHttpServer]],
) -> None:
    first, second = fronts
    sources = {"0": first[1].url}
    pod = PodMetrics(lambda: sources)
    try:
        assert _requests(pod) == 2
        sources["0"] = second[1].url  # counts grew from 2 to 3: the same process, carry nothing
        assert _requests(pod) == 3
        fresh = front(1)
        server = fresh.start_http_server(0, "127.0.0.1")
        try:
            sources["0"] = server.url  # went backwards: the previous 3 are retired, not lost
            assert _requests(pod) == 3 + 1
        finally:
            server.close()
    finally:
        pod.close()


def test_pod_metrics_serves_http(fronts: list[tuple[Metrics, MetricsHttpServer]]) -> None:
    import urllib.request

    local = front(1)
    pod = PodMetrics(
        lambda: {str(i): srv.url for i, (_, srv) in enumerate(fronts)}, local=local.registry
    )
    server = pod.start_http_server(0, "127.0.0.1")
    try:
        with urllib.request.urlopen(server.url, timeout=5) as resp:
            body = resp.read()
        assert b"microtune_pinned_memory_bytes 3000.0" in body
        assert b"microtune_requests_total" in body and b"_created" not in body
        # Prometheus asks for OpenMetrics first; the merged families render in it too.
        req = urllib.request.Request(
            server.url, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(req, timeout=5) as resp:
            om = resp.read()
        assert om.endswith(b"# EOF\n") and b"# TYPE microtune_requests counter" in om
    finally:
        server.close()
        pod.close()
