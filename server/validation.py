"""Checks an InferRequest against the signature of the version it was routed to (pure).

Returns what the worker needs: inputs in the model's order, the outputs to compute, and how many
bytes to reserve for outputs. Every error names the tensor and says what was expected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import msgspec

from runtime.client import PreparedInput
from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import ModelSignature
from server.errors import InvalidInput
from server.types import InferRequest

__all__ = ["Plan", "plan_call"]

_MIN_UNKNOWN_RESERVE = 4096


class Plan(msgspec.Struct, frozen=True):  # built per call: a Struct (see server.types)
    inputs: tuple[PreparedInput, ...]
    outputs: tuple[str, ...]  # empty = all
    output_reserve: int
    batch_size: int


@dataclass(frozen=True, slots=True)
class _Layout:
    """What validation concluded for one request shape; reused while the signature stands."""

    sig: ModelSignature
    order: tuple[int, ...]  # index in the request of each model input, in model order
    fixed_reserve: int  # output bytes known from the shapes
    unknown: int  # outputs whose size is not known (variable dims, text)
    batch: int


# (id(signature), max_batch_size, inputs' (name, datatype, shape), requested outputs) -> layout.
# Requests of one client repeat the same shapes, so most calls skip the checks below.
_LAYOUTS: dict[tuple[object, ...], _Layout] = {}
_MAX_LAYOUTS = 4096


def plan_call(req: InferRequest, sig: ModelSignature, max_batch_size: int) -> Plan:
    inputs = req.inputs
    key = (
        id(sig),
        max_batch_size,
        tuple([(t.name, t.datatype, t.shape) for t in inputs]),
        req.outputs,
    )
    layout = _LAYOUTS.get(key)
    if layout is None or layout.sig is not sig:
        layout = _layout(req, sig, max_batch_size)
        if len(_LAYOUTS) >= _MAX_LAYOUTS:
            _LAYOUTS.clear()
        _LAYOUTS[key] = layout
    ordered = tuple(
        [
            PreparedInput(t.name, t.datatype, t.shape, t.data)
            for t in (inputs[i] for i in layout.order)
        ]
    )
    reserve = layout.fixed_reserve
    if layout.unknown:
        # Unknown sizes (variable dims, text): guess the inputs' size; too small -> inline.
        in_bytes = sum(len(t.data) for t in inputs)
        reserve += layout.unknown * max(in_bytes, _MIN_UNKNOWN_RESERVE)
    return Plan(ordered, req.outputs, reserve, layout.batch)


def _layout(req: InferRequest, sig: ModelSignature, max_batch_size: int) -> _Layout:
    model = req.model
    expected = {t.name: t for t in sig.inputs}
    seen: dict[str, int] = {}
    for index, t in enumerate(req.inputs):
        spec = expected.get(t.name)
        if spec is None:
            names = ", ".join(expected)
            raise InvalidInput(f"unexpected input '{t.name}' for model '{model}' (inputs: {names})")
        if t.name in seen:
            raise InvalidInput(f"input '{t.name}' appears more than once")
        if t.datatype != spec.datatype:
            raise InvalidInput(
                f"input '{t.name}' has datatype {t.datatype} but model '{model}' expects "
                f"{spec.datatype}"
            )
        _check_shape(model, t.name, t.shape, spec.shape, max_batch_size)
        seen[t.name] = index
    missing = [n for n in expected if n not in seen]
    if missing:
        raise InvalidInput(
            f"model '{model}' expects input(s) {', '.join(missing)}, missing from the request"
        )
    batch = 1
    if max_batch_size > 0:
        sizes = {t.shape[0] for t in req.inputs}
        if len(sizes) > 1:
            raise InvalidInput(
                f"inputs of model '{model}' disagree on the batch size: {sorted(sizes)}"
            )
        batch = sizes.pop() if sizes else 1  # a model without inputs
    out_types = {t.name: t for t in sig.outputs}
    for name in req.outputs:
        if name not in out_types:
            raise InvalidInput(
                f"unknown output '{name}' requested from model '{model}' "
                f"(outputs: {', '.join(out_types)})"
            )
    for i, name in enumerate(req.outputs):
        if name in req.outputs[:i]:
            raise InvalidInput(f"output '{name}' is requested more than once")
    wanted = req.outputs or tuple(out_types)
    reserve = unknown = 0
    for name in wanted:
        o = out_types[name]
        dims = [
            batch if (i == 0 and d == -1 and max_batch_size > 0) else d
            for i, d in enumerate(o.shape)
        ]
        itemsize = DTYPES[o.datatype].itemsize
        if itemsize and all(d >= 0 for d in dims):
            reserve += math.prod(dims) * itemsize + 64
        else:
            unknown += 1
    return _Layout(sig, tuple(seen[n] for n in expected), reserve, unknown, batch)


def _check_shape(
    model: str, name: str, shape: tuple[int, ...], want: tuple[int, ...], max_batch_size: int
) -> None:
    if len(shape) != len(want) or any(
        w != -1 and s != w for s, w in zip(shape, want, strict=False)
    ):
        raise InvalidInput(
            f"input '{name}' has shape {list(shape)} but model '{model}' expects {list(want)}"
        )
    if max_batch_size > 0:
        if shape[0] < 1:
            raise InvalidInput(f"input '{name}' has batch size {shape[0]}; it must be >= 1")
        if shape[0] > max_batch_size:
            raise InvalidInput(
                f"input '{name}' has batch size {shape[0]}, more than max_batch_size "
                f"{max_batch_size} of model '{model}'"
            )
