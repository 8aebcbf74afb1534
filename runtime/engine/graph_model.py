"""A model version served from CUDA graphs: its GraphSet, its batcher, and its one thread.

onnxruntime keeps captured graphs in the capturing thread's context, so one thread per version
does everything: load and capture every bucket (before the version is READY), then run the
batching loop; each batch is padded to its bucket and replayed, or runs on the counted eager
path. Calls are answered from that thread into each caller's arena. With `GraphSet(device_type=
"cpu")` the same code runs on the CPU EP (graph ids accepted and ignored), which is how the CPU
test suite exercises it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from runtime.engine.batcher import Batcher, Pending
from runtime.engine.bound import run_bound, uses_regions
from runtime.engine.golden import check_golden, load_golden
from runtime.engine.graphs import BadBatch, GraphSet
from runtime.engine.model import ARENA, BadInput, _input_array, _run_error, _write_outputs
from runtime.engine.regions import RegionError, RegionTable
from runtime.ipc.protocol import Code, Infer, InferDone, LoadModel, ModelSignature, Timings

__all__ = ["GraphModel", "Queued"]

log = logging.getLogger(__name__)

# What a queued call carries: (answer callback, the call, the arena, when it arrived, the
# CUDA shared-memory regions of its front).
Queued = tuple[Callable[[InferDone], None], Infer, memoryview, int, RegionTable | None]


class GraphModel:
    """Start with `GraphModel.start(...)`: returns once every bucket is captured (or raises
    what the load raised); then `submit` calls and `close()` to drain and free."""

    def __init__(self, spec: LoadModel, batcher: Batcher[Queued]) -> None:
        self.name = spec.name
        self.version = spec.version
        self.spec = spec
        self.batcher = batcher
        self.graphs: GraphSet | None = None
        self.signature: ModelSignature | None = None
        self.device_memory: int | None = None  # bytes its load took on the device (None: unknown)
        self._thread: threading.Thread | None = None

    @classmethod
    def start(
        cls,
        spec: LoadModel,
        make_graphs: Callable[[], GraphSet],
        batcher: Batcher[Queued],
        timeout_s: float = 600.0,
    ) -> GraphModel:
        model = cls(spec, batcher)
        loaded = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            try:
                model.graphs = make_graphs()  # loads and captures on this thread
                model.signature = model.graphs.signature
                if spec.golden_path:
                    model._self_test(spec.golden_path)
            except BaseException as exc:
                failure.append(exc)
                loaded.set()
                return
            loaded.set()
            try:
                batcher.run(model._run_batch, model._expire)
            finally:
                model.graphs.close()

        model._thread = threading.Thread(
            target=serve, daemon=True, name=f"graphs-{spec.name}-{spec.version}"
        )
        model._thread.start()
        if not loaded.wait(timeout_s):
            raise TimeoutError(f"capture of {spec.name} version {spec.version} took too long")
        if failure:
            raise failure[0]
        return model

    @property
    def reason(self) -> str | None:
        """Why this version runs without graphs (None: every bucket is captured)."""
        return None if self.graphs is None else self.graphs.reason

    def submit(self, item: Pending[Queued]) -> None:
        self.batcher.submit(item)

    def close(self) -> None:
        """Drain the queue (calls already routed here finish), then free the graphs."""
        self.batcher.close()
        if self._thread is not None:
            self._thread.join(30)

    # ------------------------------------------------------------------ on the serving thread

    def _self_test(self, path: str) -> None:
        assert self.graphs is not None and self.signature is not None
        feeds, expected = load_golden(path, self.signature)
        result = self.graphs.run([feeds])
        names = list(self.graphs.output_names)
        wanted = [n for n in names if n in expected]
        outs = result.outputs[0]
        check_golden(expected, wanted, [outs[names.index(n)] for n in wanted])

    def _expire(self, p: Pending[Queued]) -> None:
        answer, call, _buf, _recv, _regions = p.payload
        answer(InferDone(call.call_id, Code.DEADLINE, "deadline expired while queued"))

    def _run_batch(self, batch: list[Pending[Queued]]) -> None:
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        t0 = time.monotonic_ns()
        live: list[Pending[Queued]] = []
        bound: list[Pending[Queued]] = []
        feeds: list[dict[str, Any]] = []
        for p in batch:
            answer, call, buf, _recv, _regions = p.payload
            if call.deadline_ns and t0 > call.deadline_ns:
                answer(InferDone(call.call_id, Code.DEADLINE, "deadline expired in the queue"))
                continue
            if uses_regions(call):
                bound.append(p)  # bound in place, not padded into a bucket: run alone
                continue
            try:
                feeds.append({ref.name: _input_array(ref, buf) for ref in call.inputs})
            except BadInput as exc:
                answer(InferDone(call.call_id, Code.BAD_INPUT, str(exc)))
                continue
            live.append(p)
        for p in bound:
            self._run_bound(p)
        if not live:
            return
        try:
            # Arena inputs are page-locked when the worker pinned the arena.
            result = graphs.run(feeds, inputs_pinned=graphs.device_type == "cuda")
        except BadBatch:
            # Requests whose shapes cannot share a batch: run them one by one.
            for p, f in zip(live, feeds, strict=True):
                self._run_one(p, f)
            return
        except Exception as exc:
            for p in live:
                p.payload[0](_run_error(p.payload[1].call_id, exc))
            return
        t = result.timings
        names = list(graphs.output_names)
        links = tuple(p.payload[1].span for p in live if p.payload[1].span)
        for k, (p, outs) in enumerate(zip(live, result.outputs, strict=True)):
            answer, call, buf, recv, _regions = p.payload
            wanted = [o.name for o in call.outputs] or names
            arrays = [outs[names.index(n)] for n in wanted]
            w0 = time.monotonic_ns()
            outputs = _write_outputs(wanted, arrays, self.signature, buf, call)
            timings = Timings(
                queue_ns=t0 - recv,
                input_ns=t.gather_ns + t.h2d_ns,
                infer_ns=t.run_ns,
                output_ns=t.d2h_ns + time.monotonic_ns() - w0,
                batch_size=result.rows,
                executions=1 if k == 0 else 0,
                padded_batch=result.bucket or 0,
                mode="replay" if result.replayed else "eager",
                links=links if k == 0 else (),
            )
            answer(InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings))

    def _run_one(self, p: Pending[Queued], feed: dict[str, Any]) -> None:
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        answer, call, buf, recv, _regions = p.payload
        try:
            result = graphs.run([feed])
        except Exception as exc:
            answer(_run_error(call.call_id, exc))
            return
        names = list(graphs.output_names)
        wanted = [o.name for o in call.outputs] or names
        outs = result.outputs[0]
        outputs = _write_outputs(
            wanted, [outs[names.index(n)] for n in wanted], self.signature, buf, call
        )
        t = result.timings
        timings = Timings(
            time.monotonic_ns() - recv - t.total_ns,
            t.gather_ns + t.h2d_ns,
            t.run_ns,
            t.d2h_ns,
            result.rows,
            1,
            result.bucket or 0,
            "replay" if result.replayed else "eager",
        )
        answer(InferDone(call.call_id, Code.OK, outputs=outputs, timings=timings))

    def _run_bound(self, p: Pending[Queued]) -> None:
        """A call with tensors in CUDA shared memory: one counted eager run with an IOBinding
        at the regions' addresses (runtime.engine.bound)."""
        graphs = self.graphs
        assert graphs is not None and self.signature is not None
        answer, call, buf, recv, regions = p.payload
        names = [o.name for o in call.outputs] or list(graphs.output_names)
        sig = self.signature
        t0 = time.monotonic_ns()
        try:
            if regions is None:
                raise RegionError("this call names CUDA shared memory, but its front has none")
            run = graphs.run_eager_with(
                p.batch_size,
                lambda session, options: run_bound(
                    session, call, buf, regions, names, sig, graphs.device_id, ARENA, options
                ),
            )
        except RegionError as exc:
            answer(InferDone(call.call_id, Code.BAD_INPUT, str(exc)))
            return
        except Exception as exc:
            answer(_run_error(call.call_id, exc))
            return
        timings = Timings(
            t0 - recv,
            run.t_bound - t0,
            run.t_ran - run.t_bound,
            run.t_done - run.t_ran,
            p.batch_size,
            mode="eager",
            links=(call.span,) if call.span else (),
        )
        answer(InferDone(call.call_id, Code.OK, outputs=run.outputs, timings=timings))
