"""What observability costs the front's event loop, in instructions per request.

    python bench/front_instructions.py [--configs off,metrics,trace0,trace,both] [--rounds 2]

Throughput on the shared 2-core development machine swings by +-15 % between runs (other
tenants, CPU steal); the instructions the front's event-loop thread retires per request repeat
to about 1 %. The front's loop is the bottleneck at concurrency 16 on `dense`, so its
instructions per request predict the throughput cost of a feature. This starts one server per
configuration on the demo repository (the OTLP ones export to the fake collector of
observability_overhead.py), drives each in turn with perf_analyzer on `dense` at c=16, and
counts with `perf stat -e instructions:u -t <front pid>` (Linux perf: the `linux-perf` Debian
package) over the whole run, divided by the requests the server's statistics counted:

- off: `--tracing off --metrics-port -1`;  metrics: metrics only;
- trace0: tracing with nothing sampled;  trace: tracing at 100 %;  both: trace + metrics.

It also prints the CPU per request of the front (all threads) and of the worker, from /proc.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import PA, _children, _proc_cpu
from observability_overhead import REPO, Collector, Server, free_port

TRACE = ["--tracing", "otlp", "--trace-sampling-ratio"]
CONFIGS = {
    "off": ["--tracing", "off", "--metrics-port", "-1"],
    "metrics": ["--tracing", "off", "--metrics-port", "METRICS"],
    "trace0": [*TRACE, "0.0", "--metrics-port", "-1"],
    "trace": [*TRACE, "1.0", "--metrics-port", "-1"],
    "both": [*TRACE, "1.0", "--metrics-port", "METRICS"],
}


def served(port: int) -> int:
    import tritonclient.grpc as tg

    stats = tg.InferenceServerClient(f"127.0.0.1:{port}").get_inference_statistics(
        "dense", as_json=True
    )
    return sum(int(m["inference_stats"]["success"].get("count", 0)) for m in stats["model_stats"])


def pa(port: int, window_ms: int, trials: int) -> None:
    """Drive `dense` for `trials` windows. Only the load matters here (the server counts the
    requests), so perf_analyzer's own "not stable" verdict is not an error."""
    done = subprocess.run(
        [str(PA), "-m", "dense", "-u", f"127.0.0.1:{port}", "-i", "grpc", "-b", "1",
         "--concurrency-range", "16", "--measurement-interval", str(window_ms),
         "--stability-percentage", "1000", "--max-trials", str(trials)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0 and "stable measurement" not in done.stdout + done.stderr:
        raise RuntimeError(f"perf_analyzer failed:\n{done.stdout[-2000:]}\n{done.stderr}")


def measure(server: Server) -> tuple[float, float, float, float, float]:
    """(loop instructions, loop CPU us, front CPU us, worker CPU us) per request, and requests
    per second."""
    pid = server.p.pid
    workers = _children(pid)
    n0, f0, w0 = served(server.port), _proc_cpu(pid), sum(_proc_cpu(k) for k in workers)
    perf = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", "instructions:u,cycles:u,task-clock", "-t", str(pid)],
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = os.times().elapsed
    pa(server.port, 2000, 3)
    wall = os.times().elapsed - t0
    n = served(server.port) - n0
    perf.send_signal(signal.SIGINT)
    _, err = perf.communicate()
    counts = {
        line.split(",")[2]: float(line.split(",")[0])
        for line in err.strip().splitlines()
        if line.count(",") >= 3 and not line.startswith("<")
    }
    if "cycles:u" in counts:
        print(f"   user cycles/request on the loop: {counts['cycles:u'] / n / 1e3:.0f}k")
    # A VM without hardware counters reports them "<not supported>" (skipped above): the
    # instruction count is then NaN and only the CPU times remain.
    instructions, loop_ms = counts.get("instructions:u", float("nan")), counts["task-clock"]
    front = _proc_cpu(pid) - f0
    worker = sum(_proc_cpu(k) for k in workers) - w0
    return instructions / n, 1e3 * loop_ms / n, 1e6 * front / n, 1e6 * worker / n, n / wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--configs", default="off,metrics,trace0,trace,both")
    ap.add_argument("--rounds", type=int, default=2)
    ns = ap.parse_args()
    if shutil.which("perf") is None:
        print("needs Linux perf (apt-get install linux-perf)", file=sys.stderr)
        return 2
    collector = Collector()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{collector.port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
    }
    common = ["--model-repository", str(REPO), "--grpc-port", "0", "--log-level", "WARNING"]
    servers = {
        c: Server(c, [*common, *(str(free_port()) if a == "METRICS" else a for a in CONFIGS[c])],
                  env)
        for c in ns.configs.split(",")
    }  # fmt: skip
    try:
        for s in servers.values():
            s.wait()
            pa(s.port, 1000, 1)  # warm-up
        for r in range(1, ns.rounds + 1):
            for name, s in servers.items():
                instr, loop, front, worker, rate = measure(s)
                print(
                    f"round {r} {name:>8}: {instr / 1e3:6.1f}k loop instructions/request, "
                    f"loop {loop:5.1f} us, front {front:5.1f} us, worker {worker:5.1f} us "
                    "CPU/request, "
                    f"~{rate:,.0f} requests/s",
                    flush=True,
                )
    finally:
        for s in servers.values():
            s.stop()
        collector.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
