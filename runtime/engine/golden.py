"""The golden self-test: a known request whose answer a model version must reproduce before it
takes traffic. Runs in the worker, after warm-up, on the version's own session.

The file is ``<model>/<version>/golden.json``, beside the model file::

    {
      "inputs":  {"INPUT0":  {"datatype": "FP32", "shape": [1, 256], "data": [0.5, ...]}},
      "outputs": {"OUTPUT0": {"data": [0.12, ...], "atol": 1e-5}}
    }

Input ``data`` is flat, in row-major order, and must fill ``shape``; every model input must be
given, with the datatype the model has. Outputs listed are compared element-wise (flat) with the
ones the model computes: numbers within ``atol`` (default 1e-5; NaN matches NaN), BYTES as
strings, exactly. Outputs not listed are not checked. Any problem, a mismatch or a malformed file,
is a ``GoldenMismatch`` whose message starts "golden self-test failed: ".
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime.ipc.dtypes import DTYPES
from runtime.ipc.protocol import GOLDEN_FILE, ModelSignature

__all__ = ["DEFAULT_ATOL", "GOLDEN_FILE", "GoldenMismatch", "check_golden", "load_golden"]

DEFAULT_ATOL = 1e-5

Feeds = dict[str, Any]
Expected = dict[str, tuple[list[Any], float]]  # output -> (flat data, atol)


class GoldenMismatch(Exception):
    """The version failed its golden self-test (the message says how)."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"golden self-test failed: {problem}")


def load_golden(path: str | Path, signature: ModelSignature) -> tuple[Feeds, Expected]:
    """Read and check ``golden.json`` against the model's signature: the session feeds and
    the expected outputs. GoldenMismatch when the file is malformed or does not fit."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GoldenMismatch(f"cannot read {Path(path).name}: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), dict):
        raise GoldenMismatch('golden.json must be an object with "inputs" and "outputs"')
    if not isinstance(doc.get("outputs"), dict) or not doc["outputs"]:
        raise GoldenMismatch('golden.json needs at least one entry in "outputs"')
    types = {t.name: t.datatype for t in signature.inputs}
    extra = sorted(set(doc["inputs"]) - set(types))
    missing = sorted(set(types) - set(doc["inputs"]))
    if extra or missing:
        raise GoldenMismatch(
            f"golden inputs {sorted(doc['inputs'])} do not match the model's {sorted(types)}"
        )
    feeds = {name: _input(name, spec, types[name]) for name, spec in doc["inputs"].items()}
    outputs = {t.name for t in signature.outputs}
    expected: Expected = {}
    for name, spec in doc["outputs"].items():
        if name not in outputs:
            raise GoldenMismatch(f"the model has no output '{name}' (outputs: {sorted(outputs)})")
        if not isinstance(spec, dict) or not isinstance(spec.get("data"), list):
            raise GoldenMismatch(f"output '{name}' needs a \"data\" list")
        atol = spec.get("atol", DEFAULT_ATOL)
        if isinstance(atol, bool) or not isinstance(atol, int | float) or not atol >= 0:
            raise GoldenMismatch(f"output '{name}': atol must be a number >= 0, got {atol!r}")
        expected[name] = (spec["data"], float(atol))
    return feeds, expected


def check_golden(expected: Expected, names: list[str], results: list[Any]) -> None:
    """Compare the outputs ``names`` (as the session returned them) with ``expected``."""
    for name, got in zip(names, results, strict=True):
        want, atol = expected[name]
        flat = np.asarray(got).reshape(-1)
        if flat.size != len(want):
            raise GoldenMismatch(
                f"output '{name}' has {flat.size} values, golden.json has {len(want)}"
            )
        if flat.dtype == object:  # BYTES: compare as text
            for i, (g, w) in enumerate(zip(flat, want, strict=True)):
                text = g.decode("utf-8", "replace") if isinstance(g, bytes) else str(g)
                if text != str(w):
                    raise GoldenMismatch(
                        f"output '{name}' differs at element {i}: {text!r}, expected {str(w)!r}"
                    )
            continue
        try:
            ref = np.asarray(want, dtype=np.float64)
        except (TypeError, ValueError):
            raise GoldenMismatch(f"output '{name}': golden data must be numbers") from None
        values = flat.astype(np.float64)
        both_nan = np.isnan(values) & np.isnan(ref)
        diff = np.where(both_nan, 0.0, np.abs(values - ref))
        worst = float(np.max(diff, initial=0.0)) if not np.isnan(diff).any() else math.nan
        if not worst <= atol:  # also NaN
            raise GoldenMismatch(f"output '{name}' differs by {worst:.6g} (atol {atol:g})")


def _input(name: str, spec: object, datatype: str) -> Any:
    if not isinstance(spec, dict):
        raise GoldenMismatch(f"input '{name}' must be an object")
    if spec.get("datatype") != datatype:
        raise GoldenMismatch(
            f"input '{name}' is {spec.get('datatype')!r} in golden.json but {datatype} in the model"
        )
    shape, data = spec.get("shape"), spec.get("data")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise GoldenMismatch(f"input '{name}': shape must be a list of integers >= 0")
    if not isinstance(data, list) or len(data) != math.prod(shape):
        n = len(data) if isinstance(data, list) else "no"
        raise GoldenMismatch(
            f"input '{name}': data has {n} values, shape {shape} needs {math.prod(shape)}"
        )
    try:
        if datatype == "BYTES":  # onnxruntime string tensors take str
            return np.array([str(x) for x in data], dtype=object).reshape(shape)
        return np.array(data, dtype=DTYPES[datatype].numpy).reshape(shape)
    except (TypeError, ValueError, OverflowError) as exc:
        raise GoldenMismatch(f"input '{name}': data is not {datatype}: {exc}") from None
