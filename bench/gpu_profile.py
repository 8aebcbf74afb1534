"""Where the time of one GPU batch and of one end-to-end request goes (diagnostics for issue 4).

    python bench/gpu_profile.py [--iters 300] [--device cuda|cpu] [--part worker,e2e]

Part `worker`, in process, per model (`dense`, `encoder`, `embedder`) and batch size (1, 4, 8):
  - GraphSet.run with graphs (the worker's path), split into its BatchTimings phases (gather,
    H2D, replay, D2H) plus the Python around them (total - phases);
  - onnxruntime alone with IOBinding and a graph, split the same way (concatenate,
    update_inplace, run_with_iobinding, numpy());
  - the same without a graph (gpu_graph_id -1), split the same way;
  - the registry check alone (reading back every bound tensor's shape and address).
Part `e2e`: a real server (`--frontends 1`, then the default) on the same models; one
ModelInfer of b rows at a time; the client's wall time beside the server's own account
(ModelStatistics: the front's request time, the worker's queue/input/infer/output), and
ServerLive (the front alone) for the gRPC floor. p50 in microseconds throughout; the
statistics are means (Triton's ModelStatistics has sums and counts only).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_models  # noqa: E402
from e2e_grpc import E2EServer  # noqa: E402
from gpu_bench import MODELS, TABLE, StaticBinding  # noqa: E402

from runtime.engine.graphs import GraphSet  # noqa: E402
from runtime.engine.session import (  # noqa: E402
    make_graph_session,
    make_session,
    preload_cuda_libraries,
    signature_of,
)


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


class Steps:
    """Per-step wall times (us) of repeated runs: `with steps("name"): ...` inside a run."""

    def __init__(self) -> None:
        self.times: dict[str, list[float]] = {}

    def add(self, name: str, ns: int) -> None:
        self.times.setdefault(name, []).append(ns / 1000.0)

    def line(self) -> str:
        return ", ".join(f"{k} {p50(v):.1f}" for k, v in self.times.items())


def split_static(sb: StaticBinding) -> Callable[[list[np.ndarray], Steps], None]:
    """gpu_bench's StaticBinding (same buffers, binding and capture), its four steps timed
    one by one."""

    def run(rows: list[np.ndarray], st: Steps) -> None:
        t0 = time.perf_counter_ns()
        np.concatenate(rows, out=sb.host)
        t1 = time.perf_counter_ns()
        sb.x.update_inplace(sb.host)
        t2 = time.perf_counter_ns()
        sb.sess.run_with_iobinding(sb.io, sb.ro)
        t3 = time.perf_counter_ns()
        sb.y.numpy()
        t4 = time.perf_counter_ns()
        st.add("concat", t1 - t0)
        st.add("h2d", t2 - t1)
        st.add("run", t3 - t2)
        st.add("d2h", t4 - t3)
        st.add("total", t4 - t0)

    return run


def worker_part(args: argparse.Namespace, paths: dict[str, Path]) -> None:
    cuda = args.device == "cuda"
    dev = "cuda" if cuda else "cpu"
    for name, path in paths.items():
        model = MODELS[name]
        row = model.row
        if cuda:
            on = GraphSet.load(str(path), 0, TABLE, intra_op_threads=1)
            if not on.captured:  # (bench/gpu_bench.py reports it too): profile the others
                print(f"{name}: graphs were not captured: {on.reason}", flush=True)
                on.close()
                continue
            plain = make_session(str(path), "cuda:0", 1)
            gsess = make_graph_session(str(path), 0, 1)
        else:
            plain = make_session(str(path), "cpu", 1)
            gsess = make_session(str(path), "cpu", 1)
            on = GraphSet(plain, TABLE, signature_of(plain), device_type="cpu")
            on.capture()
        out_row = tuple(signature_of(plain).outputs[0].shape[1:])
        rs = np.random.RandomState(0)
        for b in (1, 4, 8):
            reqs = [model.inputs(rs, 1) for _ in range(b)]
            feeds = [{"INPUT0": r} for r in reqs]
            st = Steps()
            for i in range(args.warmup + args.iters):
                t0 = time.perf_counter_ns()
                res = on.run(feeds)
                t1 = time.perf_counter_ns()
                if i < args.warmup:
                    continue
                t = res.timings
                st.add("gather", t.gather_ns)
                st.add("h2d", t.h2d_ns)
                st.add("replay", t.run_ns)
                st.add("d2h", t.d2h_ns)
                st.add("python", (t1 - t0) - t.total_ns)
                st.add("total", t1 - t0)
            print(f"{name} b={b} GraphSet.run: {st.line()}", flush=True)
            bucket = TABLE.bucket_for(b)
            assert bucket is not None
            buf = on.bucket(bucket)
            chk = Steps()
            for _ in range(args.iters):
                t0 = time.perf_counter_ns()
                on.registry.check(bucket, on._signature(buf))
                chk.add("registry check", time.perf_counter_ns() - t0)
            print(f"{name} b={b} {chk.line()}", flush=True)
            for label, sess, gid in (("ORT+graph", gsess, 100 + b), ("ORT no graph", plain, None)):
                fn = split_static(StaticBinding(sess, row, out_row, b, dev, gid, model.dtype))
                s = Steps()
                for i in range(args.warmup + args.iters):
                    fn(reqs, s if i >= args.warmup else Steps())
                print(f"{name} b={b} {label}: {s.line()}", flush=True)
        on.close()


def e2e_part(args: argparse.Namespace, paths: dict[str, Path]) -> None:

    from server._proto.inference import grpc_service_pb2 as pb
    from server._proto.inference import grpc_service_pb2_grpc as pbg

    models = {}
    for name, path in paths.items():
        sess = make_session(str(path), "cpu", 1)
        m = MODELS[name]
        models[name] = (path, m.row, tuple(signature_of(sess).outputs[0].shape[1:]), m.dtype)
    device = "cuda:0" if args.device == "cuda" else "cpu"
    rs = np.random.RandomState(1)
    import os

    configs: list[tuple[list[str], float | None]] = [(["--frontends", "1"], None), ([], None)]
    configs += [(["--frontends", "1"], float(x)) for x in args.switch_intervals.split(",") if x]
    base_path = os.environ.get("PYTHONPATH", "")
    for extra, interval in configs:
        # sys.setswitchinterval in every server process (front and worker) via sitecustomize
        site = tempfile.mkdtemp(prefix="switch-")
        if interval is not None:
            Path(site, "sitecustomize.py").write_text(
                f"import sys\nsys.setswitchinterval({interval})\n"
            )
            extra = [*extra]
        os.environ["PYTHONPATH"] = os.pathsep.join(x for x in (site, base_path) if x)
        label = " ".join(extra) or "default fronts"
        if interval is not None:
            label += f" switchinterval {interval}"
        with E2EServer(models, device, extra_args=extra) as srv:
            assert srv.channel is not None
            stub = pbg.GRPCInferenceServiceStub(srv.channel)
            live = []
            for _ in range(args.iters):
                t0 = time.perf_counter_ns()
                stub.ServerLive(pb.ServerLiveRequest())
                live.append((time.perf_counter_ns() - t0) / 1000.0)
            print(f"[{label}] ServerLive p50 {p50(live):.1f}")
            for name in models:
                for b in (1, 8):
                    x = MODELS[name].inputs(rs, b)
                    before = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
                    t, _ = srv.time(name, x, args.warmup, args.iters)
                    after = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name))
                    phases = []
                    for ph in ("success", "queue", "compute_input", "compute_infer",
                               "compute_output"):  # fmt: skip
                        a = getattr(after.model_stats[0].inference_stats, ph)
                        z = getattr(before.model_stats[0].inference_stats, ph)
                        n = a.count - z.count
                        phases.append(f"{ph} {((a.ns - z.ns) / max(n, 1)) / 1000.0:.1f}")
                    print(
                        f"[{label}] {name} b={b}: client p50 "
                        f"{p50(t):.1f} (mean {statistics.fmean(t):.1f}); server means: "
                        + ", ".join(phases),
                        flush=True,
                    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--part", default="worker,e2e")
    p.add_argument("--models", default="dense,encoder,embedder")
    p.add_argument("--switch-intervals", default="0.0001", help="extra e2e runs with these")
    args = p.parse_args()
    if args.device == "cuda":
        preload_cuda_libraries()
    with tempfile.TemporaryDirectory(prefix="gpu-profile-") as tmp:
        paths = {
            n: gpu_models.save(MODELS[n].build(), Path(tmp) / f"{n}.onnx")
            for n in args.models.split(",")
        }
        if "worker" in args.part:
            worker_part(args, paths)
        if "e2e" in args.part:
            e2e_part(args, paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
