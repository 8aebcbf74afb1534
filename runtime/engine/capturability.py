"""Can a model version be captured in CUDA graphs? The checks made at load, each with a
readable reason (reported in the load reply and the statistics, never a crash).

Pure: numpy, and the onnx package optionally (inside a function) to look for control flow
before onnxruntime refuses it. Used by runtime.engine.graphs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import ModelSignature

__all__ = [
    "CONTROL_FLOW_OPS",
    "TensorSpec",
    "control_flow_nodes",
    "control_flow_reason",
    "signature_reason",
    "specs_of",
]

CONTROL_FLOW_OPS: Final = frozenset({"If", "Loop", "Scan"})


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A model input or output as a graph sees it: its dims after the batch dimension."""

    name: str
    dtype: np.dtype[Any]
    row_shape: tuple[int, ...]  # -1 = variable (such a model is not capturable)
    # Computed once: the replay path reads it per tensor per batch, and np.prod costs µs.
    row_nbytes: int = field(init=False, compare=False)

    def __post_init__(self) -> None:
        n = math.prod(self.row_shape) * self.dtype.itemsize
        object.__setattr__(self, "row_nbytes", n)


def specs_of(sig: ModelSignature) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of a reconciled signature, batch dimension dropped."""

    def spec(name: str, datatype: str, shape: tuple[int, ...]) -> TensorSpec:
        return TensorSpec(name, np.dtype(DTYPES[datatype].numpy), tuple(shape[1:]))

    return (
        tuple(spec(t.name, t.datatype, t.shape) for t in sig.inputs),
        tuple(spec(t.name, t.datatype, t.shape) for t in sig.outputs),
    )


def signature_reason(sig: ModelSignature) -> str | None:
    """Why a model with this signature cannot be captured, or None. A graph has one fixed
    shape per bucket, so every tensor needs a variable batch dimension and fixed other dims,
    and it lives in device memory, which BYTES (string) tensors never do."""
    if not sig.inputs or not sig.outputs:
        return "the model has no inputs or no outputs"
    for kind, tensors in (("input", sig.inputs), ("output", sig.outputs)):
        for t in tensors:
            if t.datatype == "BYTES":
                return f"{kind} '{t.name}' is BYTES: string tensors are not on the GPU"
            if not t.shape:
                return f"{kind} '{t.name}' has no batch dimension"
            if t.shape[0] != -1:
                return (
                    f"{kind} '{t.name}' has a fixed first dimension {t.shape[0]}; "
                    "graphs pad batches to bucket sizes"
                )
            if any(d < 0 for d in t.shape[1:]):
                return (
                    f"{kind} '{t.name}' has variable dimensions {list(t.shape)} beyond the "
                    "batch; a graph has one fixed shape per bucket"
                )
    return None


def control_flow_nodes(model: Any) -> list[str]:
    """Names ("op 'node'") of the If/Loop/Scan nodes of an onnx.ModelProto, subgraphs and
    model-local functions included."""
    found: list[str] = []

    def walk(nodes: Iterable[Any]) -> None:
        for node in nodes:
            if node.op_type in CONTROL_FLOW_OPS and node.domain in ("", "ai.onnx"):
                found.append(f"{node.op_type} '{node.name or '?'}'")
            for attr in node.attribute:  # bodies of If/Loop/Scan and of custom ops
                if attr.HasField("g"):
                    walk(attr.g.node)
                for g in attr.graphs:
                    walk(g.node)

    walk(model.graph.node)
    for fn in model.functions:
        walk(fn.node)
    return found


def control_flow_reason(model: str | os.PathLike[str] | Any) -> str | None:
    """Why the model (a path or an onnx.ModelProto) cannot be captured because of control flow,
    or None. A pre-check with a readable reason; without the onnx package, or for a file onnx
    cannot parse, it returns None and onnxruntime's own refusal at session creation decides."""
    if isinstance(model, str | os.PathLike):
        try:
            import onnx
        except ImportError:
            return None
        try:
            model = onnx.load(os.fspath(model), load_external_data=False)
        except Exception:  # onnxruntime reports a bad file with its own error
            return None
    found = control_flow_nodes(model)
    if not found:
        return None
    shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
    return f"the model has control-flow nodes ({shown}), which onnxruntime cannot capture"
