"""What the CPU tests of runtime.engine.graphs share: bench/gpu_models.py (the GPU benchmark's
model builders, loaded by path as `gm`), a one-thread CPU session of a built model, and random
FP32 rows."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[2]

__all__ = ["cpu_session", "gm", "rows"]


def _gpu_models() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_models", ROOT / "bench" / "gpu_models.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gm = _gpu_models()


def cpu_session(model: Any) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def rows(n: int, width: int = 256, seed: int = 0) -> npt.NDArray[Any]:
    return np.random.RandomState(seed).standard_normal((n, width)).astype(np.float32)
