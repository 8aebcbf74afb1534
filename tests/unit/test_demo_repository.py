"""The bundled demo model repository (server/demo_repository) matches its generator script and
its models compute what their contracts say (checked directly with onnxruntime)."""

from __future__ import annotations

import functools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from google.protobuf import text_format  # noqa: E402
from onnx import TensorProto, numpy_helper  # noqa: E402

from server._proto.inference import grpc_service_pb2  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build_demo_repository.py"
REPO = ROOT / "server" / "demo_repository"

EXPECTED_VERSIONS = {
    "simple": ["1"],
    "simple_int8": ["1"],
    "simple_string": ["1"],
    "simple_identity": ["1"],
    "dense": ["1", "2"],
    "dense_large": ["1"],
    "identity_fp32": ["1"],
}

# Triton config data_type -> onnx element type
_ONNX_TYPE = {
    grpc_service_pb2.TYPE_INT8: TensorProto.INT8,
    grpc_service_pb2.TYPE_INT32: TensorProto.INT32,
    grpc_service_pb2.TYPE_FP32: TensorProto.FLOAT,
    grpc_service_pb2.TYPE_STRING: TensorProto.STRING,
}

_sessions: dict[tuple[str, str], ort.InferenceSession] = {}


def session(model: str, version: str = "1") -> ort.InferenceSession:
    key = (model, version)
    if key not in _sessions:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        _sessions[key] = ort.InferenceSession(
            str(REPO / model / version / "model.onnx"), so, providers=["CPUExecutionProvider"]
        )
    return _sessions[key]


def config(model: str) -> grpc_service_pb2.ModelConfig:
    return text_format.Parse(
        (REPO / model / "config.pbtxt").read_text(encoding="utf-8"),
        grpc_service_pb2.ModelConfig(),
    )


# ----------------------------------------------------------------------------- (a) up to date


def test_committed_repository_matches_fresh_build() -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_check_detects_a_modified_file(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cfg = out / "simple" / "config.pbtxt"
    cfg.write_text(cfg.read_text() + "# edited\n")
    (out / "stray.txt").write_text("x")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "differs: simple/config.pbtxt" in proc.stdout
    assert "unexpected: stray.txt" in proc.stdout


# ----------------------------------------------------------------------------- (c) configs


def test_repository_layout() -> None:
    assert sorted(p.name for p in REPO.iterdir() if p.is_dir()) == sorted(EXPECTED_VERSIONS)
    for model, versions in EXPECTED_VERSIONS.items():
        found = sorted(p.name for p in (REPO / model).iterdir() if p.is_dir())
        assert found == versions, model
        for v in versions:
            assert (REPO / model / v / "model.onnx").is_file()


@pytest.mark.parametrize("model", sorted(EXPECTED_VERSIONS))
def test_config_agrees_with_onnx_graph(model: str) -> None:
    cfg = config(model)
    assert cfg.name == model
    assert cfg.platform == "onnxruntime_onnx"
    for version in EXPECTED_VERSIONS[model]:
        m = onnx.load(str(REPO / model / version / "model.onnx"), load_external_data=False)
        assert m.producer_name == "microtune-demo"
        assert m.ir_version <= 10  # loadable by onnxruntime 1.20+
        assert [o.version for o in m.opset_import if o.domain in ("", "ai.onnx")] == [17]
        for tensors, values in ((cfg.input, m.graph.input), (cfg.output, m.graph.output)):
            init_names = {i.name for i in m.graph.initializer}
            values = [v for v in values if v.name not in init_names]
            assert [t.name for t in tensors] == [v.name for v in values]
            for t, v in zip(tensors, values, strict=True):
                tt = v.type.tensor_type
                assert _ONNX_TYPE[t.data_type] == tt.elem_type, (model, t.name)
                dims = list(tt.shape.dim)
                if cfg.max_batch_size > 0:
                    assert dims[0].dim_param and not dims[0].HasField("dim_value")
                    dims = dims[1:]
                graph_dims = [d.dim_value if d.HasField("dim_value") else -1 for d in dims]
                assert graph_dims == list(t.dims), (model, t.name)


def test_simple_contracts_match_triton_examples() -> None:
    """Triton's docs/examples/model_repository/{simple,simple_int8,simple_string,simple_identity}
    (what tritonclient's example programs call)."""
    types = {
        "simple": grpc_service_pb2.TYPE_INT32,
        "simple_int8": grpc_service_pb2.TYPE_INT8,
        "simple_string": grpc_service_pb2.TYPE_STRING,
    }
    for model, dtype in types.items():
        cfg = config(model)
        assert cfg.max_batch_size == 8
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
            ("INPUT0", dtype, [16]),
            ("INPUT1", dtype, [16]),
        ]
        assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
            ("OUTPUT0", dtype, [16]),
            ("OUTPUT1", dtype, [16]),
        ]
    cfg = config("simple_identity")
    assert cfg.max_batch_size == 8
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
        ("INPUT0", grpc_service_pb2.TYPE_STRING, [-1])
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("OUTPUT0", grpc_service_pb2.TYPE_STRING, [-1])
    ]


def test_batching_and_version_policy_configs() -> None:
    dense = config("dense")
    assert dense.max_batch_size == 8
    assert dense.version_policy.WhichOneof("policy_choice") == "all"
    large = config("dense_large")
    assert large.max_batch_size == 32
    assert large.WhichOneof("scheduling_choice") == "dynamic_batching"
    assert large.dynamic_batching.max_queue_delay_microseconds == 2000
    ident = config("identity_fp32")
    assert ident.max_batch_size == 0
    assert list(ident.input[0].dims) == [-1]


# ----------------------------------------------------------------------------- (b) computation


def test_simple_int32() -> None:
    a = np.arange(16, dtype=np.int32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.int32)
    out0, out1 = session("simple").run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    assert out0.dtype == np.int32 and out1.dtype == np.int32
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)
    # batched, with negative numbers
    rng = np.random.default_rng(0)
    a = rng.integers(-(2**20), 2**20, size=(8, 16), dtype=np.int32)
    b = rng.integers(-(2**20), 2**20, size=(8, 16), dtype=np.int32)
    out0, out1 = session("simple").run(None, {"INPUT0": a, "INPUT1": b})
    np.testing.assert_array_equal(out0, a + b)
    np.testing.assert_array_equal(out1, a - b)


def test_simple_int8_wraps_around_like_numpy() -> None:
    """Like Triton's simple_int8 the model adds in int32 and casts back to int8, so the results
    wrap modulo 256 (two's complement), exactly like numpy int8 arithmetic."""
    a = np.array([[127, -128, 100, -100, 0, 1, -1, 50] * 2], dtype=np.int8)
    b = np.array([[1, 1, 100, 100, -128, 127, -128, -50] * 2], dtype=np.int8)
    out0, out1 = session("simple_int8").run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    assert out0.dtype == np.int8 and out1.dtype == np.int8
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out0, a + b)
        np.testing.assert_array_equal(out1, a - b)
    assert out0[0, 0] == -128  # 127 + 1
    assert out1[0, 1] == 127  # -128 - 1
    assert out0[0, 2] == -56  # 100 + 100 = 200 - 256


def _strings(rows: list[list[str]]) -> np.ndarray:
    return np.array(rows, dtype=object)


def test_simple_string() -> None:
    """Decimal integers in, decimal sum/difference out (onnxruntime's Python API takes and
    returns string tensors as ``str``; the server converts BYTES to/from it)."""
    a = _strings([[str(i) for i in range(16)]])
    b = _strings([["1"] * 16])
    out0, out1 = session("simple_string").run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    assert out0.shape == (1, 16) and out1.shape == (1, 16)
    assert list(out0[0]) == [str(i + 1) for i in range(16)]
    assert list(out1[0]) == [str(i - 1) for i in range(16)]
    # "1" + "2" -> "3", "1" - "2" -> "-1"; batch of 2 with negative inputs
    a = _strings([["1"] * 16, ["-7"] * 16])
    b = _strings([["2"] * 16, ["10"] * 16])
    out0, out1 = session("simple_string").run(None, {"INPUT0": a, "INPUT1": b})
    assert out0[0, 0] == "3" and out1[0, 0] == "-1"
    assert out0[1, 5] == "3" and out1[1, 5] == "-17"
    assert out0[0, 0].encode() == b"3"


def test_simple_identity_bytes() -> None:
    """Arbitrary bytes round-trip through the string identity model.

    onnxruntime's Python API quirks (1.2x-1.3x) that a server must work around:
    * ``bytes`` elements of an object array are fed as ``str(b)`` (i.e. ``"b'...'"``);
    * a numpy ``S`` array is cut at the first NUL, and outputs are always decoded as UTF-8.
    Mapping each byte to one code point (latin-1) and back is lossless for an identity model.
    """
    values = [
        b"",
        b"\x00",
        b"a\x00b",
        b"hello",
        b"\xff\xfe\x00\x01",
        "ünï".encode(),
        bytes(range(256)),
    ]
    x = _strings([[v.decode("latin-1") for v in values]])
    (out,) = session("simple_identity").run(None, {"INPUT0": x})
    assert out.shape == (1, len(values))
    assert [v.encode("latin-1") for v in out[0]] == values
    # batch of 3, width 1; and an empty variable dim
    x = _strings([["a"], [""], ["\x00\x00"]])
    (out,) = session("simple_identity").run(None, {"INPUT0": x})
    assert out.tolist() == [["a"], [""], ["\x00\x00"]]
    (out,) = session("simple_identity").run(None, {"INPUT0": np.empty((2, 0), dtype=object)})
    assert out.shape == (2, 0)


def _int_op(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """ONNX integer Add/Sub/Mul/Div/Mod in numpy, refusing anything that could overflow int64
    (numpy would wrap silently) or where numpy's rounding differs from ONNX's (Div truncates,
    numpy floors; Mod with fmod=0 takes the divisor's sign, as numpy's % does)."""
    assert a.dtype == b.dtype == np.int64, (op, a.dtype, b.dtype)
    amax, bmax = int(np.abs(a).max(initial=0)), int(np.abs(b).max(initial=0))
    bound = {"Add": amax + bmax, "Sub": amax + bmax, "Mul": amax * bmax}.get(op, amax)
    assert bound < 2**63, f"{op} may overflow int64"
    if op == "Div":
        assert a.min(initial=0) >= 0 and b.min() > 0  # truncation == floor
        return a // b
    return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Mod": np.mod}[op](a, b)


def _numpy_graph(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every value of an MLP graph evaluated in numpy, onnxruntime not involved: its Gemm/Relu
    layers and, in dense_large, the nodes that make its weights (Range, exact int64 arithmetic,
    Cast, one FP32 Mul, Reshape)."""
    m = onnx.load(str(path))
    env = {i.name: numpy_helper.to_array(i) for i in m.graph.initializer}
    env["INPUT0"] = x
    for node in m.graph.node:
        args = [env[n] for n in node.input]
        op = node.op_type
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if op == "Gemm":
            assert not attrs  # alpha = beta = 1, no transposes
            a, w, b = args
            y = a @ w + b
        elif op == "Relu":
            y = np.maximum(args[0], 0)
        elif op == "Range":
            start, limit, delta = args
            assert start.dtype == limit.dtype == delta.dtype == np.int64
            y = np.arange(start, limit, delta, dtype=np.int64)
        elif op in ("Add", "Sub", "Mul", "Div", "Mod") and args[0].dtype == np.int64:
            assert attrs.get("fmod", 0) == 0
            y = _int_op(op, *args)
        elif op == "Mul":  # FP32: one correctly rounded multiply, as anywhere
            a, b = args
            assert a.dtype == b.dtype == np.float32
            y = a * b
        elif op == "Cast":
            y = args[0].astype(onnx.helper.tensor_dtype_to_np_dtype(attrs["to"]))
        elif op == "Reshape":
            y = args[0].reshape(args[1])
        else:
            raise AssertionError(f"unexpected op {op}")
        env[node.output[0]] = y
    return env


def _numpy_mlp(path: Path, x: np.ndarray) -> np.ndarray:
    return _numpy_graph(path, x)["OUTPUT0"]


def test_dense_versions() -> None:
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    y1 = session("dense", "1").run(None, {"INPUT0": x})[0]
    y2 = session("dense", "2").run(None, {"INPUT0": x})[0]
    assert y1.shape == (3, 10) and y1.dtype == np.float32
    assert np.all(np.isfinite(y1)) and np.all(np.isfinite(y2))
    assert not np.allclose(y1, y2, atol=1e-3)
    for v, y in (("1", y1), ("2", y2)):
        ref = _numpy_mlp(REPO / "dense" / v / "model.onnx", x)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # rows are independent of the batch they are in
    y_single = session("dense", "1").run(None, {"INPUT0": x[1:2]})[0]
    np.testing.assert_allclose(y_single, y1[1:2], rtol=1e-5, atol=1e-5)


def test_dense_large() -> None:
    x = np.random.default_rng(2).random((2, 1024), dtype=np.float32)
    y = session("dense_large").run(None, {"INPUT0": x})[0]
    assert y.shape == (2, 10) and y.dtype == np.float32
    assert np.all(np.isfinite(y))
    assert not np.allclose(y[0], y[1])  # output depends on the input
    ref = _numpy_mlp(REPO / "dense_large" / "1" / "model.onnx", x)
    np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3)


DENSE_LARGE = REPO / "dense_large" / "1" / "model.onnx"
# name -> (shape, limit): He-uniform limits, as build_demo_repository.py's _mlp_graph
DENSE_LARGE_WEIGHTS = {
    "w0": ((1024, 2048), np.sqrt(6 / 1024)),
    "w_shared": ((2048, 2048), np.sqrt(6 / 2048)),
    "w_out": ((2048, 10), np.sqrt(3 / 2048)),
}
WEIGHT_PRIME = 2**24 - 3


@functools.cache
def _dense_large_values() -> dict[str, np.ndarray]:
    """Every value of dense_large's graph, the made weights included, evaluated in numpy."""
    return _numpy_graph(DENSE_LARGE, np.zeros((1, 1024), np.float32))


@pytest.mark.parametrize("level", ["ORT_ENABLE_BASIC", "ORT_ENABLE_ALL"])
def test_dense_large_weights_are_made_at_load(tmp_path: Path, level: str) -> None:
    """The file is small because the graph computes its ~24 MiB of weights; what makes that
    free is onnxruntime's constant folding (level basic and up; the server's sessions use
    ORT_ENABLE_ALL): once the session is loaded only the Gemm chain is left to run, and the
    folded weights are bit for bit what numpy computes from the same nodes."""
    assert DENSE_LARGE.stat().st_size < 1 << 20
    m = onnx.load(str(DENSE_LARGE))
    stored = sum(numpy_helper.to_array(i).nbytes for i in m.graph.initializer)
    assert stored < 128 << 10  # biases and scalars only
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(DENSE_LARGE), so, providers=["CPUExecutionProvider"])
    opt = onnx.load(so.optimized_model_filepath)
    ops = [n.op_type for n in opt.graph.node]
    assert set(ops) <= {"Gemm", "FusedGemm", "Relu"}, ops  # FusedGemm = Gemm + Relu (level 2)
    assert sum(op != "Relu" for op in ops) == 12  # 1 + 10 hidden + output
    folded = {i.name: numpy_helper.to_array(i) for i in opt.graph.initializer}
    values = _dense_large_values()
    for name, (shape, _) in DENSE_LARGE_WEIGHTS.items():
        assert folded[name].shape == shape and folded[name].dtype == np.float32
        np.testing.assert_array_equal(folded[name].view(np.int32), values[name].view(np.int32))


def test_dense_large_weights_are_the_documented_polynomial() -> None:
    """h[i, j] = (a*i*i + b*i*j + c*j*j + d*i + e*j + f) mod P, centred and scaled (the
    docstring of build_demo_repository.py's _quadratic_uniform), with Python's integers."""
    inits = {
        i.name: numpy_helper.to_array(i) for i in onnx.load(str(DENSE_LARGE)).graph.initializer
    }
    values = _dense_large_values()
    for name, (shape, limit) in DENSE_LARGE_WEIGHTS.items():
        a, b, c, d, e, f = (int(inits[f"{name}_{k}"]) for k in "abcdef")
        assert int(inits[f"{name}_prime"]) == WEIGHT_PRIME
        assert inits[f"{name}_scale"] == np.float32(limit / 2**23)
        w = values[name]
        rng = np.random.default_rng(len(name))
        for i, j in [(0, 0), (shape[0] - 1, shape[1] - 1), *rng.integers(0, shape, (50, 2))]:
            i, j = int(i), int(j)
            h = (a * i * i + b * i * j + c * j * j + d * i + e * j + f) % WEIGHT_PRIME
            want = np.float32(h - (WEIGHT_PRIME - 1) // 2) * np.float32(limit / 2**23)
            assert w[i, j].view(np.int32) == want.view(np.int32), (name, i, j)


def test_dense_large_weights_look_random() -> None:
    """The made weights are as good as stored random ones: uniform over (-limit, limit), no
    correlation between neighbours, and the singular values of a random matrix (a smooth
    function of the index, such as sin(k * (i*cols + j)), would give rank-2 matrices)."""
    values = _dense_large_values()
    for name, (_, limit) in DENSE_LARGE_WEIGHTS.items():
        w = values[name].astype(np.float64)
        assert -limit < w.min() < -0.999 * limit and 0.999 * limit < w.max() < limit, name
        assert abs(w.mean()) < 0.01 * limit, name
        assert abs(w.std() / (limit / np.sqrt(3)) - 1) < 0.01, name  # a uniform's std
        for x, y in ((w[:-1], w[1:]), (w[:, :-1], w[:, 1:])):  # neighbouring rows, columns
            assert abs(np.corrcoef(x.ravel(), y.ravel())[0, 1]) < 0.03, name
    for name in ("w0", "w_shared"):
        w = values[name].astype(np.float64)
        limit = DENSE_LARGE_WEIGHTS[name][1]
        assert np.linalg.matrix_rank(w[:256, :256]) == 256, name
        # an i.i.d. n x n block with std s: singular values fill [0, 2*s*sqrt(n)] as a quarter
        # circle (median ~0.4x the largest). A 512 block keeps LAPACK quick on a busy machine.
        for block in (w[:512, :512], w[-512:, -512:]):
            sv = np.linalg.svd(block, compute_uv=False)
            top = 2 * limit / np.sqrt(3) * np.sqrt(512)
            assert 0.85 * top < sv[0] < 1.15 * top, (name, sv[0], top)
            assert 0.3 * top < np.median(sv) < 0.5 * top, (name, np.median(sv), top)
    w0, ws = values["w0"], values["w_shared"]
    assert abs(np.corrcoef(w0.ravel(), ws[:1024].ravel())[0, 1]) < 0.01


@pytest.mark.parametrize("n", [0, 1, 7, 262_144])  # up to 1 MiB
def test_identity_fp32(n: int) -> None:
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    (y,) = session("identity_fp32").run(None, {"INPUT0": x})
    assert y.dtype == np.float32 and y.shape == (n,)
    np.testing.assert_array_equal(y, x)
