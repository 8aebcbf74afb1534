"""server.validation.plan_call: a request checked against the signature it was routed to."""

from __future__ import annotations

import pytest

from runtime.client import PreparedInput
from runtime.ipc.protocol import ModelSignature, TensorInfo
from server.errors import InvalidInput
from server.types import InferRequest, Tensor
from server.validation import plan_call

T = TensorInfo

SIMPLE = ModelSignature(  # as reconciled: full shapes, batch dim first
    inputs=(T("INPUT0", "INT32", (-1, 16)), T("INPUT1", "INT32", (-1, 16))),
    outputs=(T("OUTPUT0", "INT32", (-1, 16)), T("OUTPUT1", "INT32", (-1, 16))),
)


def t(
    name: str, shape: tuple[int, ...], datatype: str = "INT32", data: bytes | None = None
) -> Tensor:
    if data is None:
        n = 1
        for d in shape:
            n *= d
        data = bytes(n * 4)
    return Tensor(name, datatype, shape, data)


def req(*inputs: Tensor, outputs: tuple[str, ...] = (), model: str = "simple") -> InferRequest:
    return InferRequest(model, "", "id-1", tuple(inputs), outputs, {})


def ok2(batch: int = 1) -> tuple[Tensor, Tensor]:
    return t("INPUT0", (batch, 16)), t("INPUT1", (batch, 16))


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            req(*ok2(), t("INPUT2", (1, 16))),
            "unexpected input 'INPUT2' for model 'simple' (inputs: INPUT0, INPUT1)",
        ),
        (
            req(t("INPUT0", (1, 16)), t("INPUT0", (1, 16))),
            "input 'INPUT0' appears more than once",
        ),
        (
            req(t("INPUT0", (1, 16)), t("INPUT1", (1, 16), "FP32")),
            "input 'INPUT1' has datatype FP32 but model 'simple' expects INT32",
        ),
        (
            req(t("INPUT0", (16,)), t("INPUT1", (1, 16))),
            "input 'INPUT0' has shape [16] but model 'simple' expects [-1, 16]",
        ),
        (
            req(t("INPUT0", (1, 1, 16)), t("INPUT1", (1, 16))),
            "input 'INPUT0' has shape [1, 1, 16] but model 'simple' expects [-1, 16]",
        ),
        (
            req(t("INPUT0", (1, 16)), t("INPUT1", (1, 15))),
            "input 'INPUT1' has shape [1, 15] but model 'simple' expects [-1, 16]",
        ),
        (
            req(t("INPUT0", ()), t("INPUT1", (1, 16))),
            "input 'INPUT0' has shape [] but model 'simple' expects [-1, 16]",
        ),
        (
            req(*ok2(9)),
            "input 'INPUT0' has batch size 9, more than max_batch_size 8 of model 'simple'",
        ),
        (req(*ok2(0)), "input 'INPUT0' has batch size 0; it must be >= 1"),
        (
            req(t("INPUT1", (1, 16))),
            "model 'simple' expects input(s) INPUT0, missing from the request",
        ),
        (req(), "model 'simple' expects input(s) INPUT0, INPUT1, missing from the request"),
        (
            req(t("INPUT0", (1, 16)), t("INPUT1", (2, 16))),
            "inputs of model 'simple' disagree on the batch size: [1, 2]",
        ),
        (
            req(*ok2(), outputs=("OUTPUT0", "OUT")),
            "unknown output 'OUT' requested from model 'simple' (outputs: OUTPUT0, OUTPUT1)",
        ),
        (
            req(*ok2(), outputs=("OUTPUT1", "OUTPUT0", "OUTPUT1")),
            "output 'OUTPUT1' is requested more than once",
        ),
    ],
    ids=[
        "unexpected-input",
        "duplicate-input",
        "dtype",
        "rank-missing-batch",
        "rank-extra",
        "dim",
        "scalar",
        "batch-over-max",
        "batch-zero",
        "missing-input",
        "no-inputs",
        "inconsistent-batch",
        "unknown-output",
        "duplicate-output",
    ],
)
def test_errors_name_the_tensor(request_: InferRequest, message: str) -> None:
    with pytest.raises(InvalidInput) as info:
        plan_call(request_, SIMPLE, 8)
    assert info.value.message == message
    assert str(info.value) == message


def test_without_batching_the_first_dim_is_not_a_batch() -> None:
    sig = ModelSignature((T("x", "FP32", (4, -1)),), (T("y", "FP32", (4, -1)),))
    with pytest.raises(InvalidInput, match=r"input 'x' has shape \[0, 3\] but model 'm' expects"):
        plan_call(req(t("x", (0, 3), "FP32"), model="m"), sig, 0)
    plan = plan_call(req(t("x", (4, 0), "FP32"), model="m"), sig, 0)  # empty variable dim is fine
    assert plan.batch_size == 1


def test_batch_equal_to_max_is_accepted() -> None:
    assert plan_call(req(*ok2(8)), SIMPLE, 8).batch_size == 8


# ----------------------------------------------------------------------------- plans


def test_inputs_are_returned_in_model_order() -> None:
    a = t("INPUT1", (2, 16), data=b"\x01" * 128)
    b = t("INPUT0", (2, 16), data=b"\x02" * 128)
    plan = plan_call(req(a, b), SIMPLE, 8)
    assert plan.inputs == (
        PreparedInput("INPUT0", "INT32", (2, 16), b.data),
        PreparedInput("INPUT1", "INT32", (2, 16), a.data),
    )
    assert plan.inputs[0].payload is b.data  # no copy
    assert plan.batch_size == 2
    assert plan.outputs == ()


@pytest.mark.parametrize(
    ("batch", "outputs", "reserve"),
    [
        (1, (), 2 * (16 * 4 + 64)),
        (2, (), 2 * (2 * 16 * 4 + 64)),
        (8, ("OUTPUT1",), 8 * 16 * 4 + 64),
        (3, ("OUTPUT1", "OUTPUT0"), 2 * (3 * 16 * 4 + 64)),
    ],
)
def test_reserve_for_fixed_shapes(batch: int, outputs: tuple[str, ...], reserve: int) -> None:
    plan = plan_call(req(*ok2(batch), outputs=outputs), SIMPLE, 8)
    assert plan.output_reserve == reserve
    assert plan.outputs == outputs
    assert plan.batch_size == batch


@pytest.mark.parametrize(
    ("out", "mbs", "reserve"),
    [
        (T("y", "FP32", (4, 3)), 0, 4 * 3 * 4 + 64),
        (T("y", "FP64", (-1, 3)), 2, 2 * 3 * 8 + 64),  # batch dim -> the request's batch
        (T("y", "INT8", (-1, 0)), 2, 64),  # empty output
        (T("y", "FP32", (-1, 3)), 0, 4096),  # no batching: -1 is unknown
        (T("y", "FP32", (-1, -1)), 2, 4096),  # a variable non-batch dim
        (T("y", "BYTES", (-1, 3)), 2, 4096),  # text: size unknown
        (T("y", "BYTES", (2, 3)), 0, 4096),
    ],
    ids=["fixed", "batched", "empty", "unbatched-var", "var-dim", "bytes-batched", "bytes-fixed"],
)
def test_reserve_per_output(out: TensorInfo, mbs: int, reserve: int) -> None:
    in_shape = (2, 3) if mbs else (3,)
    in_spec = T("x", "FP32", (-1, 3) if mbs else (3,))
    sig = ModelSignature((in_spec,), (out,))
    plan = plan_call(req(t("x", in_shape, "FP32"), model="m"), sig, mbs)
    assert plan.output_reserve == reserve


def test_unknown_sizes_reserve_the_input_size_when_larger() -> None:
    sig = ModelSignature((T("x", "FP32", (-1,)),), (T("y", "FP32", (-1,)), T("z", "BYTES", (-1,))))
    big = t("x", (10_000,), "FP32")
    plan = plan_call(req(big, model="identity"), sig, 0)
    assert plan.output_reserve == 2 * 40_000
    small = t("x", (10,), "FP32")
    assert plan_call(req(small, model="identity"), sig, 0).output_reserve == 2 * 4096
    one = plan_call(req(big, outputs=("y",), model="identity"), sig, 0)
    assert one.output_reserve == 40_000


def test_model_without_inputs() -> None:
    sig = ModelSignature((), (T("y", "FP32", (-1, 2)),))
    plan = plan_call(req(model="const"), sig, 4)
    assert plan.inputs == ()
    assert plan.batch_size == 1
    assert plan.output_reserve == 2 * 4 + 64
