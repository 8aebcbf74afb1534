"""Device memory attributed to a load on a real GPU: the worker's LoadDone carries at least the
model's weights (dense_large: ~24 MiB of FP32 weights, copied to the device), for the plain
session path and the CUDA-graph path alike, and the probe reads the device's memory in use.

dense_large's file is ~0.1 MiB: its graph computes the weights and onnxruntime's constant
folding turns them into initializers when the session loads (scripts/build_demo_repository.py),
so the expected bytes are those of the folded graph's initializers, not the file's size."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.ipc.pinning import device_memory_used
from runtime.ipc.protocol import Code, LoadModel, ModelSignature, UnloadModel
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from server.settings import DEMO_REPOSITORY

pytestmark = pytest.mark.gpu

MODEL = DEMO_REPOSITORY / "dense_large" / "1" / "model.onnx"


def folded_initializer_bytes(tmp_path: Path) -> int:
    """The bytes of MODEL's initializers once onnxruntime has folded its constant nodes (as any
    session at level basic and up does at load): its weights and biases."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.optimized_model_filepath = str(tmp_path / "folded.onnx")
    ort.InferenceSession(str(MODEL), so, providers=["CPUExecutionProvider"])
    folded = onnx.load(so.optimized_model_filepath)
    return sum(numpy_helper.to_array(i).nbytes for i in folded.graph.initializer)


def test_the_probe_reads_memory_in_use() -> None:
    used = device_memory_used(0)
    assert used > 0


@pytest.mark.parametrize("max_batch", [0, 8], ids=["session", "cuda-graphs"])
def test_a_gpu_load_reports_at_least_its_weights(tmp_path: Path, max_batch: int) -> None:
    worker = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cuda:0"))
    try:
        assert worker.memory.enabled
        sig = ModelSignature((), ())
        done = worker.load(LoadModel(1, "dense_large", 1, str(MODEL), max_batch, sig))
        assert done.code == Code.OK, done.message
        assert done.device_memory is not None
        weights = folded_initializer_bytes(tmp_path)
        assert weights > 24 << 20  # the file holds ~0.1 MiB of it
        assert weights * 0.9 <= done.device_memory < 8 << 30, done.device_memory
        worker.unload(UnloadModel(2, "dense_large", 1))
    finally:
        worker.close_lanes()
