"""Test harness for the integration suite (no pytest fixtures here; see conftest.py).

- `build_repository`: a model repository made with onnx.helper: an identity model per KServe
  datatype, symlinks to the demo models the tests use, and four broken models.
- `Server`: `python -m server serve` in a subprocess on 127.0.0.1:0 (after vLLM's
  RemoteOpenAIServer): reads the port file, waits on grpc.health.v1, fails fast with the log.

Nothing here imports server._proto: its protobuf names clash with tritonclient's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "server" / "demo_repository"
SHM = Path("/dev/shm")

OPSET = 17
IR_VERSION = 8
MAX_BATCH = 8
ID_DIMS = 4  # identity models: [batch, 4]

# KServe datatype -> (onnx element type, Triton config type, numpy dtype)
DATATYPES: dict[str, tuple[int, str, str]] = {
    "BOOL": (TensorProto.BOOL, "TYPE_BOOL", "bool"),
    "UINT8": (TensorProto.UINT8, "TYPE_UINT8", "uint8"),
    "UINT16": (TensorProto.UINT16, "TYPE_UINT16", "uint16"),
    "UINT32": (TensorProto.UINT32, "TYPE_UINT32", "uint32"),
    "UINT64": (TensorProto.UINT64, "TYPE_UINT64", "uint64"),
    "INT8": (TensorProto.INT8, "TYPE_INT8", "int8"),
    "INT16": (TensorProto.INT16, "TYPE_INT16", "int16"),
    "INT32": (TensorProto.INT32, "TYPE_INT32", "int32"),
    "INT64": (TensorProto.INT64, "TYPE_INT64", "int64"),
    "FP16": (TensorProto.FLOAT16, "TYPE_FP16", "float16"),
    "FP32": (TensorProto.FLOAT, "TYPE_FP32", "float32"),
    "FP64": (TensorProto.DOUBLE, "TYPE_FP64", "float64"),
    "BYTES": (TensorProto.STRING, "TYPE_STRING", "object"),
}

DEMO_MODELS = (
    "simple",
    "simple_string",
    "simple_identity",
    "dense",
    "dense_large",
    "identity_fp32",
)
BAD_MODELS = ("bad_corrupt", "bad_dtype", "bad_input_name", "bad_no_versions")


def identity_name(datatype: str) -> str:
    return f"id_{datatype.lower()}"


# ----------------------------------------------------------------------------- repository


def _save(model: onnx.ModelProto, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _identity_model(elem: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["IN"], ["OUT"])],
        "identity",
        [helper.make_tensor_value_info("IN", elem, ["batch", ID_DIMS])],
        [helper.make_tensor_value_info("OUT", elem, ["batch", ID_DIMS])],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )


def fp32_op_model(op: str, constant: float, x: str = "X", y: str = "Y") -> onnx.ModelProto:
    """y = x <op> constant (a binary op: Mul, Add...), FP32 [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node(op, [x, "constant"], [y])],
        op.lower(),
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.array(constant, np.float32), "constant")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
    )
    onnx.checker.check_model(model)
    return model


def _config(name: str, ins: list[tuple[str, str]], outs: list[tuple[str, str]]) -> str:
    def block(kind: str, items: list[tuple[str, str]]) -> str:
        body = ",\n".join(
            f'  {{ name: "{n}" data_type: {t} dims: [ {ID_DIMS} ] }}' for n, t in items
        )
        return f"{kind} [\n{body}\n]\n"

    return (
        f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {MAX_BATCH}\n'
        + block("input", ins)
        + block("output", outs)
    )


def build_repository(root: Path) -> Path:
    """Identity models for every datatype, the demo models needed, and four broken models."""
    root.mkdir(parents=True, exist_ok=True)
    for dt, (elem, cfg_type, _) in DATATYPES.items():
        name = identity_name(dt)
        _save(_identity_model(elem), root / name / "1" / "model.onnx")
        (root / name / "config.pbtxt").write_text(
            _config(name, [("IN", cfg_type)], [("OUT", cfg_type)])
        )
    for name in DEMO_MODELS:
        (root / name).symlink_to(DEMO / name, target_is_directory=True)
    # a numeric and a BYTES tensor side by side (CUDA shared memory carries only the first)
    mixed = helper.make_graph(
        [helper.make_node("Identity", ["IN"], ["OUT"]),
         helper.make_node("Identity", ["TAG"], ["TAG_OUT"])],
        "mixed_bytes",
        [helper.make_tensor_value_info("IN", TensorProto.FLOAT, ["batch", ID_DIMS]),
         helper.make_tensor_value_info("TAG", TensorProto.STRING, ["batch", ID_DIMS])],
        [helper.make_tensor_value_info("OUT", TensorProto.FLOAT, ["batch", ID_DIMS]),
         helper.make_tensor_value_info("TAG_OUT", TensorProto.STRING, ["batch", ID_DIMS])],
    )  # fmt: skip
    _save(
        helper.make_model(
            mixed, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION
        ),
        root / "mixed_bytes" / "1" / "model.onnx",
    )
    (root / "mixed_bytes" / "config.pbtxt").write_text(
        _config("mixed_bytes", [("IN", "TYPE_FP32"), ("TAG", "TYPE_STRING")],
                [("OUT", "TYPE_FP32"), ("TAG_OUT", "TYPE_STRING")])
    )  # fmt: skip
    fp32 = _identity_model(TensorProto.FLOAT)
    # (1) garbage instead of an ONNX file
    bad = root / "bad_corrupt"
    (bad / "1").mkdir(parents=True)
    (bad / "1" / "model.onnx").write_bytes(b"\x00not an onnx model\xff" * 64)
    (bad / "config.pbtxt").write_text(_config("bad_corrupt", [("IN", "TYPE_FP32")], []))
    # (2) the config declares INT64 where the graph has FP32
    _save(fp32, root / "bad_dtype" / "1" / "model.onnx")
    (root / "bad_dtype" / "config.pbtxt").write_text(
        _config("bad_dtype", [("IN", "TYPE_INT64")], [("OUT", "TYPE_FP32")])
    )
    # (3) the config names an input the graph lacks
    _save(fp32, root / "bad_input_name" / "1" / "model.onnx")
    (root / "bad_input_name" / "config.pbtxt").write_text(
        _config("bad_input_name", [("NOPE", "TYPE_FP32")], [("OUT", "TYPE_FP32")])
    )
    # (4) a config and no version directory
    (root / "bad_no_versions").mkdir()
    (root / "bad_no_versions" / "config.pbtxt").write_text(
        _config("bad_no_versions", [("IN", "TYPE_FP32")], [("OUT", "TYPE_FP32")])
    )
    return root


# ----------------------------------------------------------------------------- server


def children_of(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            out.extend(int(x) for x in f.read_text().split())
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shm_arenas(pid: int) -> list[str]:
    """Shared-memory arenas owned by the front process `pid` (microtune-<pid>-<generation>)."""
    return sorted(p.name for p in SHM.glob(f"microtune-{pid}-*"))


class ServerExited(RuntimeError):
    """The server process exited while a test waited on it."""


class Server:
    """`python -m server serve` in a subprocess (after vLLM's RemoteOpenAIServer).

    Starts on port 0, reads the bound port from the port file, then waits until
    grpc.health.v1 Check(service="readiness") is SERVING; fails at once with the server's log if
    the process exits. `stop()` sends SIGTERM, then SIGKILL after `kill_after` seconds, and
    checks the exit was graceful, the worker is gone and no arena of this front is left in
    /dev/shm.
    """

    def __init__(
        self,
        repository: Path,
        log_dir: Path,
        *,
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 60.0,
        kill_after: float = 8.0,
        prefix: tuple[str, ...] = (),
        new_session: bool = False,
    ) -> None:
        self.repository = repository
        self.log_path = log_dir / "server.log"
        self.port_file = log_dir / "port"
        self.kill_after = kill_after
        self.port = 0
        self.url = ""
        self._log = self.log_path.open("wb")
        # Hermetic: no MICROTUNE_* setting of the caller's environment reaches the server.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MICROTUNE_")}
        # The caller's path ahead of the tree: on a GPU machine it holds onnxruntime-gpu and the
        # server's dependencies (scripts/gpu/run_gpu_checks.sh), ahead of the image's own.
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH", ""), str(ROOT)) if p)
        env.update(PYTHONPATH=path, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                *prefix,  # a command that execs the rest (same pid), e.g. in a mount namespace
                sys.executable,
                "-m",
                "server",
                "serve",
                "--model-repository",
                str(repository),
                "--grpc-host",
                "127.0.0.1",
                "--grpc-port",
                "0",
                "--port-file",
                str(self.port_file),
                "--metrics-port",
                "0",  # never a fixed port: several servers run at once
                "--device",
                "cpu",
                # The shared repository serves broken models on purpose: ready once loaded.
                "--strict-readiness",
                "false",
                # Within stop()'s SIGKILL: nothing a test leaves in flight needs longer.
                "--shutdown-grace-s",
                "5",
                "--log-level",
                "INFO",
                *extra_args,
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,  # (its own process group, to signal as a whole)
        )
        try:
            self._wait_port(start_timeout)
            self.wait_health("readiness", health_pb2.HealthCheckResponse.SERVING, start_timeout)
        except BaseException:
            self.stop(check=False)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise ServerExited(
                f"server exited with code {self.proc.returncode}; log:\n{self.log()[-6000:]}"
            )

    def _wait_port(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            text = self.port_file.read_text().strip() if self.port_file.exists() else ""
            if text.isdigit():
                self.port = int(text)
                self.url = f"127.0.0.1:{self.port}"
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no port file after {timeout}s; log:\n{self.log()[-6000:]}")
            time.sleep(0.02)

    def wait_health(self, service: str, status: int, timeout: float) -> float:
        """Poll Check(service) until it answers `status`; returns the seconds it took."""
        start = time.monotonic()
        deadline = start + timeout
        with grpc.insecure_channel(self.url) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            while True:
                self._check_alive()
                with contextlib.suppress(grpc.RpcError):
                    got = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                    if got.status == status:
                        return time.monotonic() - start
                if time.monotonic() > deadline:
                    name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
                    raise TimeoutError(
                        f"health '{service}' not {name} after {timeout}s; log:\n"
                        f"{self.log()[-6000:]}"
                    )
                time.sleep(0.02)

    def worker_pid(self) -> int:
        """The runtime worker: the child of the front that runs multiprocessing's spawn_main
        (the other child, if any, is multiprocessing's resource tracker)."""
        for pid in children_of(self.pid):
            line = cmdline(pid)
            if "spawn_main" in line and "resource_tracker" not in line:
                return pid
        raise LookupError(f"no worker child of {self.pid}: {children_of(self.pid)}")

    def stop(self, *, check: bool = True) -> None:
        """SIGTERM, then SIGKILL after `kill_after` seconds. With `check`, assert a graceful
        exit (code 0, no SIGKILL needed), no child process left, and no arena in /dev/shm."""
        children = children_of(self.pid)
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.kill_after)
            except subprocess.TimeoutExpired:
                killed = True
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        if not check:
            return
        assert not killed, (
            f"server ignored SIGTERM for {self.kill_after}s; log:\n{self.log()[-4000:]}"
        )
        assert self.proc.returncode == 0, (self.proc.returncode, self.log()[-4000:])
        # The worker unlinks too when its front vanishes; give it a moment.
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and (
            shm_arenas(self.pid) or any(pid_alive(c) for c in children)
        ):
            time.sleep(0.05)
        alive = [c for c in children if pid_alive(c)]
        assert not alive, f"children of server {self.pid} still running: {alive}"
        left = shm_arenas(self.pid)
        assert not left, f"shared memory left behind by server {self.pid}: {left}"


@contextlib.contextmanager
def running_server(
    repository: Path,
    log_dir: Path,
    extra_args: tuple[str, ...] = (),
    *,
    start_timeout: float = 60.0,
) -> Iterator[Server]:
    log_dir.mkdir(parents=True, exist_ok=True)
    server = Server(repository, log_dir, extra_args=extra_args, start_timeout=start_timeout)
    try:
        yield server
    finally:
        server.stop()


def sample(datatype: str, batch: int = 2) -> np.ndarray:
    """Values that exercise each datatype's range (batch x 4)."""
    n = batch * ID_DIMS
    np_type = DATATYPES[datatype][2]
    if datatype == "BOOL":
        flat = np.array([i % 3 == 0 for i in range(n)], dtype=bool)
    elif datatype == "BYTES":
        base = [b"", b"a\x00b", "h\u00e9llo \u2603".encode(), b"\x00", b"plain", b"x" * 300]
        flat = np.array([base[i % len(base)] for i in range(n)], dtype=object)
    elif datatype.startswith("FP"):
        flat = (np.arange(n, dtype=np.float64) * 1.5 - 3.25).astype(np_type)
        flat[0] = np.finfo(np_type).max
        flat[1] = np.finfo(np_type).min
    else:
        info = np.iinfo(np_type)
        flat = (np.arange(n) % 7).astype(np_type)
        flat[0], flat[1] = info.max, info.min
    return flat.reshape(batch, ID_DIMS)


def raises(call: object, status: str, *needles: str) -> str:
    """Run `call` (a tritonclient call), expect an InferenceServerException with gRPC `status`
    (e.g. "INVALID_ARGUMENT") and every needle in its message; return the message."""
    import pytest
    from tritonclient.utils import InferenceServerException

    assert callable(call)
    with pytest.raises(InferenceServerException) as ei:
        call()
    msg = ei.value.message() or ""
    assert ei.value.status() == f"StatusCode.{status}", (ei.value.status(), msg)
    for n in needles:
        assert n in msg, (n, msg)
    return msg


def assert_still_serving(stub: object) -> None:
    """A good request is answered right: `simple` (no test changes it) adds INPUT0 + INPUT1.
    `stub` is tritonclient's raw GRPCInferenceServiceStub."""
    from tritonclient.grpc import service_pb2 as pb

    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    req = pb.ModelInferRequest(model_name="simple")
    for name in ("INPUT0", "INPUT1"):
        req.inputs.add(name=name, datatype="INT32", shape=[1, 16])
        req.raw_input_contents.append(a.tobytes())
    resp = stub.ModelInfer(req, timeout=10)  # type: ignore[attr-defined]
    out = np.frombuffer(resp.raw_output_contents[0], dtype=np.int32)
    np.testing.assert_array_equal(out, (a + a).ravel())
