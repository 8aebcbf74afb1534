"""server.stats.VersionStats' `last_inference` (ModelStatistics' `last_inference`): the time of
the last execution, as Triton stamps it (only when it counts an execution:
InferenceStatsAggregator::UpdateInferBatchStatsWithDuration). Failed requests stamped it too,
among them requests cancelled or expired in the queue that never ran."""

from __future__ import annotations

import time

from runtime.ipc.protocol import Timings
from server.stats import VersionStats


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def test_a_failed_request_leaves_last_inference() -> None:
    s = VersionStats()
    s.record_failure(1000)
    assert (s.fail.count, s.last_inference_ms) == (1, 0)


def test_each_execution_stamps_last_inference() -> None:
    s = VersionStats()
    before = now_ms()
    s.record_success(1000, Timings(batch_size=2, executions=0), 1)  # another call counts it
    assert s.last_inference_ms == 0
    s.record_success(1000, Timings(batch_size=2, executions=1), 1)
    assert before <= s.last_inference_ms <= now_ms()
    s.last_inference_ms = 0
    s.record_execution(Timings(batch_size=2, executions=1))  # a call nobody waits for any more
    assert before <= s.last_inference_ms <= now_ms()
