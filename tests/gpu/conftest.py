"""GPU tests (marker `gpu`): CUDA graphs on the CUDA EP, pinned arenas, CUDA IPC handles.

They run only where all three hold: onnxruntime is the GPU build (CUDAExecutionProvider
compiled in), a session really gets that EP (onnxruntime-gpu silently falls back to CPU when a
CUDA library is missing), and cupy sees a device. Elsewhere they are skipped with the reason.
With MICROTUNE_REQUIRE_GPU=1 (scripts/gpu/run_gpu_checks.sh sets it) an unusable GPU is an
error instead, so a GPU run can never pass by skipping everything.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

CUDA = "CUDAExecutionProvider"


@functools.cache
def gpu_unavailable_reason() -> str | None:
    """None when the GPU tests can run here, else why not (cheapest checks first)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not importable ({exc})"
    if CUDA not in ort.get_available_providers():
        return (
            f"onnxruntime {ort.__version__} at {Path(ort.__file__).parent} has no {CUDA} "
            "(a CPU build; scripts/gpu/install_on_device.sh installs onnxruntime-gpu)"
        )
    from runtime.ipc.pinning import cuda_available

    if not cuda_available():
        return "cupy is missing or sees no CUDA device"
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        return "the onnx package (to build test models) is not installed"
    from runtime.engine.session import preload_cuda_libraries

    preload_cuda_libraries()
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    try:
        sess = ort.InferenceSession(model.SerializeToString(), providers=[CUDA])
    except Exception as exc:
        return f"a session on {CUDA} failed: {str(exc).splitlines()[0][:200]}"
    if sess.get_providers()[0] != CUDA:
        return (
            f"onnxruntime fell back to {sess.get_providers()}: the CUDA EP did not start "
            "(CUDA 13 / cuDNN 9 libraries not found? see onnxruntime's messages above)"
        )
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("MICROTUNE_REQUIRE_GPU") == "1":
        raise pytest.UsageError(f"MICROTUNE_REQUIRE_GPU=1 but the GPU tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def gm() -> ModuleType:
    """bench/gpu_models.py (model builders shared with the GPU benchmark), as the CPU tests
    load it (tests/unit/graph_models.py)."""
    from tests.unit.graph_models import gm

    return gm


@pytest.fixture(scope="session")
def model_file(gm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., str]:
    """model_file("mlp" | "encoder" | "with_if", **builder_kwargs) -> path of the saved model."""
    cache: dict[str, str] = {}
    base = tmp_path_factory.mktemp("models")

    def make(builder: str, **kw: Any) -> str:
        key = builder + repr(sorted(kw.items()))
        if key not in cache:
            path = base / f"{builder}-{len(cache)}.onnx"
            cache[key] = str(gm.save(getattr(gm, builder)(**kw), path))
        return cache[key]

    return make
