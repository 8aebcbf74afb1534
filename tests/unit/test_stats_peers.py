"""ModelStatistics for the pod (server.stats_peers, server.stats.merged): each front serves its
counts on a Unix socket and the front that got the call sums everyone's. Real sockets, one
event loop standing in for three fronts; a socket left by a dead front is skipped."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

from runtime.ipc.protocol import Timings
from server.stats import VersionStats, merged
from server.stats_peers import Snapshot, StatsPeers


def _served(n: int, batch: int = 1) -> VersionStats:
    s = VersionStats()
    for _ in range(n):
        s.record_success(1000, Timings(10, 20, 30, 40, batch, 1), batch)
    return s


def test_merged_sums_every_phase_and_batch_size() -> None:
    a, b = _served(3), _served(2, batch=4)
    b.record_failure(500)
    m = merged(a, b)
    assert (m.success.count, m.success.ns) == (5, 5000)
    assert (m.fail.count, m.fail.ns) == (1, 500)
    assert (m.compute_infer.count, m.compute_infer.ns) == (5, 150)
    assert (m.inference_count, m.execution_count) == (3 + 8, 5)
    assert {k: v.compute_infer.count for k, v in m.batches.items()} == {1: 3, 4: 2}
    assert m.last_inference_ms == max(a.last_inference_ms, b.last_inference_ms)
    assert merged(a) == a and merged(a) is not a  # a copy: the front's own counts stay its own


def test_a_front_gathers_the_other_fronts_counts(tmp_path: Path) -> None:
    counts: dict[int, Snapshot] = {
        0: [("dense", 1, _served(1))],
        1: [("dense", 1, _served(2)), ("simple", 1, _served(5))],
        2: [("dense", 1, _served(4))],
    }

    async def scenario() -> list[Snapshot]:
        fronts = [StatsPeers(tmp_path, i, lambda i=i: counts[i]) for i in counts]
        for f in fronts:
            await f.start()
        dead = socket.socket(socket.AF_UNIX)  # a front that died: its socket file stays
        dead.bind(str(tmp_path / "stats-7.sock"))
        dead.close()
        try:
            return await fronts[0].gather(timeout_s=2.0)
        finally:
            for f in fronts:
                await f.close()

    got = asyncio.run(scenario())
    assert sorted(len(s) for s in got) == [1, 2]  # fronts 1 and 2; not itself, not the dead one
    dense = merged(*(st for s in got for (m, _v, st) in s if m == "dense"))
    assert dense.success.count == 6
    assert not list(tmp_path.glob("stats-[012].sock"))  # each front removed its socket
