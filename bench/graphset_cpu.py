"""The Python around one CUDA-graph batch, measured on a CPU (diagnostics for issue 4).

    python bench/graphset_cpu.py [--iters 20000] [--batches 1,8]

`GraphSet.run` on the copy-stream path (`Replayer._replay_streamed`, what a GPU worker runs) with
`HostStream` standing in for the CUDA stream (its copies are memmoves), on the benchmark's
`dense` MLP (FP32 [b, 256] -> 10), buckets 1 2 4 8, b requests of one row each. The replay
itself is onnxruntime's CPU run; everything else is the Python a GPU batch pays too, so a change
to the replay path can be weighed here, without a GPU. p50 of `iters` calls after 2000 warm-up
ones, and the phases of the last call (BatchTimings). Compare two trees in the same minutes:
the development machine's speed drifts by 20 % within an hour.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402
import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402

from runtime.engine.buckets import BucketTable  # noqa: E402
from runtime.engine.copy_stream import HostStream  # noqa: E402
from runtime.engine.graphs import GraphSet  # noqa: E402
from runtime.engine.session import signature_of  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=20000)
    p.add_argument("--batches", default="1,8")
    args = p.parse_args()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        gpu_models.mlp().SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    gs = GraphSet(
        sess, BucketTable((1, 2, 4, 8)), signature_of(sess), device_type="cpu", stream=HostStream()
    )
    gs.capture()
    rs = np.random.RandomState(0)
    for b in (int(x) for x in args.batches.split(",")):
        feeds = [{"INPUT0": rs.standard_normal((1, 256)).astype(np.float32)} for _ in range(b)]
        for _ in range(2000):
            gs.run(feeds)
        times = []
        for _ in range(args.iters):
            t0 = time.perf_counter_ns()
            result = gs.run(feeds)
            times.append(time.perf_counter_ns() - t0)
        t = result.timings
        print(
            f"b={b}: GraphSet.run p50 {statistics.median(times) / 1000:.2f} us; last call: "
            f"gather {t.gather_ns / 1000:.1f}, h2d {t.h2d_ns / 1000:.1f}, "
            f"run {t.run_ns / 1000:.1f}, d2h {t.d2h_ns / 1000:.1f} us",
            flush=True,
        )
    gs.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
