"""Which calls of a plain version may run on its front's reader thread (runtime.worker_connection).

A call run on the reader is answered without the hop to its version's lane of threads
(runtime.lanes: a thread wake-up and a GIL handoff, which cost more than a tiny model's run).
But while it runs, nothing else of that front is read: every other call of every model, from
every client of the front, waits for it.
An average of past calls cannot promise that the next call is short, because a call's time
depends on its data: a Loop's trip count or an If's branch, a client sending a far larger
tensor than usual, a Range or ConstantOfShape sized by an input's values. So a call runs there
only when all of these hold:

1. The model has no control flow (If/Loop/Scan, in subgraphs and functions too), read from the
   graph at load: its time is set by values no past call bounds, up to any length. A graph file
   over `MAX_PARSED_BYTES` is not parsed a second time (the load would pay its size again, in
   time and memory) and counts as having control flow: such a model is not the tiny one this
   fast path is for.
2. No call of the model has spent `LONG_CPU_NS` of CPU on the reader: the first one that did
   ends inlining for the version's life (a max, where the average forgets). Thread CPU time,
   not wall time: under load a 6 µs model's wall time on the reader reached 9 ms (preemption,
   waits for the GIL), while its CPU time stayed under 0.6 ms; a wall-time rule would have
   taken the fast path away from exactly the models it serves, at random.
3. The call's input bytes are at most those of a call of the model that ran within
   `INLINE_BELOW_NS` (on any thread): a larger input first runs on the lane, and only once a
   call of that size has been seen to be fast do calls of that size run inline.
4. The model's moving average (~16 calls) is under `INLINE_BELOW_NS`.

So a model whose time varies with data the rules above do not see delays its front at most
once, by one call, per load.
"""

from __future__ import annotations

import logging
import os
from typing import Final

from runtime.engine.capturability import control_flow_nodes
from runtime.ipc.protocol import Infer

__all__ = ["INLINE_BELOW_NS", "LONG_CPU_NS", "MAX_PARSED_BYTES", "InlineGate", "has_control_flow"]

log = logging.getLogger(__name__)

# Calls of models whose average execution is shorter than this may run on the reader thread.
INLINE_BELOW_NS: Final = 200_000
# Ten times the budget: far above what noise makes of a fast call's CPU time (a GC pass, page
# faults), and a call that costs ten averages shows a model whose time follows its data.
LONG_CPU_NS: Final = 2_000_000
MAX_PARSED_BYTES: Final = 64 << 20

_UNKNOWN: Final = 1e9  # the average before the first measurement: slow


class InlineGate:
    """One plain version's inline state. Updated by whichever threads run its calls: each field
    is one atomic store under the GIL, and a lost update only keeps a call off the reader
    (`known_bytes` can only be lowered by a race, `closed` is only ever set)."""

    __slots__ = ("avg_ns", "closed", "known_bytes")

    def __init__(self, *, control_flow: bool) -> None:
        self.avg_ns = _UNKNOWN  # moving average of execute() time, unknown (slow) until measured
        self.known_bytes = -1  # largest input seen to run within INLINE_BELOW_NS; -1: none yet
        self.closed = control_flow  # True: never inline again

    def admits(self, call: Infer) -> bool:
        """Whether `call` may run on the reader thread (rules 1 to 4 of the module)."""
        if self.closed or self.avg_ns >= INLINE_BELOW_NS:
            return False
        return sum(ref.nbytes for ref in call.inputs) <= self.known_bytes

    def measured(self, elapsed_ns: int, call: Infer) -> None:
        """A call of the model ran (on any thread) in `elapsed_ns`, wall time."""
        avg = self.avg_ns
        self.avg_ns = elapsed_ns if avg >= _UNKNOWN else avg + (elapsed_ns - avg) / 16
        if elapsed_ns < INLINE_BELOW_NS:
            nbytes = sum(ref.nbytes for ref in call.inputs)
            if nbytes > self.known_bytes:
                self.known_bytes = nbytes

    def ran_inline(self, cpu_ns: int, call: Infer) -> None:
        """A call ran on the reader thread and spent `cpu_ns` of that thread's CPU time."""
        if cpu_ns >= LONG_CPU_NS and not self.closed:
            self.closed = True
            log.warning(
                "model '%s' version %d: a call took %.1f ms of CPU on the connection's reader "
                "thread; its calls run on its own threads from now on",
                call.name,
                call.version,
                cpu_ns / 1e6,
            )


def has_control_flow(path: str) -> bool:
    """Whether the ONNX file at `path` has If/Loop/Scan nodes; True when that cannot be told
    cheaply (a file over MAX_PARSED_BYTES, or one the onnx package cannot read)."""
    try:
        if os.path.getsize(path) > MAX_PARSED_BYTES:
            return True
        import onnx

        model = onnx.load(path, load_external_data=False)
    except Exception:  # no onnx package, an unreadable file: not worth the risk
        return True
    return bool(control_flow_nodes(model))
