"""Where one call's time goes at concurrency 1 (issue 4's end-to-end budget, docs/gpu.md §12).

perf_analyzer at concurrency 1 sends `dense` b=1 to, in turn and for several rounds (the
machine drifts, so the paths are alternated within each round):
- `floor`: bench/floor_server.py, a grpc.aio server answering prebuilt bytes (no work);
- `inline`: microtune, `dense` without batching (run on the worker's reader thread);
- `batched`: microtune, `dense` with dynamic batching (the version's batcher thread);
- `graphs`: microtune `--cpu-graphs true`, `dense` served by its graph set on its own thread,
  its calls on the version's direct channel (the GPU worker's path, on the CPU EP).
Each microtune run also prints the worker's phases from ModelStatistics (means, µs), so the
queue (reader → batcher hop, or channel read → replay) is seen apart from the rest.

    python bench/latency_c1.py [--rounds 3] [--interval 1000] [--paths floor,inline,graphs]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import grpc
from harness import ROOT, Proc, perf

sys.path.insert(0, str(ROOT))
from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pbg

DEMO_DENSE = ROOT / "server" / "demo_repository" / "dense"
SERVE = [sys.executable, "-m", "server", "serve", "--grpc-port", "0", "--frontends", "1"]
QUIET = ["--metrics-port", "-1", "--tracing", "off", "--log-level", "WARNING"]
PATHS = {  # name -> (command, model)
    "floor": (
        [sys.executable, "bench/floor_server.py", "--model", "dense", "--port", "0"],
        "dense",
    ),
    "inline": ([*SERVE, *QUIET], "dense"),
    "batched": ([*SERVE, *QUIET], "dense_batched"),
    "graphs": ([*SERVE, *QUIET, "--cpu-graphs", "true"], "dense"),
}
PHASES = ("success", "queue", "compute_input", "compute_infer", "compute_output")


def repository(base: Path) -> Path:
    """The demo's dense as `dense` (no batching) and `dense_batched` (dynamic batching)."""
    repo = base / "models"
    shutil.copytree(DEMO_DENSE, repo / "dense")
    shutil.copytree(DEMO_DENSE, repo / "dense_batched")
    config = repo / "dense_batched" / "config.pbtxt"
    text = config.read_text().replace('name: "dense"', 'name: "dense_batched"')
    config.write_text(text + "dynamic_batching { max_queue_delay_microseconds: 0 }\n")
    return repo


def phases(port: int, model: str) -> str:
    """The worker's mean phases of `model` (all versions) since the server started."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pbg.GRPCInferenceServiceStub(ch)
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name=model), timeout=10)
    parts = []
    for name in PHASES:
        ns = n = 0
        for s in stats.model_stats:
            d = getattr(s.inference_stats, name)
            ns, n = ns + d.ns, n + d.count
        parts.append(f"{name} {ns / max(n, 1) / 1000:.1f}")
    return " ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--interval", type=int, default=1000, help="perf_analyzer window, ms")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"of {', '.join(PATHS)}")
    args = ap.parse_args()
    chosen = [p.strip() for p in args.paths.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PATHS]
    if unknown:
        ap.error(f"unknown paths {unknown}")
    base = Path(tempfile.mkdtemp(prefix="latency-c1-"))
    repo = repository(base)
    p50: dict[str, list[float]] = {p: [] for p in chosen}
    try:
        for r in range(1, args.rounds + 1):
            for name in chosen:
                command, model = PATHS[name]
                if name != "floor":
                    command = [*command, "--model-repository", str(repo)]
                server = Proc(command, name)
                try:
                    port = server.wait(ready_check=name != "floor")
                    row, _ = perf(model, port, 1, args.interval, None)
                    p50[name].append(row["p50 latency"])
                    extra = "" if name == "floor" else "  worker: " + phases(port, model)
                    print(f"round {r} {name:8} p50 {row['p50 latency']:7.0f} us{extra}", flush=True)
                finally:
                    server.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(
        "\np50 (us) over the rounds: "
        + "; ".join(f"{n} {min(v):.0f}-{max(v):.0f}" for n, v in p50.items() if v)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
