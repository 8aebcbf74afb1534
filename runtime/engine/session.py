"""Creates onnxruntime sessions on the right execution provider and reads their signatures.

The only module (with engine/model.py) that touches onnxruntime's session API; it asserts the
provider actually obtained, because onnxruntime-gpu silently falls back to CPU otherwise.
"""

from __future__ import annotations

import logging
from typing import Any

import onnxruntime as ort

from runtime.ipc.dtypes import BY_ONNX
from runtime.ipc.protocol import ModelSignature, TensorInfo

__all__ = ["SessionError", "choose_device", "make_session", "signature_of"]

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


class SessionError(Exception):
    """The model cannot be loaded (corrupt file, unsupported type, provider unavailable)."""


def choose_device(requested: str) -> str:
    """Resolve "auto" to "cuda:0" when the CUDA EP is compiled in and really usable, else "cpu"."""
    if requested != "auto":
        if requested.startswith("cuda") and CUDA not in ort.get_available_providers():
            raise SessionError(f"device {requested} requested but onnxruntime has no CUDA EP")
        return requested
    if CUDA not in ort.get_available_providers():
        return "cpu"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cuda:0"
    except Exception:  # no driver, no device: the CPU EP it is
        log.info("CUDA EP compiled in but no usable GPU; using the CPU EP")
    return "cpu"


def make_session(path: str, device: str, intra_op_threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    providers: list[Any]
    if device.startswith("cuda"):
        device_id = int(device.partition(":")[2] or 0)
        providers = [(CUDA, {"device_id": device_id}), CPU]
    else:
        providers = [CPU]
    try:
        sess = ort.InferenceSession(path, so, providers=providers)
    except Exception as exc:  # onnxruntime raises several unrelated types for bad files
        raise SessionError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from exc
    wanted = CUDA if device.startswith("cuda") else CPU
    if sess.get_providers()[0] != wanted:
        raise SessionError(f"asked for {wanted} but onnxruntime gave {sess.get_providers()}")
    return sess


def signature_of(sess: ort.InferenceSession) -> ModelSignature:
    return ModelSignature(
        inputs=tuple(_info(a) for a in sess.get_inputs()),
        outputs=tuple(_info(a) for a in sess.get_outputs()),
    )


def _info(arg: Any) -> TensorInfo:
    dtype = BY_ONNX.get(arg.type)
    if dtype is None:
        raise SessionError(f"tensor {arg.name!r} has type {arg.type}, which KServe cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorInfo(arg.name, dtype.wire, shape)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
