"""Do a batching model's outputs follow the batch? Checked at load, before any batch is split.

A batch's outputs are cut by rows between its requests (runtime.engine.model.execute_batch,
runtime.engine.graph_batch.per_request), which is right only for an output whose first dimension
is the batch dimension. Those cuts refuse an output whose first dimension is not the batch's
rows, but cannot see one that equals them by chance: Transpose [B, L] -> [L, B] in a batch of L
rows gives each request rows made of other requests' numbers. So the load runs the model at
several batch sizes and each output's first dimension must follow the batch; where one does
not, the version runs each call alone.

Where the signature leaves inputs open they are made up: numbers are zeros (what the warm-up
always ran), text elements are "0" (a Cast to a number parses it, text operators take it), and
every variable dimension after the batch's takes the same size in every input (dimensions that
must agree across inputs, a sequence length, then do). An output whose first dimension does not
depend on the batch (that size, a count, a reduction) can equal at most one of the batch sizes
tried, and the caller tries at least two (every bucket: 1, 2, ...), so the size chosen cannot
fool the check. It is 7 rather than 1 all the same: an output made from both ([B, L] flattened
to [B * L], or a broadcast) would follow the batch for L = 1 only. A model that refuses 7 (one
that needs a multiple of a stride, or exactly 1) is tried with the next of `DIMS`.

What the check cannot see: an output whose rows follow the data rather than the batch, and
happen to follow the batch on these inputs (rows kept where a value is zero); the run-time
cut still refuses it on a batch whose rows it does not match.

A model that refuses every made-up input cannot be checked, and runs each call alone; the
warning says how to let the load check it (declare the dims in the config). Batching it anyway
would leave exactly the case above unguarded, where one client gets another's data; without
batching it is slower, visibly (the warning, the batch statistics), but right.

Pure: numpy and runtime.ipc; the caller gives the run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import numpy as np

from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import TensorInfo

__all__ = [
    "DIMS",
    "RUNS_ALONE",
    "TEXT",
    "check_batches",
    "follows_batch",
    "made_up",
    "not_batch_major",
    "probe_feeds",
    "unchecked",
    "unsplit",
]

DIMS: Final = (7, 32, 1)
TEXT: Final = "0"

RUNS_ALONE: Final = (
    ", and a batch's outputs cannot be split between its requests. Its calls run one at a time "
    "from now on; its config should not ask for dynamic_batching."
)

# feeds -> the outputs, in the order of the names given with it
Run = Callable[[Mapping[str, Any]], Sequence[Any]]


def made_up(inputs: Sequence[TensorInfo]) -> bool:
    """Whether running the model needs made-up values: a BYTES input, or a variable dimension
    after the batch's (a dimension of -1 there)."""
    return any(t.datatype == "BYTES" or any(d < 0 for d in t.shape[1:]) for t in inputs)


def probe_feeds(
    inputs: Sequence[TensorInfo], rows: int | None, dim: int = DIMS[0]
) -> dict[str, np.ndarray[Any, Any]]:
    """Inputs of `rows` rows (None: the shapes have no batch dimension) filled with zeros or
    TEXT, each variable dimension after the batch's set to `dim`. A graph's fixed first
    dimension (at least max_batch_size, which the config check allows) is kept: the model
    takes nothing else, and its output then shows that it does not follow the batch."""
    feeds: dict[str, np.ndarray[Any, Any]] = {}
    for t in inputs:
        if rows is None:
            first, rest = [], t.shape
        else:
            first, rest = [rows if t.shape[0] < 0 else t.shape[0]], t.shape[1:]
        shape = first + [dim if d < 0 else d for d in rest]
        if t.datatype == "BYTES":  # onnxruntime string tensors take str
            feeds[t.name] = np.full(shape, TEXT, dtype=object)
        else:
            feeds[t.name] = np.zeros(shape, dtype=DTYPES[t.datatype].numpy)
    return feeds


def check_batches(
    run: Run, inputs: Sequence[TensorInfo], outputs: Sequence[str], sizes: Sequence[int]
) -> str | None:
    """Run the model once per batch size of `sizes` (two or more, or an output whose first
    dimension ignores the batch could match the one); None when each output had the batch's
    rows every time, else why the version must run its calls alone (a log line).

    With fixed dimensions and numbers nothing is made up, and what `run` raises is raised: a
    model that fails on zeros fails its load, as its warm-up always made it. Made-up inputs the
    model refuses are tried again with the next of `DIMS`, then reported (`unchecked`)."""
    if not made_up(inputs):
        return _first_unsplit(run, inputs, outputs, sizes, DIMS[0])
    refusal: Exception | None = None
    for dim in DIMS:
        try:
            return _first_unsplit(run, inputs, outputs, sizes, dim)
        except Exception as exc:  # the model's refusal of made-up data, not a load failure
            refusal = refusal or exc
    assert refusal is not None
    return unchecked(refusal)


def follows_batch(shape: Sequence[int], rows: int) -> bool:
    """Whether an output of this shape, from a batch of `rows` rows, can be cut by rows: its
    first dimension is the batch's (a scalar has none)."""
    return len(shape) > 0 and shape[0] == rows


def not_batch_major(output: str, shape: Sequence[int], rows: int) -> str:
    """What is wrong with an output that does not follow the batch (`follows_batch`)."""
    return (
        f"output '{output}' of a batch of {rows} rows has shape {list(shape)}: its first "
        "dimension is not the batch dimension"
    )


def unsplit(output: str, shape: Sequence[int], rows: int) -> str:
    """Why a batch whose `output` has this shape cannot be split (for the log)."""
    return not_batch_major(output, shape, rows) + RUNS_ALONE


def unchecked(refusal: BaseException) -> str:
    """Why a version whose outputs could not be checked runs its calls alone (for the log)."""
    lines = str(refusal).strip().splitlines()
    said = lines[0][:300] if lines else type(refusal).__name__
    sizes = ", ".join(map(str, DIMS))
    return (
        "whether each output's first dimension follows the batch could not be checked at load: "
        f"the model refused made-up inputs (zeros, text {TEXT!r}, variable dimensions of "
        f"{sizes}; first: {said}). An output that is not batch-major and happens to have as "
        "many rows as a batch would be cut between its requests, so its calls run one at a "
        "time; where it needs particular sizes, declare its inputs' dims in its config so that "
        "the load can check"
    )


def _first_unsplit(
    run: Run, inputs: Sequence[TensorInfo], outputs: Sequence[str], sizes: Sequence[int], dim: int
) -> str | None:
    for rows in sizes:
        results = run(probe_feeds(inputs, rows, dim))
        for name, out in zip(outputs, results, strict=True):
            shape = tuple(int(d) for d in np.shape(out))
            if not follows_batch(shape, rows):
                return unsplit(name, shape, rows)
    return None
