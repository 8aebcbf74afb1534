"""Triton's `reshape` of a config tensor, applied by rewriting the ONNX graph's inputs and outputs.

A config input `dims: [1] reshape { shape: [] }` means: clients send [batch, 1], the model
takes [batch]. Rather than reshaping tensors around every execution path (plain sessions,
batches, CUDA graphs and their bucket buffers, tensors bound in CUDA shared memory), the
worker gives onnxruntime a graph whose inputs and outputs already have the clients' shapes: a
Reshape node after each such input and before each such output. A reshape keeps the bytes
(row-major), so this costs a shape change, no copy; every path then sees the config's `dims`.

Needs the `onnx` package (in the cpu and gpu extras); a model stored with external data is
loaded whole to be rewritten.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator, Mapping

import numpy as np

from runtime.engine.signature import shapes_fit
from runtime.ipc.protocol import LoadModel

__all__ = ["ReshapeError", "model_file", "reshaped_model"]

_SUFFIX = "__microtune_reshaped"


class ReshapeError(ValueError):
    """The config's reshape cannot be applied to this graph."""


@contextlib.contextmanager
def model_file(msg: LoadModel, directory: str | None = None) -> Iterator[str]:
    """The file onnxruntime loads `msg`'s version from: its own, or, when its config reshapes
    tensors, a rewritten copy in `directory` (the worker's run directory, which the front
    removes when it stops and after a crash), deleted when the load is done (sessions read the
    file at creation)."""
    if not msg.reshapes:
        yield msg.path
        return
    declared = {t.name: t.shape for t in (*msg.declared.inputs, *msg.declared.outputs)}
    data = reshaped_model(msg.path, dict(msg.reshapes), declared, msg.max_batch_size > 0)
    fd, tmp = tempfile.mkstemp(prefix="reshaped-", suffix=".onnx", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        yield tmp
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# protobuf's limit for one message: a rewritten model is written whole (external data inline).
_MAX_MODEL_BYTES = (1 << 31) - 1


def reshaped_model(
    path: str,
    reshapes: Mapping[str, tuple[int, ...]],
    dims: Mapping[str, tuple[int, ...]],
    batched: bool,
) -> bytes:
    """The model at `path`, serialized, with each tensor named in `reshapes` (its shape in the
    graph, batch dimension excluded) seen by clients as its config `dims` (same exclusion)."""
    try:
        import onnx
        from onnx import helper, numpy_helper
    except ImportError as exc:  # pragma: no cover - onnx is in both extras
        raise ReshapeError("a config reshape needs the onnx package") from exc
    try:
        model = onnx.load(path)
    except Exception as exc:
        raise ReshapeError(f"cannot read {path} to apply the config's reshape: {exc}") from None
    if model.ByteSize() > _MAX_MODEL_BYTES:
        raise ReshapeError(
            f"{path} (with its external data) is over 2 GiB: a config reshape cannot be applied "
            "to it; declare the ONNX graph's own dims instead"
        )
    g = model.graph
    inputs = {i.name: i for i in g.input}
    outputs = {o.name: o for o in g.output}
    produced = {out for node in g.node for out in node.output}
    initializers = {t.name: t for t in g.initializer}
    in_subgraphs = _names_in_subgraphs(g)
    prefix = [-1] if batched else []
    for name, model_dims in reshapes.items():
        client = dims[name]
        if math.prod(client) != math.prod(model_dims):
            raise ReshapeError(
                f"'{name}': dims {list(client)} and reshape {list(model_dims)} hold different "
                "numbers of elements"
            )
        info = inputs.get(name) or outputs.get(name)
        if info is None:
            raise ReshapeError(f"config tensor '{name}' with a reshape is not in the ONNX graph")
        # As Triton's onnxruntime backend does: the reshape is the graph's own shape.
        graph_dims = _dims(info)
        want = [*prefix, *model_dims]
        if graph_dims is not None and not shapes_fit(graph_dims, want):
            raise ReshapeError(
                f"'{name}': reshape {list(model_dims)} does not fit the ONNX graph's shape "
                f"{graph_dims}" + (" (batch dimension first)" if batched else "")
            )
        if name in in_subgraphs:
            raise ReshapeError(
                f"'{name}' is used inside a control-flow subgraph (If, Loop, Scan): a reshape of "
                "it is not supported"
            )
        inner = name + _SUFFIX
        shape = name + _SUFFIX + "_shape"
        if name in inputs:
            _rename_uses(g, name, inner)
            target = np.array([*prefix, *model_dims], dtype=np.int64)
            g.initializer.append(numpy_helper.from_array(target, shape))
            g.node.insert(0, helper.make_node("Reshape", [name, shape], [inner]))
            _set_dims(inputs[name], client, batched)
            continue
        if name in produced:
            _rename_uses(g, name, inner)  # (its producer's output and any other consumer)
        elif name in initializers:  # a constant output (a label table, say)
            _rename_uses(g, name, inner)
            initializers[name].name = inner
        else:
            raise ReshapeError(f"'{name}' is a graph output no node produces: cannot reshape it")
        target = np.array([*prefix, *client], dtype=np.int64)
        g.initializer.append(numpy_helper.from_array(target, shape))
        g.node.append(helper.make_node("Reshape", [inner, shape], [name]))
        _set_dims(outputs[name], client, batched)
    return bytes(model.SerializeToString())


def _dims(info: object) -> list[int] | None:
    """A graph input's or output's shape, -1 for a symbolic or unknown dimension; None when
    the graph does not say."""
    tensor = info.type.tensor_type  # type: ignore[attr-defined]
    if not tensor.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]


def _names_in_subgraphs(g: object) -> set[str]:
    """Every name a node inside a subgraph (If, Loop, Scan bodies, nested) reads or writes."""
    found: set[str] = set()

    def walk(graph: object, inside: bool) -> None:
        for node in graph.node:  # type: ignore[attr-defined]
            if inside:
                found.update(node.input)
                found.update(node.output)
            for attr in node.attribute:
                for sub in (attr.g,) if attr.HasField("g") else ():
                    walk(sub, True)
                for sub in attr.graphs:
                    walk(sub, True)

    walk(g, False)
    return found


def _rename_uses(g: object, old: str, new: str) -> None:
    """Every node input or output named `old` becomes `new` (value_info too)."""
    for node in g.node:  # type: ignore[attr-defined]
        for i, n in enumerate(node.input):
            if n == old:
                node.input[i] = new
        for i, n in enumerate(node.output):
            if n == old:
                node.output[i] = new
    for vi in g.value_info:  # type: ignore[attr-defined]
        if vi.name == old:
            vi.name = new


def _set_dims(value_info: object, client: tuple[int, ...], batched: bool) -> None:
    """The graph input's or output's shape becomes [batch] + client (batch kept as it was)."""
    shape = value_info.type.tensor_type.shape  # type: ignore[attr-defined]
    batch = shape.dim[0] if batched and len(shape.dim) else None
    kept = None
    if batch is not None:
        kept = (batch.dim_value, batch.dim_param)
    del shape.dim[:]
    if batched:
        d = shape.dim.add()
        if kept is not None and kept[1]:
            d.dim_param = kept[1]
        elif kept is not None and kept[0]:
            d.dim_value = kept[0]
        else:
            d.dim_param = "batch"
    for v in client:
        shape.dim.add().dim_value = v
