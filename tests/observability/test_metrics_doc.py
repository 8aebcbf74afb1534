"""docs/observability.md stays in sync with the code: the generated metric table, every family
of the live registry, every span name and attribute, and PromQL that parses."""

from __future__ import annotations

import re
import subprocess
import sys

from obs_support import OBSERVABILITY_DOC, ROOT, doc_promql
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.telemetry.gpu import GpuSample, GpuSampler
from server.telemetry.metrics import Metrics


def _documented_metrics() -> set[str]:
    return set(re.findall(r"^\| `(microtune_[a-z_]+)` \|", OBSERVABILITY_DOC.read_text(), re.M))


def test_generated_table_is_pasted_verbatim() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "metrics_doc.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_registry_family_is_documented() -> None:
    registry = Metrics().registry

    class OneGpu:
        def devices(self) -> list[GpuSample]:
            return [GpuSample(0, "GPU-1", 0.1, 1, 2, 3.0, 4.0)]

        def close(self) -> None:
            pass

    gpu_registry = CollectorRegistry()
    sampler = GpuSampler(gpu_registry, probe_factory=OneGpu)
    assert sampler.open()
    sampler.sample_once()
    live = set()
    for fam in [*registry.collect(), *gpu_registry.collect()]:
        live.add(f"{fam.name}_total" if fam.type == "counter" else fam.name)
    assert any(name.startswith("microtune_gpu_") for name in live)
    documented = _documented_metrics()
    assert live - documented == set(), "families missing from docs/observability.md"
    assert documented - live == set(), "docs/observability.md lists families that do not exist"
    # What /metrics shows: no `_created` family beside them (an unlabelled counter's appeared
    # as an undocumented family of its own).
    shown = {f.name for f in text_string_to_metric_families(generate_latest(registry).decode())}
    assert "microtune_worker_send_stalls" in shown
    assert [n for n in shown if n.endswith("_created")] == []


def test_every_span_and_attribute_is_documented() -> None:
    source = (ROOT / "server" / "telemetry" / "infer_trace.py").read_text()
    names = set(re.findall(r'"(microtune\.[a-z_]+)"', source))
    assert {"microtune.route", "microtune.queue", "microtune.execute"} <= names
    assert "microtune.batch_size" in names
    doc = OBSERVABILITY_DOC.read_text()
    assert {n for n in names if f"`{n}`" not in doc} == set()


def test_doc_has_the_required_promql() -> None:
    queries = doc_promql()
    assert (
        "histogram_quantile(0.99, sum by (le, version) "
        '(rate(microtune_request_duration_seconds_bucket{model="dense"}[5m])))'
    ) in queries
    assert any('reason=~"canary|stable"' in q and 'outcome="failure"' in q for q in queries)
    assert any("microtune_inferences_total" in q and "microtune_executions_total" in q
               for q in queries)  # fmt: skip
    assert any("microtune_saturation_ratio" in q for q in queries)
