#!/usr/bin/env python3
"""Print the table of every `microtune_` metric family, generated from the live registry.

    python scripts/metrics_doc.py            # the table (pasted into docs/observability.md)
    python scripts/metrics_doc.py --check    # exit 1 if docs/observability.md lacks it verbatim

Builds a `Metrics()` plus a `GpuSampler` fed by a fake GPU, writes one sample into every family
through the public methods (so that each family shows its label names), and lists name, type,
labels, how the pod-wide scrape merges it over several front processes, and its help text.
A family that nothing here writes makes the script fail: extend `exercise()` with it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from prometheus_client.registry import CollectorRegistry  # noqa: E402

from server.telemetry.gpu import GpuSample, GpuSampler  # noqa: E402
from server.telemetry.metrics import POD_SCOPED, Metrics, ShadowOutcome  # noqa: E402
from server.types import ModelState  # noqa: E402

DOC = ROOT / "docs" / "observability.md"


class _FakeGpu:
    def devices(self) -> list[GpuSample]:
        return [GpuSample(0, "GPU-00000000-0000-0000-0000-000000000000", 0.5, 1, 2, 3.0, 40.0)]

    def close(self) -> None:
        pass


def exercise() -> CollectorRegistry:
    """A registry with every family of the front (and the GPU gauges), each with a sample."""
    import grpc

    m = Metrics()
    m.set_model_state("dense", 1, ModelState.READY)
    m.observe_model_load("dense", 1, 0.5)
    m.set_model_device_memory("dense", 1, 1 << 20)
    m.set_capacity("dense", 16)
    m.set_routing_weights("dense", {1: 10_000})
    m.observe_request(
        "dense", 1, "stable", grpc.StatusCode.OK, 1e-3, queue_s=1e-4, compute_s=5e-4, batch=1
    )
    m.observe_execution("dense", 1, 4, graph_replay=True)
    m.observe_execution("dense", 1, 3, graph_replay=False)
    with m.track_inflight("dense"):
        pass
    m.set_pending([("dense", 0)])
    m.count_rollback("dense", 1)
    m.observe_shadow("dense", 1, ShadowOutcome.MATCH, 0.0)
    m.track_shm_slots(lambda: 0, lambda: 1024)
    m.set_pinned_bytes(0)
    m.trace_chunk_lost("backlog")
    gpu = GpuSampler(m.registry, probe_factory=_FakeGpu)
    assert gpu.open()
    gpu.sample_once()
    return m.registry


def rows(registry: CollectorRegistry) -> list[tuple[str, str, str, str, str]]:
    out = []
    for fam in sorted(registry.collect(), key=lambda f: f.name):
        if not fam.samples:
            raise SystemExit(f"metrics_doc: nothing writes {fam.name}; extend exercise()")
        labels: list[str] = []
        for s in fam.samples:
            labels += [k for k in s.labels if k != "le" and k not in labels]
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        merge = "max" if fam.name in POD_SCOPED else "sum"
        label_text = ", ".join(f"`{k}`" for k in labels) or "(none)"
        out.append((f"`{name}`", fam.type, label_text, merge, fam.documentation))
    return out


def table() -> str:
    lines = [
        "| metric | type | labels | pod merge | meaning |",
        "|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in rows(exercise())]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--check", action="store_true", help=f"check that {DOC.name} has the table")
    ns = ap.parse_args()
    text = table()
    if ns.check:
        if text not in DOC.read_text():
            print(f"{DOC} is out of date: paste `python scripts/metrics_doc.py`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
