"""ONNX models for the GPU benchmark and the GPU tests, built with onnx.helper where they run
(the GPU machine builds its own: nothing large is shipped).

    mlp(widths=(256, 256, 10))      the demo's `dense`: FP32 [batch, 256] -> Gemm+Relu -> Gemm
    encoder(layers=6, hidden=384, heads=6, seq=128)
                                    a transformer encoder: FP32 [batch, seq, hidden] -> layers x
                                    (multi-head self-attention + residual + LayerNormalization,
                                    GELU feed-forward + residual + LayerNormalization)
    embedder(layers=6, hidden=384, heads=6, seq=128, vocab=30522)
                                    a MiniLM-shaped sentence embedder: INT64 token ids
                                    [batch, seq] -> embeddings -> the encoder's layers -> mean
                                    pooled FP32 [batch, hidden]
    with_if(width=4)                FP32 [batch, width] -> If(sum > 0, Relu, Neg): control flow,
                                    which CUDA graphs cannot capture
    flatten_dynamic(rows=4, cols=8) FP32 [batch, rows, cols] -> Reshape to [batch, -1] with the
                                    target computed from Shape(INPUT0) (as torch exports
                                    `x.view(x.size(0), -1)`) -> MatMul: shape nodes the CUDA EP
                                    leaves on the CPU, which onnxruntime still captures
    with_cpu_op(width=4)            FP32 [batch, width] -> Relu -> Unique (no CUDA kernel: a
                                    compute node on the CPU EP, Memcpy'd) -> ReduceSum, added
                                    back: a model CUDA graphs cannot capture

Opset 17 (LayerNormalization), IR version 8, as scripts/build_demo_repository.py. Shapes are
static except the batch dimension. The benchmark's models use no Shape/Gather shape arithmetic
(Reshape takes constant shapes with 0 = "copy this dim"), so every node stays on the CUDA EP;
flatten_dynamic and with_cpu_op exist for the tests of the other cases. Imports: numpy
and onnx only.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["embedder", "encoder", "flatten_dynamic", "mlp", "save", "with_cpu_op", "with_if"]

OPSET = 17
IR_VERSION = 8


class _Builder:
    """Accumulates nodes and initializers; names are unique by construction (a counter)."""

    def __init__(self, seed: int) -> None:
        self.rs = np.random.RandomState(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = itertools.count()

    def name(self, stem: str) -> str:
        return f"{stem}_{next(self._n)}"

    def const(self, stem: str, arr: np.ndarray) -> str:
        n = self.name(stem)
        self.inits.append(numpy_helper.from_array(arr, n))
        return n

    def op(self, op_type: str, inputs: Sequence[str], stem: str | None = None, **attrs: Any) -> str:
        out = self.name(stem or op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def weight(self, shape: tuple[int, ...], scale: float) -> str:
        return self.const("w", (self.rs.standard_normal(shape) * scale).astype(np.float32))

    def linear(self, x: str, d_in: int, d_out: int) -> str:
        w = self.weight((d_in, d_out), 1.0 / math.sqrt(d_in))
        b = self.const("b", (self.rs.standard_normal(d_out) * 0.02).astype(np.float32))
        return self.op("Add", [self.op("MatMul", [x, w]), b])

    def model(
        self,
        name: str,
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
    ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            ir_version=IR_VERSION,
            producer_name="microtune-gpu-bench",
        )
        onnx.checker.check_model(m)
        return m


def mlp(widths: Sequence[int] = (256, 256, 10), *, seed: int = 1) -> onnx.ModelProto:
    """Gemm+Relu through `widths` (no Relu after the last layer); INPUT0 -> OUTPUT0, as the
    demo's `dense` (same shapes and node types; weights drawn here)."""
    b = _Builder(seed)
    x = "INPUT0"
    pairs = list(itertools.pairwise(widths))
    for i, (d_in, d_out) in enumerate(pairs):
        w = b.const("w", (b.rs.uniform(-1, 1, (d_in, d_out)) / np.sqrt(d_in)).astype(np.float32))
        bias = b.const("b", b.rs.uniform(-0.1, 0.1, d_out).astype(np.float32))
        last = i == len(pairs) - 1
        if last:
            b.nodes.append(helper.make_node("Gemm", [x, w, bias], ["OUTPUT0"], name="gemm_out"))
        else:
            x = b.op("Relu", [b.op("Gemm", [x, w, bias])])
    return b.model(
        "dense",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", widths[0]])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", widths[-1]])],
    )


def encoder(
    layers: int = 6, hidden: int = 384, heads: int = 6, seq: int = 128, *, seed: int = 0
) -> onnx.ModelProto:
    """A post-LayerNorm transformer encoder on precomputed embeddings: INPUT0 [batch, seq,
    hidden] -> OUTPUT0 [batch, seq, hidden]; feed-forward width 4 x hidden, GELU (erf form)."""
    b = _Builder(seed)
    x = _encoder_layers(b, "INPUT0", layers, hidden, heads)
    b.nodes.append(helper.make_node("Identity", [x], ["OUTPUT0"], name="output"))
    return b.model(
        f"encoder_{layers}x{hidden}",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", seq, hidden])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", seq, hidden])],
    )


def embedder(
    layers: int = 6,
    hidden: int = 384,
    heads: int = 6,
    seq: int = 128,
    vocab: int = 30522,
    *,
    seed: int = 0,
) -> onnx.ModelProto:
    """A sentence embedder shaped like all-MiniLM-L6-v2: INT64 token ids INPUT0 [batch, seq]
    -> token + position embeddings -> LayerNormalization -> `encoder`'s layers -> mean over
    the sequence -> FP32 OUTPUT0 [batch, hidden]. The same compute as `encoder`, but 1 KiB in
    and 1.5 KiB out per row instead of 192 KiB each way, so its end-to-end figure is the
    server's overhead rather than the transport of hidden states. Ids are clamped into the
    vocabulary (Max, Min: CUDA kernels for int64), so any input, perf_analyzer's random bytes
    included, is valid and every node stays on the CUDA EP."""
    b = _Builder(seed)
    lo = b.const("id_min", np.array(0, dtype=np.int64))
    hi = b.const("id_max", np.array(vocab - 1, dtype=np.int64))
    ids = b.op("Min", [b.op("Max", ["INPUT0", lo]), hi])
    tokens = b.weight((vocab, hidden), 0.05)
    positions = b.weight((seq, hidden), 0.05)
    x = b.op("Add", [b.op("Gather", [tokens, ids], axis=0), positions])  # [B, S, H]
    gamma = b.const("ln_g", np.ones(hidden, dtype=np.float32))
    beta = b.const("ln_b", np.zeros(hidden, dtype=np.float32))
    x = b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-12)
    x = _encoder_layers(b, x, layers, hidden, heads)
    b.nodes.append(
        helper.make_node("ReduceMean", [x], ["OUTPUT0"], name="mean_pool", axes=[1], keepdims=0)
    )
    return b.model(
        f"embedder_{layers}x{hidden}",
        [helper.make_tensor_value_info("INPUT0", TensorProto.INT64, ["batch", seq])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", hidden])],
    )


def _encoder_layers(b: _Builder, x: str, layers: int, hidden: int, heads: int) -> str:
    """`layers` post-LayerNorm transformer layers on x [B, S, hidden]: multi-head
    self-attention + residual + LayerNormalization, then a GELU feed-forward of 4 x hidden +
    residual + LayerNormalization. Returns the last layer's output [B, S, hidden]."""
    if hidden % heads:
        raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
    dh = hidden // heads
    split_heads = b.const("split_heads", np.array([0, 0, heads, dh], dtype=np.int64))
    merge_heads = b.const("merge_heads", np.array([0, 0, hidden], dtype=np.int64))
    scale = b.const("scale", np.array(1.0 / math.sqrt(dh), dtype=np.float32))
    half = b.const("half", np.array(0.5, dtype=np.float32))
    one = b.const("one", np.array(1.0, dtype=np.float32))
    rsqrt2 = b.const("rsqrt2", np.array(1.0 / math.sqrt(2.0), dtype=np.float32))

    def layer_norm(x: str) -> str:
        gamma = b.const("ln_g", np.ones(hidden, dtype=np.float32))
        beta = b.const("ln_b", np.zeros(hidden, dtype=np.float32))
        return b.op("LayerNormalization", [x, gamma, beta], axis=-1, epsilon=1e-5)

    def heads_of(x: str, perm: list[int]) -> str:  # [B, S, H] -> perm of [B, S, heads, dh]
        return b.op("Transpose", [b.op("Reshape", [x, split_heads])], perm=perm)

    for _ in range(layers):
        q = heads_of(b.linear(x, hidden, hidden), [0, 2, 1, 3])  # [B, heads, S, dh]
        k = heads_of(b.linear(x, hidden, hidden), [0, 2, 3, 1])  # [B, heads, dh, S]
        v = heads_of(b.linear(x, hidden, hidden), [0, 2, 1, 3])  # [B, heads, S, dh]
        scores = b.op("Mul", [b.op("MatMul", [q, k]), scale])  # [B, heads, S, S]
        probs = b.op("Softmax", [scores], axis=-1)
        ctx = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])  # [B,S,heads,dh]
        attn = b.linear(b.op("Reshape", [ctx, merge_heads]), hidden, hidden)  # [B, S, H]
        x = layer_norm(b.op("Add", [x, attn]))
        h = b.linear(x, hidden, 4 * hidden)  # [B, S, 4H]
        erf = b.op("Erf", [b.op("Mul", [h, rsqrt2])])
        gelu = b.op("Mul", [b.op("Mul", [h, half]), b.op("Add", [erf, one])])
        x = layer_norm(b.op("Add", [x, b.linear(gelu, 4 * hidden, hidden)]))
    return x


def with_if(width: int = 4) -> onnx.ModelProto:
    """OUTPUT0 = Relu(INPUT0) if sum(INPUT0) > 0 else -INPUT0: one If node (control flow)."""
    b = _Builder(0)
    total = b.op("ReduceSum", ["INPUT0"], keepdims=0)
    cond = b.op("Greater", [total, b.const("zero", np.array(0.0, dtype=np.float32))])
    out_info = helper.make_tensor_value_info("branch_out", TensorProto.FLOAT, ["batch", width])
    then_g = helper.make_graph(
        [helper.make_node("Relu", ["INPUT0"], ["branch_out"])], "then", [], [out_info]
    )
    else_g = helper.make_graph(
        [helper.make_node("Neg", ["INPUT0"], ["branch_out"])], "else", [], [out_info]
    )
    b.nodes.append(
        helper.make_node(
            "If", [cond], ["OUTPUT0"], name="choose", then_branch=then_g, else_branch=else_g
        )
    )
    return b.model(
        "with_if",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
    )


def flatten_dynamic(rows: int = 4, cols: int = 8, out: int = 6) -> onnx.ModelProto:
    """OUTPUT0 [batch, out] = Reshape(INPUT0, [Shape(INPUT0)[0], -1]) @ W, the reshape target
    computed at run time from the dynamic batch dimension (Shape -> Gather -> Unsqueeze ->
    Concat), as exporters write it."""
    b = _Builder(2)
    batch = b.op("Gather", [b.op("Shape", ["INPUT0"]), b.const("i0", np.array(0, np.int64))])
    target = b.op(
        "Concat",
        [b.op("Unsqueeze", [batch, b.const("ax0", np.array([0], np.int64))]),
         b.const("rest", np.array([-1], np.int64))],
        axis=0,
    )  # fmt: skip
    flat = b.op("Reshape", ["INPUT0", target])
    w = b.weight((rows * cols, out), 1.0 / math.sqrt(rows * cols))
    b.nodes.append(helper.make_node("MatMul", [flat, w], ["OUTPUT0"], name="project"))
    return b.model(
        "flatten_dynamic",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", rows, cols])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", out])],
    )


def with_cpu_op(width: int = 4) -> onnx.ModelProto:
    """OUTPUT0 = INPUT0 + sum(unique(Relu(INPUT0))): Unique has no CUDA kernel, so it runs on
    the CPU EP between CUDA nodes (Memcpy nodes either side)."""
    b = _Builder(3)
    unique = b.op("Unique", [b.op("Relu", ["INPUT0"])], sorted=1)
    total = b.op("ReduceSum", [unique], keepdims=0)
    b.nodes.append(helper.make_node("Add", ["INPUT0", total], ["OUTPUT0"], name="add_back"))
    return b.model(
        "with_cpu_op",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
    )


def save(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write `model` to `path` (parents created) and return the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(p))
    return p
