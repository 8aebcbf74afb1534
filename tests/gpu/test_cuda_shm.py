"""CUDA shared memory end to end on a GPU: a real server (CUDA worker), real CUDA IPC handles.

This process plays the client: it cudaMallocs a buffer (a dedicated allocation, not cupy's
pool, whose blocks are sub-allocated), writes the input there, exports the IPC handle and
registers it over gRPC with microtune's own stubs; the worker opens the handle, binds the
input in place and copies the output into the buffer at an offset, which this process then
reads back. Two models: one served from CUDA graphs (max_batch_size 8: a region call is a
counted eager run on the version's thread) and one plain session (max_batch_size 0).
tests/integration/test_cuda_shm.py runs the same path on a CPU with a stand-in handle.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def _identity_repo(root: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    for name, batch, dims in (("id_graphs", 8, [-1, 4]), ("id_plain", 0, [2, 4])):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["IN"], ["OUT"])],
            name,
            [helper.make_tensor_value_info("IN", TensorProto.FLOAT, dims)],
            [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, dims)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
        (root / name / "1").mkdir(parents=True)
        onnx.save(model, root / name / "1" / "model.onnx")
        shown = "4" if batch else "2, 4"
        (root / name / "config.pbtxt").write_text(
            f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {batch}\n'
            f'input [ {{ name: "IN" data_type: TYPE_FP32 dims: [ {shown} ] }} ]\n'
            f'output [ {{ name: "OUT" data_type: TYPE_FP32 dims: [ {shown} ] }} ]\n'
        )
    return root


@pytest.fixture(scope="module")
def stub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    tmp = tmp_path_factory.mktemp("cudashm")
    repo = _identity_repo(tmp / "models")
    port_file = tmp / "port"
    log = open(tmp / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "server", "serve", "--grpc-port", "0", "--metrics-port", "-1",
            "--model-repository", str(repo), "--allow-client-shm", "true",
            "--port-file", str(port_file), "--device", "cuda:0",
        ],
        cwd=ROOT,
        # The caller's path first: on the GPU host it holds onnxruntime-gpu and the server's
        # dependencies (scripts/gpu/run_gpu_checks.sh), ahead of the image's CPU onnxruntime.
        env={**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p
        )},
        stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (port_file.exists() and port_file.read_text().strip()):
            assert proc.poll() is None, (tmp / "server.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        channel = grpc.insecure_channel(f"127.0.0.1:{port_file.read_text().strip()}")
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                ready = health.Check(health_pb2.HealthCheckRequest(service="readiness"))
                if ready.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, (tmp / "server.log").read_text()[-4000:]
            time.sleep(0.2)
        yield pb_grpc.GRPCInferenceServiceStub(channel)
        channel.close()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


class DeviceBuffer:
    """A dedicated cudaMalloc allocation and its IPC handle (this process is the exporter)."""

    def __init__(self, nbytes: int) -> None:
        import cupy

        self.rt = cupy.cuda.runtime
        self.nbytes = nbytes
        self.ptr = self.rt.malloc(nbytes)
        self.rt.memset(self.ptr, 0, nbytes)
        self.handle = bytes(self.rt.ipcGetMemHandle(self.ptr))

    def put(self, x: np.ndarray, offset: int = 0) -> None:
        x = np.ascontiguousarray(x)
        self.rt.memcpy(self.ptr + offset, x.ctypes.data, x.nbytes, self.rt.memcpyHostToDevice)
        # From pageable memory cudaMemcpy may return before the DMA lands; the server reads
        # the region from another process as soon as the request arrives.
        self.rt.deviceSynchronize()

    def get(self, shape: tuple[int, ...], offset: int) -> np.ndarray:
        out = np.empty(shape, np.float32)
        self.rt.memcpy(out.ctypes.data, self.ptr + offset, out.nbytes, self.rt.memcpyDeviceToHost)
        return out

    def free(self) -> None:
        self.rt.free(self.ptr)


def _shm_params(region: str, nbytes: int, offset: int = 0) -> dict[str, pb.InferParameter]:
    params = {
        "shared_memory_region": pb.InferParameter(string_param=region),
        "shared_memory_byte_size": pb.InferParameter(int64_param=nbytes),
    }
    if offset:
        params["shared_memory_offset"] = pb.InferParameter(int64_param=offset)
    return params


def _region_request(
    model: str, inp: tuple[str, int], out: tuple[str, int], nbytes: int
) -> pb.ModelInferRequest:
    """IN [2, 4] read from region inp[0] at offset inp[1]; OUT written to out[0] at out[1]."""
    req = pb.ModelInferRequest(model_name=model)
    tensor = req.inputs.add(name="IN", datatype="FP32", shape=[2, 4])
    for k, v in _shm_params(inp[0], nbytes, inp[1]).items():
        tensor.parameters[k].CopyFrom(v)
    output = req.outputs.add(name="OUT")
    for k, v in _shm_params(out[0], nbytes, out[1]).items():
        output.parameters[k].CopyFrom(v)
    return req


@pytest.mark.parametrize("model", ["id_graphs", "id_plain"])
def test_input_and_output_stay_on_the_device(
    stub: pb_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    buf = DeviceBuffer(1 << 16)
    try:
        stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(
                name="g", raw_handle=buf.handle, device_id=0, byte_size=buf.nbytes
            )
        )
        status = stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())
        assert [(r.name, r.device_id, r.byte_size) for r in status.regions.values()] == [
            ("g", 0, buf.nbytes)
        ]
        x = np.arange(8, dtype=np.float32).reshape(2, 4) + 0.5
        buf.put(x)
        req = _region_request(model, ("g", 0), ("g", 4096), x.nbytes)
        for round_ in range(3):  # the client rewrites its buffer; each answer follows it
            buf.put(x + round_)
            resp = stub.ModelInfer(req)
            assert not resp.raw_output_contents or not any(resp.raw_output_contents)
            np.testing.assert_array_equal(buf.get((2, 4), 4096), x + round_)
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="g"))
        with pytest.raises(grpc.RpcError) as ei:
            stub.ModelInfer(req)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "'g'" in (ei.value.details() or "")
    finally:
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())
        buf.free()


def test_a_garbage_handle_is_invalid_argument(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    with pytest.raises(grpc.RpcError) as ei:
        stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(
                name="bad", raw_handle=bytes(range(64)), device_id=0, byte_size=64
            )
        )
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "failed to open CUDA IPC handle" in (ei.value.details() or "")
    status = stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest())
    assert not status.regions


def test_one_allocation_under_two_names(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    """One buffer under two names, one of them unregistered and registered again while the
    other holds the mapping: the worker opens the handle once (older drivers refuse a second
    open, "already mapped") and closes it after the last name goes."""
    buf = DeviceBuffer(1 << 14)
    try:
        for name in ("in", "out"):
            stub.CudaSharedMemoryRegister(
                pb.CudaSharedMemoryRegisterRequest(
                    name=name, raw_handle=buf.handle, device_id=0, byte_size=buf.nbytes
                )
            )
        x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
        buf.put(x)
        req = _region_request("id_graphs", ("in", 0), ("out", 8192), x.nbytes)
        stub.ModelInfer(req)
        np.testing.assert_array_equal(buf.get((2, 4), 8192), x)
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest(name="in"))
        stub.CudaSharedMemoryRegister(  # again, while "out" holds the mapping
            pb.CudaSharedMemoryRegisterRequest(
                name="in", raw_handle=buf.handle, device_id=0, byte_size=buf.nbytes
            )
        )
        buf.put(x * 2)
        stub.ModelInfer(req)
        np.testing.assert_array_equal(buf.get((2, 4), 8192), x * 2)
    finally:
        stub.CudaSharedMemoryUnregister(pb.CudaSharedMemoryUnregisterRequest())
        buf.free()
