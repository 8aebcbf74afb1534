"""The metrics the running server writes from the worker's reports and the model lifecycle, seen
through a real scrape of an in-process server (explicit model control, CPU worker):

- an unloaded version's gauges leave /metrics (and the periodic sync does not bring them back),
  its counters stay; a model removed from the repository loses its gauges the same way;
- `microtune_pending_requests` shows a request while it waits in a worker batcher queue
  (`dense_slow`: a batching delay of seconds), and 0 once it has run;
- the pending and pinned gauges and the send-stalls counter are what the worker reports (a
  stand-in report proves the wiring: on this CPU worker the real pinned figure is 0), and the
  counter does not go down when a report's count is lower (a restarted worker's);
- `microtune_model_device_memory_bytes` is absent on a CPU worker, and is the figure the
  worker's load answer carries when there is one (a stand-in answer, as a GPU worker's).
"""

from __future__ import annotations

import shutil
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import msgspec
import pytest
from obs_support import InProcess, fp32_request, in_process_app, wait_for
from prometheus_client.parser import text_string_to_metric_families

from runtime.ipc.protocol import LoadDone, LoadModel, QueuedCalls, WorkerStatus
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg
from server._proto.microtune import admin_pb2 as apb
from server._proto.microtune import admin_pb2_grpc as apb_grpc
from server.settings import DEMO_REPOSITORY

SYNC_PERIOD_S = 1.0  # App._sync_metrics
SLOW_DELAY_S = 4.0  # dense_slow's max_queue_delay: a lone request waits this long in the queue


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wiring-repo") / "models"
    for name in ("dense", "simple"):
        shutil.copytree(DEMO_REPOSITORY / name, root / name)
    slow = root / "dense_slow"
    shutil.copytree(DEMO_REPOSITORY / "dense" / "1", slow / "1")
    config = (DEMO_REPOSITORY / "dense" / "config.pbtxt").read_text()
    config = config.replace('name: "dense"', 'name: "dense_slow"')
    config += f"dynamic_batching {{ max_queue_delay_microseconds: {int(SLOW_DELAY_S * 1e6)} }}\n"
    (slow / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module")
def explicit(repo: Path) -> Iterator[InProcess]:
    with in_process_app(repo, model_control_mode="explicit", load_model="*") as srv:
        yield srv


def scrape(srv: InProcess) -> list[tuple[str, dict[str, str], float]]:
    assert srv.app.metrics_server is not None
    with urllib.request.urlopen(srv.app.metrics_server.url, timeout=10) as r:
        text = r.read().decode()
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    ]


def series(srv: InProcess, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """The samples of `name` whose labels include `labels`."""
    return [
        (lab, v)
        for n, lab, v in scrape(srv)
        if n == name and all(lab.get(k) == want for k, want in labels.items())
    ]


def gauges_of(srv: InProcess, model: str) -> set[str]:
    """Names of the per-version gauge families that have a series for `model`."""
    per_version = (
        "microtune_model_state",
        "microtune_model_load_duration_seconds",
        "microtune_model_device_memory_bytes",
        "microtune_routing_weight_basis_points",
    )
    return {n for n, lab, _ in scrape(srv) if n in per_version and lab.get("model") == model}


def test_unloaded_versions_leave_the_exposition(explicit: InProcess, repo: Path) -> None:
    srv = explicit
    ready = {"state": "READY"}
    wait_for(
        lambda: (
            len(series(srv, "microtune_model_state", model="dense", **ready)) == 2
            and series(srv, "microtune_model_state", model="simple", **ready)
        ),
        10,
        "dense versions 1 and 2 and simple READY in /metrics",
    )
    assert series(srv, "microtune_model_load_duration_seconds", model="dense", version="2")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        stub.ModelInfer(fp32_request("dense"), timeout=10)
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="dense"), timeout=30)
        assert gauges_of(srv, "dense") == set()  # at once, not at the next sync
        time.sleep(2.5 * SYNC_PERIOD_S)
        assert gauges_of(srv, "dense") == set()  # and the periodic sync does not re-add them
        # Counters stay: removing one would look like a reset to Prometheus.
        assert series(srv, "microtune_requests_total", model="dense", code="OK")
        # The index still lists the versions, as unloaded.
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        assert {(m.version, m.state) for m in index.models if m.name == "dense"} == {
            ("1", "UNAVAILABLE"),
            ("2", "UNAVAILABLE"),
        }
        # Loading again brings them back.
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), timeout=60)
    wait_for(
        lambda: len(series(srv, "microtune_model_state", model="dense", **ready)) == 2,
        10,
        "dense READY again",
    )

    # Poll path: a model whose directory is gone is unloaded and loses its gauges, the
    # per-model ones too (in flight, saturation, pending: they stayed at 0 for ever).
    per_model = {"microtune_inflight_requests", "microtune_saturation_ratio",
                 "microtune_pending_requests"}  # fmt: skip
    wait_for(  # (in flight appears with a first request; none was sent to simple)
        lambda: (
            {n for n, lab, _ in scrape(srv) if lab.get("model") == "simple"}
            >= per_model - {"microtune_inflight_requests"}
        ),
        5,
        "simple's per-model gauges",
    )
    shutil.rmtree(repo / "simple")
    srv.run(srv.app.manager.poll_once())
    assert "simple" not in srv.app.table.models
    assert gauges_of(srv, "simple") == set()
    time.sleep(1.5 * SYNC_PERIOD_S)
    assert gauges_of(srv, "simple") == set()
    assert not {n for n, lab, _ in scrape(srv) if lab.get("model") == "simple"} & per_model
    assert gauges_of(srv, "dense") >= {"microtune_model_state"}


def test_an_unloaded_versions_routing_weight_leaves_the_exposition(explicit: InProcess) -> None:
    """(The routing table outlives an unload, and the periodic sync wrote its weights back
    within a second: the canary's share of traffic read 20 % for a model that served none.)"""
    srv = explicit
    table = '{"weights": {"1": 8000, "2": 2000}, "labels": {"stable": 1, "canary": 2}}'
    with grpc.insecure_channel(srv.target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), timeout=60)
        admin = apb_grpc.RoutingAdminStub(ch)
        admin.SetRouting(apb.SetRoutingRequest(model="dense", table_json=table), timeout=10)
        weights = {"1": 8000.0, "2": 2000.0}
        wait_for(
            lambda: (
                {
                    lab["version"]: v
                    for lab, v in series(
                        srv, "microtune_routing_weight_basis_points", model="dense"
                    )
                }
                == weights
            ),
            5,
            "dense's routing weights",
        )
        stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="dense"), timeout=30)
        time.sleep(2.5 * SYNC_PERIOD_S)
        assert series(srv, "microtune_routing_weight_basis_points", model="dense") == []
        stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="dense"), timeout=60)
        wait_for(  # loaded again: the table's weights are back
            lambda: len(series(srv, "microtune_routing_weight_basis_points", model="dense")) == 2,
            5,
            "dense's routing weights again",
        )
        admin.ClearRouting(apb.ClearRoutingRequest(model="dense"), timeout=10)


def requests(srv: InProcess, **labels: str) -> float:
    return sum(v for _, v in series(srv, "microtune_requests_total", **labels))


def test_requests_that_do_not_decode_are_counted(explicit: InProcess) -> None:
    """Refused by the codec (a raw input of the wrong size, no model name), unary or on a
    stream: INVALID_ARGUMENT like any other, under the model when it is a known one (they
    were traced, but never reached the request counter)."""
    srv = explicit
    before = requests(srv, model="dense", code="INVALID_ARGUMENT")
    before_other = requests(srv, model="_other", code="INVALID_ARGUMENT")
    short = fp32_request("dense")
    short.raw_input_contents[0] = b"\0" * 100
    with grpc.insecure_channel(srv.target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        for req in (short, fp32_request("")):
            with pytest.raises(grpc.RpcError) as ei:
                stub.ModelInfer(req, timeout=10)
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        (answer,) = list(stub.ModelStreamInfer(iter([short]), timeout=10))
        assert "'INPUT0'" in answer.error_message
    wait_for(
        lambda: (
            requests(srv, model="dense", code="INVALID_ARGUMENT") == before + 2
            and requests(srv, model="_other", code="INVALID_ARGUMENT") == before_other + 1
        ),
        5,
        "two refused dense requests and one without a model counted",
    )


def test_a_model_loaded_by_rpc_is_counted_under_its_name_at_once(
    explicit: InProcess, repo: Path
) -> None:
    """Not under "_other" until the next metrics sync declares its name (up to a second)."""
    srv = explicit
    shutil.copytree(DEMO_REPOSITORY / "dense" / "1", repo / "dense_new" / "1")
    config = (DEMO_REPOSITORY / "dense" / "config.pbtxt").read_text()
    (repo / "dense_new" / "config.pbtxt").write_text(
        config.replace('name: "dense"', 'name: "dense_new"')
    )
    other = requests(srv, model="_other", code="OK")
    with grpc.insecure_channel(srv.target) as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        load = pb.RepositoryModelLoadRequest(model_name="dense_new")
        stub.RepositoryModelLoad(load, timeout=60)
        for _ in range(3):
            stub.ModelInfer(fp32_request("dense_new"), timeout=10)
    wait_for(lambda: requests(srv, model="dense_new", code="OK") == 3, 5, "3 dense_new requests")
    assert requests(srv, model="_other", code="OK") == other


def pending(srv: InProcess, model: str) -> float | None:
    found = series(srv, "microtune_pending_requests", model=model)
    return found[0][1] if found else None


def test_a_request_queued_in_the_worker_is_pending(explicit: InProcess) -> None:
    srv = explicit
    wait_for(lambda: pending(srv, "dense_slow") == 0, 10, "dense_slow pending at 0")
    answered: list[bool] = []

    def call() -> None:
        with grpc.insecure_channel(srv.target) as ch:
            stub = pbg.GRPCInferenceServiceStub(ch)
            stub.ModelInfer(fp32_request("dense_slow"), timeout=30)
            answered.append(True)

    started = time.monotonic()
    caller = threading.Thread(target=call, daemon=True)
    caller.start()
    wait_for(lambda: pending(srv, "dense_slow") == 1, SLOW_DELAY_S, "the queued request")
    assert not answered and time.monotonic() - started < SLOW_DELAY_S  # seen while queued
    assert pending(srv, "dense") == 0  # no batcher: requests never wait
    caller.join(30)
    assert answered
    wait_for(lambda: pending(srv, "dense_slow") == 0, 3 * SYNC_PERIOD_S, "pending back at 0")


def test_pending_and_pinned_gauges_are_the_workers_report(
    explicit: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = explicit
    wait_for(
        lambda: series(srv, "microtune_pinned_memory_bytes") == [({}, 0.0)],
        10,
        "pinned bytes reported as 0 by a CPU worker",
    )

    stalls = "microtune_worker_send_stalls_total"
    assert series(srv, stalls) == [({}, 0.0)]

    async def report(timeout_s: float) -> WorkerStatus:
        queued = (QueuedCalls("dense", 1, 3), QueuedCalls("dense", 2, 4))
        return WorkerStatus(0, queued, 1 << 26, send_stalls=5)

    monkeypatch.setattr(srv.app.link, "status", report)
    wait_for(
        lambda: (
            series(srv, "microtune_pinned_memory_bytes") == [({}, float(1 << 26))]
            and pending(srv, "dense") == 7
            and series(srv, stalls) == [({}, 5.0)]
        ),
        3 * SYNC_PERIOD_S,
        "the stand-in report in /metrics",
    )
    monkeypatch.undo()
    wait_for(
        lambda: (
            series(srv, "microtune_pinned_memory_bytes") == [({}, 0.0)]
            and pending(srv, "dense") == 0
        ),
        3 * SYNC_PERIOD_S,
        "the real report again",
    )
    # The real report's count (0 stalls) is below the stand-in's, as a new connection's would
    # be: the counter keeps what it counted.
    assert series(srv, stalls) == [({}, 5.0)]


def test_device_memory_is_absent_on_cpu_and_follows_the_load_answer(
    explicit: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    srv = explicit
    dm = "microtune_model_device_memory_bytes"
    wait_for(lambda: series(srv, "microtune_model_state", model="dense"), 10, "dense in /metrics")
    assert series(srv, dm) == []  # a CPU worker attributes no device memory: no series at all
    client = srv.app.link.client
    assert client is not None
    real_load = client.load

    async def gpu_like_load(msg: LoadModel) -> LoadDone:
        done = await real_load(msg)
        return msgspec.structs.replace(done, device_memory=(40 + msg.version) << 20)

    def reload_dense() -> None:
        with grpc.insecure_channel(srv.target) as ch:
            pbg.GRPCInferenceServiceStub(ch).RepositoryModelLoad(
                pb.RepositoryModelLoadRequest(model_name="dense"), timeout=60
            )

    monkeypatch.setattr(client, "load", gpu_like_load)
    reload_dense()
    want = {"1": float(41 << 20), "2": float(42 << 20)}
    wait_for(
        lambda: {lab["version"]: v for lab, v in series(srv, dm, model="dense")} == want,
        3 * SYNC_PERIOD_S,
        "the load answers' device memory in /metrics",
    )
    monkeypatch.undo()
    reload_dense()  # answered without a figure again: the series go
    wait_for(lambda: series(srv, dm) == [], 3 * SYNC_PERIOD_S, "no device memory series")
