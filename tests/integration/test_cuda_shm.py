"""Triton's CUDA shared-memory extension, driven by tritonclient, on a CPU machine.

The servers run with `--fake-cuda-ipc true`: the worker opens a "handle" that names a POSIX shm
object instead of device memory (runtime.engine.regions.fake_opener). Everything else is the
code a GPU runs: the front's checks and bookkeeping, the worker's region table, inputs bound
to onnxruntime in place at the region's address, outputs copied into the region, and the
counted eager run of a graph-served version (`--cpu-graphs true`). tests/gpu/test_cuda_shm.py
does the same with real CUDA IPC handles.
"""

from __future__ import annotations

import base64
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm
from grpc_health.v1 import health_pb2
from harness import Server, raises, running_server

from runtime.engine.regions import fake_handle

BASE = ("--allow-client-shm", "true", "--fake-cuda-ipc", "true")


@pytest.fixture(scope="module", params=["sessions", "cpu-graphs"])
def srv(
    request: pytest.FixtureRequest,
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    extra = ("--cpu-graphs", "true") if request.param == "cpu-graphs" else ()
    with running_server(model_repository, tmp_path_factory.mktemp("cudashm"), BASE + extra) as s:
        yield s


@pytest.fixture()
def c(srv: Server) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(srv.url)
    yield client
    client.unregister_cuda_shared_memory()
    client.close()


class StandIn:
    """A POSIX shm object playing a client's cudaMalloc'ed buffer, with its fake handle."""

    def __init__(self, tag: str, nbytes: int) -> None:
        self.key = f"/mt-cudashm-{os.getpid()}-{tag}"
        self.nbytes = nbytes
        self.region = shm.create_shared_memory_region(tag, self.key, nbytes)
        self.handle = base64.b64encode(fake_handle(self.key))

    def put(self, x: np.ndarray, offset: int = 0) -> None:
        shm.set_shared_memory_region(self.region, [x], offset=offset)

    def get(self, shape: list[int], offset: int) -> np.ndarray:
        return shm.get_contents_as_numpy(self.region, np.float32, shape, offset=offset)

    def close(self) -> None:
        shm.destroy_shared_memory_region(self.region)


@pytest.fixture()
def dev() -> Iterator[StandIn]:
    s = StandIn("dev", 4096)
    yield s
    s.close()


def shm_input(name: str, shape: list[int], region: str, nbytes: int, offset: int = 0) -> object:
    inp = grpcclient.InferInput(name, shape, "FP32")
    inp.set_shared_memory(region, nbytes, offset=offset)
    return inp


def test_register_status_unregister(c: grpcclient.InferenceServerClient, dev: StandIn) -> None:
    c.register_cuda_shared_memory("g0", dev.handle, 0, dev.nbytes)
    status = c.get_cuda_shared_memory_status()
    assert [(r.name, r.device_id, r.byte_size) for r in status.regions.values()] == [
        ("g0", 0, dev.nbytes)
    ]
    assert list(c.get_cuda_shared_memory_status("g0").regions) == ["g0"]
    raises(lambda: c.register_cuda_shared_memory("g0", dev.handle, 0, 64), "ALREADY_EXISTS", "'g0'")
    # System and CUDA regions share one namespace, as in Triton.
    raises(lambda: c.register_system_shared_memory("g0", dev.key, 64), "ALREADY_EXISTS", "'g0'")
    c.unregister_cuda_shared_memory("g0")
    assert not c.get_cuda_shared_memory_status().regions
    raises(lambda: c.get_cuda_shared_memory_status("g0"), "NOT_FOUND", "'g0'")
    c.unregister_cuda_shared_memory("g0")  # unknown: a no-op, as in Triton


def test_input_and_output_in_the_region(c: grpcclient.InferenceServerClient, dev: StandIn) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    dev.put(x)
    c.register_cuda_shared_memory("io", dev.handle, 0, dev.nbytes)
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory("io", x.nbytes, offset=1024)
    res = c.infer("id_fp32", [shm_input("IN", [3, 4], "io", x.nbytes)], outputs=[out])
    resp = res.get_response()
    # The output went to the region: the response describes it and carries no bytes.
    assert [(o.name, list(o.shape)) for o in resp.outputs] == [("OUT", [3, 4])]
    assert all(len(raw) == 0 for raw in resp.raw_output_contents)
    params = resp.outputs[0].parameters
    assert params["shared_memory_region"].string_param == "io"
    assert params["shared_memory_byte_size"].int64_param == x.nbytes
    assert params["shared_memory_offset"].int64_param == 1024
    np.testing.assert_array_equal(dev.get([3, 4], 1024), x)
    # The client changes its buffer in place and asks again: the server reads it anew.
    dev.put(x * 2)
    c.infer("id_fp32", [shm_input("IN", [3, 4], "io", x.nbytes)], outputs=[out])
    np.testing.assert_array_equal(dev.get([3, 4], 1024), x * 2)


def test_region_input_with_a_computed_output(
    c: grpcclient.InferenceServerClient, dev: StandIn
) -> None:
    """`dense` computes: the input read from the region gives the answer the same bytes sent
    over gRPC give, and an output not placed in a region comes back in the response."""
    x = np.linspace(-1, 1, 256, dtype=np.float32).reshape(1, 256)
    dev.put(x, offset=512)
    c.register_cuda_shared_memory("d", dev.handle, 0, dev.nbytes)
    plain = grpcclient.InferInput("INPUT0", [1, 256], "FP32")
    plain.set_data_from_numpy(x)
    want = c.infer("dense", [plain]).as_numpy("OUTPUT0")
    got = c.infer("dense", [shm_input("INPUT0", [1, 256], "d", x.nbytes, 512)])
    np.testing.assert_allclose(got.as_numpy("OUTPUT0"), want, rtol=1e-6)
    # Output into the region, input over gRPC.
    out = grpcclient.InferRequestedOutput("OUTPUT0")
    out.set_shared_memory("d", 40, offset=0)
    c.infer("dense", [plain], outputs=[out])
    np.testing.assert_allclose(dev.get([1, 10], 0), want, rtol=1e-6)


def test_one_buffer_under_two_names(c: grpcclient.InferenceServerClient, dev: StandIn) -> None:
    """Triton clients register one cudaMalloc'ed buffer as several regions (an input and an
    output region, say). CUDA maps a handle once per process, so the worker opens it once
    and keeps it open until the last of its names is unregistered."""
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    dev.put(x)
    c.register_cuda_shared_memory("in", dev.handle, 0, 512)
    c.register_cuda_shared_memory("out", dev.handle, 0, dev.nbytes)
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory("out", x.nbytes, offset=2048)
    c.infer("id_fp32", [shm_input("IN", [2, 4], "in", x.nbytes)], outputs=[out])
    np.testing.assert_array_equal(dev.get([2, 4], 2048), x)
    c.unregister_cuda_shared_memory("in")
    dev.put(x + 1, offset=1024)
    c.infer("id_fp32", [shm_input("IN", [2, 4], "out", x.nbytes, 1024)], outputs=[out])
    np.testing.assert_array_equal(dev.get([2, 4], 2048), x + 1)
    c.register_cuda_shared_memory("in", dev.handle, 0, 512)  # again, while "out" maps it
    c.unregister_cuda_shared_memory("out")
    c.infer("id_fp32", [shm_input("IN", [2, 4], "in", x.nbytes)])
    # Larger than the allocation: refused on the mapping already open, as on a first open.
    raises(
        lambda: c.register_cuda_shared_memory("big", dev.handle, 0, dev.nbytes + 1),
        "INVALID_ARGUMENT",
        f"'big': the handle's allocation has {dev.nbytes} bytes from its address; "
        f"{dev.nbytes + 1} bytes were registered",
    )


def test_a_bytes_input_beside_a_region_is_refused_clearly(
    c: grpcclient.InferenceServerClient, dev: StandIn
) -> None:
    """onnxruntime's IOBinding binds no string tensor, so a call with tensors in CUDA shared
    memory cannot carry a BYTES input: INVALID_ARGUMENT saying so, and the server serves on."""
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    dev.put(x)
    c.register_cuda_shared_memory("m", dev.handle, 0, dev.nbytes)
    tag = grpcclient.InferInput("TAG", [1, 4], "BYTES")
    tag.set_data_from_numpy(np.array([[b"a", b"b", b"c", b"d"]], dtype=object))
    raises(
        lambda: c.infer("mixed_bytes", [shm_input("IN", [1, 4], "m", x.nbytes), tag]),
        "INVALID_ARGUMENT",
        "input 'TAG' is BYTES: a call with tensors in CUDA shared memory (input 'IN') "
        "carries numeric tensors only",
    )
    res = c.infer("id_fp32", [shm_input("IN", [1, 4], "m", x.nbytes)])
    np.testing.assert_array_equal(res.as_numpy("OUT"), x)


def test_registration_errors(c: grpcclient.InferenceServerClient, dev: StandIn) -> None:
    short = base64.b64encode(fake_handle(dev.key)[:63])
    raises(
        lambda: c.register_cuda_shared_memory("e", short, 0, 64), "INVALID_ARGUMENT", "'e'", "64"
    )
    zeros = base64.b64encode(bytes(64))  # not a handle the worker can open
    raises(
        lambda: c.register_cuda_shared_memory("e", zeros, 0, 64),
        "INVALID_ARGUMENT",
        "failed to open CUDA IPC handle",
        "'e'",
    )
    raises(
        lambda: c.register_cuda_shared_memory("e", dev.handle, 1, 64),
        "INVALID_ARGUMENT",
        "device 1",
    )
    raises(
        lambda: c.register_cuda_shared_memory("e", dev.handle, 0, dev.nbytes + 1),
        "INVALID_ARGUMENT",
        f"'e': the handle's allocation has {dev.nbytes} bytes from its address; "
        f"{dev.nbytes + 1} bytes were registered",
    )
    raises(lambda: c.register_cuda_shared_memory("", dev.handle, 0, 64), "INVALID_ARGUMENT")
    assert not c.get_cuda_shared_memory_status().regions  # nothing half-registered


def test_inference_errors_leave_the_server_serving(
    c: grpcclient.InferenceServerClient, dev: StandIn
) -> None:
    c.register_cuda_shared_memory("small", dev.handle, 0, 64)
    # Beyond the registered size.
    raises(
        lambda: c.infer("id_fp32", [shm_input("IN", [4, 4], "small", 64, offset=16)]),
        "INVALID_ARGUMENT",
        "'IN'",
        "outside",
        "'small'",
    )
    # An output region too small for the result.
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory("small", 16, offset=0)
    raises(
        lambda: c.infer("id_fp32", [shm_input("IN", [2, 4], "small", 32)], outputs=[out]),
        "INVALID_ARGUMENT",
        "'OUT'",
        "should be at least 32 bytes",
    )
    # A region nobody registered.
    raises(
        lambda: c.infer("id_fp32", [shm_input("IN", [1, 4], "nope", 16)]),
        "INVALID_ARGUMENT",
        "'IN'",
        "'nope'",
    )
    # Unregistered: the next request that names it is refused, the others are served.
    c.unregister_cuda_shared_memory("small")
    raises(
        lambda: c.infer("id_fp32", [shm_input("IN", [1, 4], "small", 16)]),
        "INVALID_ARGUMENT",
        "'small'",
    )
    x = np.ones((1, 4), dtype=np.float32)
    inp = grpcclient.InferInput("IN", [1, 4], "FP32")
    inp.set_data_from_numpy(x)
    np.testing.assert_array_equal(c.infer("id_fp32", [inp]).as_numpy("OUT"), x)


def test_concurrent_region_and_plain_requests(
    srv: Server, c: grpcclient.InferenceServerClient, dev: StandIn
) -> None:
    """Threads send region and plain requests at once, so batches mix them (with cpu-graphs:
    region rows copied into a bucket's buffers beside arena rows); every answer is its own."""
    c.register_cuda_shared_memory("cc", dev.handle, 0, dev.nbytes)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        client = grpcclient.InferenceServerClient(srv.url)
        try:
            for r in range(15):
                x = np.full((2, 4), i * 100 + r, dtype=np.float32)
                if i % 2:
                    inp = grpcclient.InferInput("IN", [2, 4], "FP32")
                    inp.set_data_from_numpy(x)
                    got = client.infer("id_fp32", [inp]).as_numpy("OUT")
                else:
                    dev.put(x, offset=i * 64)
                    out = grpcclient.InferRequestedOutput("OUT")
                    out.set_shared_memory("cc", 32, offset=2048 + i * 64)
                    client.infer(
                        "id_fp32", [shm_input("IN", [2, 4], "cc", 32, offset=i * 64)], outputs=[out]
                    )
                    got = dev.get([2, 4], 2048 + i * 64)
                np.testing.assert_array_equal(got, x)
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors[0]


def test_regions_are_reopened_in_a_restarted_worker(
    srv: Server, c: grpcclient.InferenceServerClient, dev: StandIn
) -> None:
    """The worker holds the opened handles; when it dies, the front opens every registered
    region again in the new worker before the models take traffic."""
    c.register_cuda_shared_memory("rs", dev.handle, 0, dev.nbytes)
    os.kill(srv.worker_pid(), signal.SIGKILL)
    # Readiness is re-derived every 100 ms and a respawn plus reload takes longer: it drops.
    srv.wait_health("readiness", health_pb2.HealthCheckResponse.NOT_SERVING, 30)
    srv.wait_health("readiness", health_pb2.HealthCheckResponse.SERVING, 60)
    assert list(c.get_cuda_shared_memory_status().regions) == ["rs"]
    x = np.arange(8, dtype=np.float32).reshape(2, 4) - 3
    dev.put(x)
    out = grpcclient.InferRequestedOutput("OUT")
    out.set_shared_memory("rs", 32, offset=512)
    c.infer("id_fp32", [shm_input("IN", [2, 4], "rs", 32)], outputs=[out])
    np.testing.assert_array_equal(dev.get([2, 4], 512), x)


def test_cpu_worker_without_cuda_refuses(server: Server) -> None:
    """A server with client shm on and no CUDA device answers UNIMPLEMENTED (the shared test
    server has client shm off, which is UNIMPLEMENTED too, with its own message)."""
    client = grpcclient.InferenceServerClient(server.url)
    try:
        raises(
            lambda: client.register_cuda_shared_memory("g", base64.b64encode(bytes(64)), 0, 64),
            "UNIMPLEMENTED",
            "--allow-client-shm",
        )
    finally:
        client.close()
