"""Per model-version statistics with Triton's semantics (ModelStatistics RPC).

success/fail: end-to-end request time in the front; queue and compute_* come from the worker.
inference_count counts batch-n requests as n; execution_count counts model executions, and
last_inference_ms is the time of the last one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from runtime.ipc.protocol import Timings

__all__ = ["BatchStats", "Duration", "VersionStats", "merged"]


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += max(ns, 0)


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batches: dict[int, BatchStats] = field(default_factory=dict)

    def record_success(self, total_ns: int, t: Timings, batch_size: int) -> None:
        self.success.add(total_ns)
        self.queue.add(t.queue_ns)
        self.compute_input.add(t.input_ns)
        self.compute_infer.add(t.infer_ns)
        self.compute_output.add(t.output_ns)
        self.inference_count += batch_size
        self.record_execution(t)

    def record_failure(self, total_ns: int) -> None:
        """A failed request (when the model ran it before its answer failed, the front counts
        its execution with `record_execution`)."""
        self.fail.add(total_ns)

    def record_execution(self, t: Timings) -> None:
        """The execution `t` was counted on (a request's, or any other call's:
        server.handler.InferenceHandler._count_execution)."""
        if not t.executions:
            return  # another request of the same execution counts it
        self.execution_count += t.executions
        # As Triton (InferenceStatsAggregator::UpdateInferBatchStatsWithDuration): the last
        # execution's time; a request that never ran (failed, cancelled, expired in the queue)
        # leaves it.
        self.last_inference_ms = max(self.last_inference_ms, time.time_ns() // 1_000_000)
        b = self.batches.get(t.batch_size)
        if b is None:
            b = self.batches[t.batch_size] = BatchStats()
        b.compute_input.add(t.input_ns)
        b.compute_infer.add(t.infer_ns)
        b.compute_output.add(t.output_ns)


_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def merged(first: VersionStats, *others: VersionStats) -> VersionStats:
    """The statistics of one version summed over several fronts (`--frontends N`)."""
    out = VersionStats()
    for s in (first, *others):
        for phase in _PHASES:
            _add(getattr(out, phase), getattr(s, phase))
        out.inference_count += s.inference_count
        out.execution_count += s.execution_count
        out.last_inference_ms = max(out.last_inference_ms, s.last_inference_ms)
        for size, b in s.batches.items():
            total = out.batches.setdefault(size, BatchStats())
            _add(total.compute_input, b.compute_input)
            _add(total.compute_infer, b.compute_infer)
            _add(total.compute_output, b.compute_output)
    return out


def _add(total: Duration, d: Duration) -> None:
    total.count += d.count
    total.ns += d.ns
