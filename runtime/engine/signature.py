"""Pure checks of a model config against its ONNX graph (no onnxruntime import).

The config may omit inputs/outputs (then the graph's are taken) or declare them; a declaration
that contradicts the graph (unknown name, other dtype, incompatible dims, missing batch dim) or
names a tensor twice is an error with a message naming the tensor. Shapes returned are full
shapes: with max_batch_size > 0 they start with the batch dimension (-1).
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime.ipc.protocol import ModelSignature, TensorInfo

__all__ = ["SignatureMismatch", "reconcile", "shapes_fit"]


class SignatureMismatch(ValueError):
    pass


def reconcile(
    graph: ModelSignature, declared: ModelSignature, max_batch_size: int
) -> ModelSignature:
    inputs = _side("input", graph.inputs, declared.inputs, max_batch_size, require_all=True)
    outputs = _side("output", graph.outputs, declared.outputs, max_batch_size, require_all=False)
    return ModelSignature(inputs, outputs)


def _side(
    kind: str,
    graph: tuple[TensorInfo, ...],
    declared: tuple[TensorInfo, ...],
    max_batch_size: int,
    *,
    require_all: bool,
) -> tuple[TensorInfo, ...]:
    by_name = {t.name: t for t in graph}
    if not declared:
        if max_batch_size > 0:
            for t in graph:
                _check_batch_dim(kind, t, max_batch_size)
        return graph
    out: list[TensorInfo] = []
    seen: set[str] = set()
    for d in declared:
        # Served as declared: a name twice would be advertised twice by ModelMetadata, and a
        # request that follows it is refused ("appears more than once"). Triton refuses it.
        if d.name in seen:
            raise SignatureMismatch(f"config {kind} '{d.name}' is declared more than once")
        seen.add(d.name)
        g = by_name.get(d.name)
        if g is None:
            names = ", ".join(sorted(by_name))
            raise SignatureMismatch(
                f"config {kind} '{d.name}' is not an {kind} of the ONNX graph ({kind}s: {names})"
            )
        if d.datatype != g.datatype:
            raise SignatureMismatch(
                f"config {kind} '{d.name}' is {d.datatype} but the ONNX graph has {g.datatype}"
            )
        full = ((-1,) if max_batch_size > 0 else ()) + d.shape
        if max_batch_size > 0:
            _check_batch_dim(kind, g, max_batch_size)
        if not shapes_fit(full, g.shape):
            raise SignatureMismatch(
                f"config {kind} '{d.name}' has shape {list(full)} (batch dim included) but the "
                f"ONNX graph has {list(g.shape)}"
            )
        # Keep the more specific of the two for each dimension.
        merged = tuple(b if a == -1 else a for a, b in zip(full, g.shape, strict=True))
        out.append(TensorInfo(d.name, d.datatype, merged))
    if require_all:
        missing = sorted(set(by_name) - {t.name for t in declared})
        if missing:
            raise SignatureMismatch(
                f"ONNX graph {kind}(s) {', '.join(missing)} missing from the config"
            )
    return tuple(out)


def shapes_fit(a: Sequence[int], b: Sequence[int]) -> bool:
    """Same rank, and each dimension equal unless one side leaves it open (-1)."""
    if len(a) != len(b):
        return False
    return all(x == y or x == -1 or y == -1 for x, y in zip(a, b, strict=True))


def _check_batch_dim(kind: str, t: TensorInfo, max_batch_size: int) -> None:
    if not t.shape:
        raise SignatureMismatch(
            f"max_batch_size is {max_batch_size} but ONNX {kind} '{t.name}' is a scalar"
        )
    if t.shape[0] != -1 and t.shape[0] < max_batch_size:
        raise SignatureMismatch(
            f"max_batch_size is {max_batch_size} but ONNX {kind} '{t.name}' has a fixed first "
            f"dimension {t.shape[0]}"
        )
