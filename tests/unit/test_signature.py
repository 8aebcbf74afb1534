"""runtime.engine.signature.reconcile: a model config checked against its ONNX graph."""

from __future__ import annotations

import re

import pytest

from runtime.engine.signature import SignatureMismatch, reconcile
from runtime.ipc.protocol import ModelSignature, TensorInfo

T = TensorInfo
EMPTY = ModelSignature((), ())

SIMPLE_GRAPH = ModelSignature(
    inputs=(T("INPUT0", "INT32", (-1, 16)), T("INPUT1", "INT32", (-1, 16))),
    outputs=(T("OUTPUT0", "INT32", (-1, 16)), T("OUTPUT1", "INT32", (-1, 16))),
)


def sig(inputs: list[TensorInfo], outputs: list[TensorInfo] | None = None) -> ModelSignature:
    return ModelSignature(tuple(inputs), tuple(outputs or ()))


# ----------------------------------------------------------------------------- config omitted


@pytest.mark.parametrize("mbs", [0, 1, 8])
def test_omitted_config_takes_the_graph(mbs: int) -> None:
    assert reconcile(SIMPLE_GRAPH, EMPTY, mbs) == SIMPLE_GRAPH


def test_omitted_config_without_batching_accepts_any_graph_shapes() -> None:
    graph = sig([T("x", "FP32", ()), T("y", "BYTES", (3, 4))], [T("z", "FP32", (1,))])
    assert reconcile(graph, EMPTY, 0) == graph


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (
            sig([T("x", "FP32", ())], [T("y", "FP32", (-1,))]),
            "max_batch_size is 8 but ONNX input 'x' is a scalar",
        ),
        (
            sig([T("x", "FP32", (4, 3))], [T("y", "FP32", (-1,))]),
            "max_batch_size is 8 but ONNX input 'x' has a fixed first dimension 4",
        ),
        (
            sig([T("x", "FP32", (-1, 3))], [T("y", "FP32", (1, 10))]),
            "max_batch_size is 8 but ONNX output 'y' has a fixed first dimension 1",
        ),
        (
            sig([T("x", "FP32", (-1, 3))], [T("y", "FP32", ())]),
            "max_batch_size is 8 but ONNX output 'y' is a scalar",
        ),
    ],
    ids=["scalar-input", "fixed-input", "fixed-output", "scalar-output"],
)
def test_omitted_config_with_batching_needs_a_batch_dim(
    graph: ModelSignature, message: str
) -> None:
    with pytest.raises(SignatureMismatch, match=re.escape(message)):
        reconcile(graph, EMPTY, 8)


# ----------------------------------------------------------------------------- config declared


def test_declared_simple_config_matches_graph() -> None:
    declared = sig(
        [T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))],
        [T("OUTPUT0", "INT32", (16,)), T("OUTPUT1", "INT32", (16,))],
    )
    assert reconcile(SIMPLE_GRAPH, declared, 8) == SIMPLE_GRAPH


def test_declared_without_batching_is_compared_as_is() -> None:
    graph = sig([T("x", "FP32", (-1,))], [T("y", "FP32", (-1,))])
    declared = sig([T("x", "FP32", (-1,))], [T("y", "FP32", (-1,))])
    assert reconcile(graph, declared, 0) == graph


@pytest.mark.parametrize(
    ("graph_shape", "config_dims", "mbs", "merged"),
    [
        ((-1, -1), (16,), 8, (-1, 16)),  # config is more specific
        ((-1, 16), (-1,), 8, (-1, 16)),  # graph is more specific
        ((-1, -1, 3), (5, -1), 4, (-1, 5, 3)),  # one of each
        ((-1, 8), (4, -1), 0, (4, 8)),  # no batching: the first dim is an ordinary dim
        ((-1, -1), (-1, -1), 0, (-1, -1)),
    ],
)
def test_merged_shapes_keep_the_specific_dims(
    graph_shape: tuple[int, ...], config_dims: tuple[int, ...], mbs: int, merged: tuple[int, ...]
) -> None:
    graph = sig([T("x", "FP32", graph_shape)], [T("y", "FP32", graph_shape)])
    declared = sig([T("x", "FP32", config_dims)], [T("y", "FP32", config_dims)])
    out = reconcile(graph, declared, mbs)
    assert out.inputs == (T("x", "FP32", merged),)
    assert out.outputs == (T("y", "FP32", merged),)


def test_declared_order_is_kept_and_outputs_may_be_a_subset() -> None:
    declared = sig(
        [T("INPUT1", "INT32", (16,)), T("INPUT0", "INT32", (16,))],
        [T("OUTPUT1", "INT32", (16,))],
    )
    out = reconcile(SIMPLE_GRAPH, declared, 8)
    assert [t.name for t in out.inputs] == ["INPUT1", "INPUT0"]
    assert out.outputs == (T("OUTPUT1", "INT32", (-1, 16)),)


def test_inputs_declared_outputs_omitted_takes_graph_outputs() -> None:
    declared = sig([T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))])
    out = reconcile(SIMPLE_GRAPH, declared, 8)
    assert out.outputs == SIMPLE_GRAPH.outputs


@pytest.mark.parametrize(
    ("declared", "mbs", "message"),
    [
        (
            sig([T("INPUT0", "INT32", (16,)), T("INPUTX", "INT32", (16,))]),
            8,
            "config input 'INPUTX' is not an input of the ONNX graph (inputs: INPUT0, INPUT1)",
        ),
        (
            sig(
                [T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))],
                [T("OUT", "INT32", (16,))],
            ),
            8,
            "config output 'OUT' is not an output of the ONNX graph (outputs: OUTPUT0, OUTPUT1)",
        ),
        (
            sig([T("INPUT0", "FP32", (16,)), T("INPUT1", "INT32", (16,))]),
            8,
            "config input 'INPUT0' is FP32 but the ONNX graph has INT32",
        ),
        (
            sig(
                [T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))],
                [T("OUTPUT1", "BYTES", (16,))],
            ),
            8,
            "config output 'OUTPUT1' is BYTES but the ONNX graph has INT32",
        ),
        (
            sig([T("INPUT0", "INT32", (8,)), T("INPUT1", "INT32", (16,))]),
            8,
            "config input 'INPUT0' has shape [-1, 8] (batch dim included) but the ONNX graph "
            "has [-1, 16]",
        ),
        (
            # the batch dim written into dims by mistake: ranks differ
            sig([T("INPUT0", "INT32", (8, 16)), T("INPUT1", "INT32", (16,))]),
            8,
            "config input 'INPUT0' has shape [-1, 8, 16] (batch dim included) but the ONNX graph "
            "has [-1, 16]",
        ),
        (
            # max_batch_size 0: the config must spell the batch dim
            sig([T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (-1, 16))]),
            0,
            "config input 'INPUT0' has shape [16] (batch dim included) but the ONNX graph "
            "has [-1, 16]",
        ),
        (
            sig(
                [T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))],
                [T("OUTPUT0", "INT32", (4,))],
            ),
            8,
            "config output 'OUTPUT0' has shape [-1, 4] (batch dim included) but the ONNX graph "
            "has [-1, 16]",
        ),
        (
            sig([T("INPUT1", "INT32", (16,))]),
            8,
            "ONNX graph input(s) INPUT0 missing from the config",
        ),
        (
            sig(
                [
                    T("INPUT0", "INT32", (16,)),
                    T("INPUT0", "INT32", (16,)),
                    T("INPUT1", "INT32", (16,)),
                ]
            ),
            8,
            "config input 'INPUT0' is declared more than once",
        ),
        (
            sig(
                [T("INPUT0", "INT32", (16,)), T("INPUT1", "INT32", (16,))],
                [T("OUTPUT1", "INT32", (16,)), T("OUTPUT1", "INT32", (16,))],
            ),
            8,
            "config output 'OUTPUT1' is declared more than once",
        ),
    ],
    ids=[
        "unknown-input",
        "unknown-output",
        "input-dtype",
        "output-dtype",
        "input-dim",
        "input-rank",
        "no-batching-rank",
        "output-dim",
        "missing-input",
        "input-twice",
        "output-twice",
    ],
)
def test_mismatches_name_the_tensor(declared: ModelSignature, mbs: int, message: str) -> None:
    with pytest.raises(SignatureMismatch) as info:
        reconcile(SIMPLE_GRAPH, declared, mbs)
    assert str(info.value) == message


def test_missing_inputs_are_all_listed_sorted() -> None:
    graph = sig([T("c", "FP32", (1,)), T("a", "FP32", (1,)), T("b", "FP32", (1,))])
    with pytest.raises(SignatureMismatch, match=r"^ONNX graph input\(s\) a, c missing"):
        reconcile(graph, sig([T("b", "FP32", (1,))]), 0)


@pytest.mark.parametrize(
    ("graph_shape", "message"),
    [
        ((), "max_batch_size is 4 but ONNX input 'x' is a scalar"),
        ((2, 3), "max_batch_size is 4 but ONNX input 'x' has a fixed first dimension 2"),
    ],
)
def test_declared_with_batching_checks_the_graph_batch_dim(
    graph_shape: tuple[int, ...], message: str
) -> None:
    graph = sig([T("x", "FP32", graph_shape)])
    with pytest.raises(SignatureMismatch, match=re.escape(message)):
        reconcile(graph, sig([T("x", "FP32", (3,))]), 4)


def test_signature_mismatch_is_a_value_error() -> None:
    assert issubclass(SignatureMismatch, ValueError)
