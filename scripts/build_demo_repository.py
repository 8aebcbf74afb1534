#!/usr/bin/env python3
"""Build the bundled demo model repository (``server/demo_repository``) with ``onnx.helper``.

Usage::

    python scripts/build_demo_repository.py [--out DIR]  # (re)build, default server/demo_repository
    python scripts/build_demo_repository.py --check      # exit 1 if the committed tree is stale

The output is byte-identical on every run: weights come from ``numpy.random.RandomState`` (whose
streams numpy keeps frozen, unlike ``default_rng``), models carry no timestamps, and every model
pins ``ir_version``/opset so the onnx version that runs the script does not change the bytes.

Layout: ``<repo>/<model>/config.pbtxt`` (Triton ``ModelConfig`` in protobuf text format) and
``<repo>/<model>/<version>/model.onnx``.

Models
------
simple, simple_int8, simple_string, simple_identity
    Same contracts (names, dtypes, dims, max_batch_size, version ``1``) as Triton's example models
    in triton-inference-server/server ``docs/examples/model_repository/<name>/config.pbtxt``, which
    tritonclient's example programs (``simple_grpc_infer_client.py`` ...) call.
    ``simple``: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, INT32 [batch, 16].
    ``simple_int8``: the same for INT8; like Triton's model the arithmetic is done in INT32 and
    cast back, so results wrap around modulo 256 (two's complement: 127 + 1 -> -128), the same as
    numpy int8 arithmetic.
    ``simple_string``: BYTES [batch, 16] holding decimal integers (b"1"); outputs are the decimal
    sum/difference (b"3", b"-1"), via Cast(string->int32), Add/Sub, Cast(int32->string).
    ``simple_identity``: BYTES [batch, -1] echoed unchanged.
dense
    FP32 [batch, 256] -> Gemm(256x256) + Relu -> Gemm(256x10) -> [batch, 10]; versions 1 and 2
    with different weights, ``version_policy { all {} }`` so both are served.
dense_large
    FP32 [batch, 1024] -> Gemm(1024x2048) + Relu -> DENSE_LARGE_HIDDEN_LAYERS x (Gemm(2048x2048) +
    Relu) -> Gemm(2048x10) -> [batch, 10]. The hidden layers share one 2048x2048 weight matrix
    (each has its own bias) so that batch-1 compute is ~2 ms on a CPU with onnxruntime.
    The three weight matrices (~24 MiB of FP32) are not stored: the graph computes each from
    a few scalars (``_quadratic_uniform``: exact int64 arithmetic, then one FP32 multiply),
    and onnxruntime's constant folding (optimization level basic and up, which runs before
    partitioning, so for every execution provider; sessions use ORT_ENABLE_ALL) turns those
    nodes into initializers when the session loads. What runs is the Gemm chain alone, as when
    the weights were stored; a load takes ~0.1 s longer (the folding), and the file, which
    travels with every call to the GPU machine, is ~0.1 MiB instead of ~24 MiB: only the biases
    are stored. max_batch_size 32, dynamic batching with a 2 ms queue delay.
identity_fp32
    FP32 [-1] echoed, max_batch_size 0 (payload-size benchmarks).
"""

from __future__ import annotations

import argparse
import filecmp
import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "server" / "demo_repository"

PRODUCER_NAME = "microtune-demo"
PRODUCER_VERSION = "1"
OPSET = 17
# IR version 8 goes with opset 17 (onnx 1.12+); onnxruntime 1.20+ loads IR <= 10.
IR_VERSION = 8
BATCH_DIM = "batch"

DENSE_LARGE_IN = 1024
DENSE_LARGE_WIDTH = 2048
DENSE_LARGE_HIDDEN_LAYERS = 10
DENSE_LARGE_OUT = 10

# onnx element type -> Triton config data_type
_TRITON_TYPE = {
    TensorProto.INT8: "TYPE_INT8",
    TensorProto.INT32: "TYPE_INT32",
    TensorProto.FLOAT: "TYPE_FP32",
    TensorProto.STRING: "TYPE_STRING",
}


@dataclass(frozen=True)
class Tensor:
    name: str
    elem_type: int  # onnx TensorProto.*
    dims: tuple[int, ...]  # config dims: without the batch dim when max_batch_size > 0; -1 = any


@dataclass
class Model:
    name: str
    max_batch_size: int
    inputs: list[Tensor]
    outputs: list[Tensor]
    # version -> graph builder (called with the model's name, version and tensors)
    versions: dict[int, Callable[[Model, int], onnx.GraphProto]]
    all_versions: bool = False
    max_queue_delay_us: int | None = None
    preferred_batch_sizes: tuple[int, ...] = ()
    cpu_instances: int | None = None  # instance_group { count, KIND_CPU }


# ----------------------------------------------------------------------------- graph helpers


def _value_info(model: Model, t: Tensor) -> onnx.ValueInfoProto:
    shape: list[int | str] = []
    if model.max_batch_size > 0:
        shape.append(BATCH_DIM)
    for i, d in enumerate(t.dims):
        shape.append(d if d >= 0 else f"dim{i}")
    return helper.make_tensor_value_info(t.name, t.elem_type, shape)


def _graph(
    model: Model,
    version: int,
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
) -> onnx.GraphProto:
    return helper.make_graph(
        list(nodes),
        f"{model.name}_v{version}",
        [_value_info(model, t) for t in model.inputs],
        [_value_info(model, t) for t in model.outputs],
        list(initializers),
    )


def _to_model(graph: onnx.GraphProto) -> onnx.ModelProto:
    m = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name=PRODUCER_NAME,
        producer_version=PRODUCER_VERSION,
    )
    onnx.checker.check_model(m, full_check=True)
    return m


def _uniform(rs: np.random.RandomState, shape: tuple[int, ...], limit: float) -> np.ndarray:
    return rs.uniform(-limit, limit, size=shape).astype(np.float32)


# _quadratic_uniform's modulus: a prime below 2**24, so that every value mod P (and so every
# weight before its one FP32 multiply) is an integer that FP32 holds exactly.
WEIGHT_PRIME = 2**24 - 3


def _quadratic_uniform(
    rs: np.random.RandomState, name: str, shape: tuple[int, int], limit: float
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Nodes computing a ``shape`` FP32 tensor ``name`` spread uniformly over (-limit, limit),
    instead of storing it. With i, j the row and column indices and a..f drawn from ``rs`` in
    [1, P) (P = WEIGHT_PRIME), a random quadratic polynomial modulo a prime:

        h[i, j] = (a*i*i + b*i*j + c*j*j + d*i + e*j + f) mod P
        name[i, j] = float32(h[i, j] - (P - 1) / 2) * float32(limit / 2**23)

    Unlike a smooth function of the index (sin(k * (i*cols + j)) has rank 2), this is full rank,
    with the singular values and neighbour correlations of a random matrix. It is computed in
    int64 without overflow (every intermediate < 2**49 for sides up to 2**11) and the cast is
    exact, so the result is one correctly rounded FP32 multiply: bit-identical in onnxruntime,
    numpy or anywhere. Only 7 nodes work on the whole matrix (each costs onnxruntime's constant
    folding a few ns per element when the session loads); the others work on vectors.
    Every input is an initializer, so onnxruntime folds them all into one initializer."""
    rows, cols = shape
    assert max(rows, cols) <= 1 << 11  # keeps every int64 intermediate below 2**49
    a, b, c, d, e, f = (int(v) for v in rs.randint(1, WEIGHT_PRIME, size=6))
    consts = {
        "rows": np.array(rows, np.int64),
        "cols": np.array(cols, np.int64),
        "zero": np.array(0, np.int64),
        "one": np.array(1, np.int64),
        "column": np.array([-1, 1], np.int64),
        "a": np.array(a, np.int64),
        "b": np.array(b, np.int64),
        "c": np.array(c, np.int64),
        "d": np.array(d, np.int64),
        "e": np.array(e, np.int64),
        "f": np.array(f, np.int64),
        "prime": np.array(WEIGHT_PRIME, np.int64),
        "half": np.array((WEIGHT_PRIME - 1) // 2, np.int64),
        "scale": np.array(limit / 2**23, np.float32),
    }
    inits = [numpy_helper.from_array(v, f"{name}_{k}") for k, v in consts.items()]
    steps = [  # (op, inputs, output), names without their f"{name}_" prefix; "" is ``name``
        ("Range", ["zero", "rows", "one"], "rows_range"),
        ("Reshape", ["rows_range", "column"], "i"),  # [rows, 1]
        ("Range", ["zero", "cols", "one"], "j"),  # [cols]
        # vectors: row = (a*i + d)*i + f, col = (c*j + e)*j, bi = b*i
        ("Mul", ["i", "a"], "ai"),
        ("Add", ["ai", "d"], "ai_d"),
        ("Mul", ["ai_d", "i"], "ai_d_i"),
        ("Add", ["ai_d_i", "f"], "row"),
        ("Mul", ["j", "c"], "cj"),
        ("Add", ["cj", "e"], "cj_e"),
        ("Mul", ["cj_e", "j"], "col"),
        ("Mul", ["i", "b"], "bi"),
        # the whole matrix, by broadcasting [rows, 1] with [cols]
        ("Mul", ["bi", "j"], "bij"),
        ("Add", ["bij", "row"], "bij_row"),
        ("Add", ["bij_row", "col"], "q"),
        ("Mod", ["q", "prime"], "h"),
        ("Sub", ["h", "half"], "centered"),
        ("Cast", ["centered"], "centered_float"),
        ("Mul", ["centered_float", "scale"], ""),
    ]
    nodes = [
        helper.make_node(
            op,
            [f"{name}_{x}" for x in xs],
            [f"{name}_{y}" if y else name],
            name=f"{name}_{y}" if y else name,
            **({"to": TensorProto.FLOAT} if op == "Cast" else {}),
        )
        for op, xs, y in steps
    ]
    return nodes, inits


# ----------------------------------------------------------------------------- graphs


def _add_sub_graph(compute_type: int | None) -> Callable[[Model, int], onnx.GraphProto]:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, computed in ``compute_type``
    (None: in the input type) and cast back to the output type."""

    def build(model: Model, version: int) -> onnx.GraphProto:
        out_type = model.outputs[0].elem_type
        nodes: list[onnx.NodeProto] = []
        a, b = "INPUT0", "INPUT1"
        if compute_type is not None:
            nodes += [
                helper.make_node("Cast", ["INPUT0"], ["input0_cast"], to=compute_type),
                helper.make_node("Cast", ["INPUT1"], ["input1_cast"], to=compute_type),
            ]
            a, b = "input0_cast", "input1_cast"
        if compute_type is None:
            nodes += [
                helper.make_node("Add", [a, b], ["OUTPUT0"]),
                helper.make_node("Sub", [a, b], ["OUTPUT1"]),
            ]
        else:
            nodes += [
                helper.make_node("Add", [a, b], ["sum"]),
                helper.make_node("Sub", [a, b], ["difference"]),
                helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=out_type),
                helper.make_node("Cast", ["difference"], ["OUTPUT1"], to=out_type),
            ]
        return _graph(model, version, nodes)

    return build


def _identity_graph(model: Model, version: int) -> onnx.GraphProto:
    return _graph(model, version, [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])])


def _mlp_graph(
    model: Model,
    version: int,
    seed: int,
    widths: Sequence[int],
    shared_hidden_layers: int = 0,
    weights_in_graph: bool = False,
) -> onnx.GraphProto:
    """Gemm+Relu layers through ``widths`` (first = input width, last = output width, no Relu on
    the last layer). With ``shared_hidden_layers`` = k > 0, k extra Gemm+Relu layers of width
    widths[-2] are inserted before the output layer; they share one weight matrix, each has its
    own bias. With ``weights_in_graph`` the weight matrices are computed by nodes
    (``_quadratic_uniform``) instead of stored; biases are stored either way."""
    rs = np.random.RandomState(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "INPUT0"
    layer = 0

    def gemm(x: str, w: str, b: str, relu: bool, out: str | None = None) -> str:
        nonlocal layer
        y = out or f"gemm{layer}"
        nodes.append(helper.make_node("Gemm", [x, w, b], [y], name=f"gemm{layer}"))
        if relu:
            nodes.append(helper.make_node("Relu", [y], [f"relu{layer}"], name=f"relu{layer}"))
            y = f"relu{layer}"
        layer += 1
        return y

    def add_init(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def add_weight(name: str, shape: tuple[int, int], limit: float) -> str:
        if not weights_in_graph:
            return add_init(name, _uniform(rs, shape, limit))
        w_nodes, w_inits = _quadratic_uniform(rs, name, shape, limit)
        nodes.extend(w_nodes)
        inits.extend(w_inits)
        return name

    # Hidden layers: He-uniform weights (keeps activation scale through Relu), small biases.
    for i, (d_in, d_out) in enumerate(itertools.pairwise(widths[:-1])):
        w = add_weight(f"w{i}", (d_in, d_out), np.sqrt(6.0 / d_in))
        b = add_init(f"b{i}", _uniform(rs, (d_out,), 0.1))
        x = gemm(x, w, b, relu=True)
    if shared_hidden_layers:
        d = widths[-2]
        w = add_weight("w_shared", (d, d), np.sqrt(6.0 / d))
        for k in range(shared_hidden_layers):
            b = add_init(f"b_shared{k}", _uniform(rs, (d,), 0.1))
            x = gemm(x, w, b, relu=True)
    d_in, d_out = widths[-2], widths[-1]
    w = add_weight("w_out", (d_in, d_out), np.sqrt(3.0 / d_in))
    b = add_init("b_out", _uniform(rs, (d_out,), 0.1))
    gemm(x, w, b, relu=False, out="OUTPUT0")
    return _graph(model, version, nodes, inits)


# ----------------------------------------------------------------------------- models


def _simple(name: str, elem_type: int, compute_type: int | None) -> Model:
    t = lambda n: Tensor(n, elem_type, (16,))  # noqa: E731
    return Model(
        name=name,
        max_batch_size=8,
        inputs=[t("INPUT0"), t("INPUT1")],
        outputs=[t("OUTPUT0"), t("OUTPUT1")],
        versions={1: _add_sub_graph(compute_type)},
    )


def models() -> list[Model]:
    fp32 = TensorProto.FLOAT
    string = TensorProto.STRING
    return [
        _simple("simple", TensorProto.INT32, None),
        # Like Triton's simple_int8 model: compute in int32, cast back (wraps modulo 256).
        _simple("simple_int8", TensorProto.INT8, TensorProto.INT32),
        _simple("simple_string", string, TensorProto.INT32),
        Model(
            name="simple_identity",
            max_batch_size=8,
            inputs=[Tensor("INPUT0", string, (-1,))],
            outputs=[Tensor("OUTPUT0", string, (-1,))],
            versions={1: _identity_graph},
        ),
        Model(
            name="dense",
            max_batch_size=8,
            inputs=[Tensor("INPUT0", fp32, (256,))],
            outputs=[Tensor("OUTPUT0", fp32, (10,))],
            versions={
                1: lambda m, v: _mlp_graph(m, v, seed=1, widths=(256, 256, 10)),
                2: lambda m, v: _mlp_graph(m, v, seed=2, widths=(256, 256, 10)),
            },
            all_versions=True,
        ),
        Model(
            name="dense_large",
            max_batch_size=32,
            inputs=[Tensor("INPUT0", fp32, (DENSE_LARGE_IN,))],
            outputs=[Tensor("OUTPUT0", fp32, (DENSE_LARGE_OUT,))],
            versions={
                1: lambda m, v: _mlp_graph(
                    m,
                    v,
                    seed=3,
                    widths=(DENSE_LARGE_IN, DENSE_LARGE_WIDTH, DENSE_LARGE_OUT),
                    shared_hidden_layers=DENSE_LARGE_HIDDEN_LAYERS,
                    weights_in_graph=True,  # ~24 MiB of weights made at load, not stored
                )
            },
            max_queue_delay_us=2000,
            # Two batches at once (both cores of a small machine); batches of 8 leave the
            # second instance work when 16 clients wait (one batch of 16 would take them all).
            preferred_batch_sizes=(8,),
            cpu_instances=2,
        ),
        Model(
            name="identity_fp32",
            max_batch_size=0,
            inputs=[Tensor("INPUT0", fp32, (-1,))],
            outputs=[Tensor("OUTPUT0", fp32, (-1,))],
            versions={1: _identity_graph},
        ),
    ]


# ----------------------------------------------------------------------------- config.pbtxt


def _tensor_block(kind: str, tensors: Sequence[Tensor]) -> list[str]:
    lines = [f"{kind} ["]
    for i, t in enumerate(tensors):
        dims = ", ".join(str(d) for d in t.dims)
        lines += [
            "  {",
            f'    name: "{t.name}"',
            f"    data_type: {_TRITON_TYPE[t.elem_type]}",
            f"    dims: [ {dims} ]",
            "  }" + ("," if i < len(tensors) - 1 else ""),
        ]
    lines.append("]")
    return lines


def config_text(model: Model) -> str:
    lines = [
        "# Generated by scripts/build_demo_repository.py; do not edit by hand.",
        f'name: "{model.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {model.max_batch_size}",
    ]
    if model.all_versions:
        lines.append("version_policy: { all { } }")
    lines += _tensor_block("input", model.inputs)
    lines += _tensor_block("output", model.outputs)
    if model.max_queue_delay_us is not None:
        lines += [
            "dynamic_batching {",
            *(
                [f"  preferred_batch_size: [ {', '.join(map(str, model.preferred_batch_sizes))} ]"]
                if model.preferred_batch_sizes
                else []
            ),
            f"  max_queue_delay_microseconds: {model.max_queue_delay_us}",
            "}",
        ]
    if model.cpu_instances is not None:
        lines.append(f"instance_group [ {{ count: {model.cpu_instances} kind: KIND_CPU }} ]")
    return "\n".join(lines) + "\n"


def validate_config(text: str) -> None:
    """Parse with protobuf text_format into inference.ModelConfig (raises on unknown fields)."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from google.protobuf import text_format

    from server._proto.inference import grpc_service_pb2

    text_format.Parse(text, grpc_service_pb2.ModelConfig())


# ----------------------------------------------------------------------------- build / check


def build(out: Path) -> list[Path]:
    """Write the repository under ``out`` (existing model directories are replaced); return the
    written files relative to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for model in models():
        mdir = out / model.name
        if mdir.exists():
            shutil.rmtree(mdir)
        mdir.mkdir()
        text = config_text(model)
        validate_config(text)
        (mdir / "config.pbtxt").write_text(text, encoding="utf-8", newline="\n")
        written.append(Path(model.name, "config.pbtxt"))
        for version, graph_fn in sorted(model.versions.items()):
            onnx_model = _to_model(graph_fn(model, version))
            vdir = mdir / str(version)
            vdir.mkdir()
            (vdir / "model.onnx").write_bytes(onnx_model.SerializeToString(deterministic=True))
            written.append(Path(model.name, str(version), "model.onnx"))
    return written


def _tree(root: Path) -> set[Path]:
    return {
        p.relative_to(root)
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.name != ".DS_Store"
    }


def check(committed: Path) -> list[str]:
    """Rebuild into a temp dir; return a list of differences against ``committed``."""
    with tempfile.TemporaryDirectory(prefix="demo_repository_") as tmp:
        fresh = Path(tmp)
        build(fresh)
        want, have = _tree(fresh), _tree(committed) if committed.is_dir() else set()
        problems = [f"missing: {p}" for p in sorted(want - have)]
        problems += [f"unexpected: {p}" for p in sorted(have - want)]
        problems += [
            f"differs: {p}"
            for p in sorted(want & have)
            if not filecmp.cmp(fresh / p, committed / p, shallow=False)
        ]
        return problems


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})"
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="rebuild into a temp dir and exit 1 if any file differs from --out",
    )
    args = ap.parse_args(argv)
    out: Path = args.out
    if args.check:
        problems = check(out)
        if problems:
            print(f"{out} is out of date; run {Path(__file__).name} to regenerate:")
            for p in problems:
                print(f"  {p}")
            return 1
        print(f"{out} is up to date")
        return 0
    files = build(out)
    total = sum(os.path.getsize(out / f) for f in files)
    print(f"wrote {len(files)} files ({total / 2**20:.1f} MiB) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
