"""Configs Triton refuses to load are refused here too, each model alone, with its reason.

A config naming an input (or an output) twice loaded READY and advertised the duplicate in
ModelMetadata, and a request that followed the metadata was refused; a preferred_batch_size
above max_batch_size was silently dropped. Each is now a load error: the model is UNAVAILABLE
with a reason naming the tensor or the size, and the repository's other models serve.

Triton's features that microtune lacks and whose absence would change the answers (sequence
batching, ensembles, decoupled models, batch inputs) are refused as not supported; they were
refused as "does not parse", like a typo, and so were Triton configs setting fields that change
nothing here (response_cache, optimization priority, host_policy...), which now load and serve,
one warning naming the ignored fields.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness import Server, running_server
from onnx import TensorProto, helper, save
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Stub = service_pb2_grpc.GRPCInferenceServiceStub


def _add_model(root: Path, name: str, config: str) -> None:
    """C = A + B, FP32 [batch, 4]."""
    t = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["C"])],
        "add",
        [helper.make_tensor_value_info(n, t, ["batch", 4]) for n in ("A", "B")],
        [helper.make_tensor_value_info("C", t, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    (root / name / "1").mkdir(parents=True)
    save(model, str(root / name / "1" / "model.onnx"))
    (root / name / "config.pbtxt").write_text(f'name: "{name}"\n{config}')


def _tensors(kind: str, names: list[str]) -> str:
    return "".join(f'{kind} {{ name: "{n}" data_type: TYPE_FP32 dims: [ 4 ] }}\n' for n in names)


GOOD = "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 2, 8 ] }\n"
REFUSED = {
    "dup_input": (
        "max_batch_size: 8\n" + _tensors("input", ["A", "A", "B"]) + _tensors("output", ["C"]),
        "config input 'A' is declared more than once",
    ),
    "dup_output": (
        "max_batch_size: 8\n" + _tensors("input", ["A", "B"]) + _tensors("output", ["C", "C"]),
        "config output 'C' is declared more than once",
    ),
    "preferred_over_max": (
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 16 ] }\n",
        "model 'preferred_over_max': dynamic_batching preferred_batch_size 16 is not between "
        "1 and max_batch_size 8",
    ),
    "preferred_zero": (
        "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 0 ] }\n",
        "model 'preferred_zero': dynamic_batching preferred_batch_size 0 is not between 1 and "
        "max_batch_size 8",
    ),
    "sequence": (
        "max_batch_size: 8\nsequence_batching { max_sequence_idle_microseconds: 5000000 }\n",
        "model 'sequence': sequence_batching (stateful models): not supported by microtune",
    ),
    "decoupled": (
        "max_batch_size: 8\nmodel_transaction_policy { decoupled: true }\n",
        "model 'decoupled': model_transaction_policy { decoupled: true }: not supported by "
        "microtune",
    ),
}
# Set by Triton configs, changing nothing a client gets here: accepted, named in a warning.
TRITON_EXTRAS = (
    "max_batch_size: 8\n"
    "version_policy { all { } }\n"  # two versions: still one warning
    "dynamic_batching { preferred_batch_size: [ 2, 8 ] }\n"
    'instance_group [ { count: 1 kind: KIND_CPU host_policy: "numa0" } ]\n'
    "optimization { priority: PRIORITY_MAX }\n"
    "response_cache { enable: true }\n"
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    repo = tmp_path_factory.mktemp("refusals") / "models"
    repo.mkdir()
    _add_model(repo, "good", GOOD)
    _add_model(repo, "triton_extras", TRITON_EXTRAS)
    shutil.copytree(repo / "triton_extras" / "1", repo / "triton_extras" / "2")
    for name, (config, _reason) in REFUSED.items():
        _add_model(repo, name, config)
    with running_server(repo, repo.parent / "server") as server:
        yield server


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[Stub]:
    with grpc.insecure_channel(server.url) as channel:
        yield Stub(channel)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_the_model_is_unavailable_with_its_reason(stub: Stub, name: str) -> None:
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
    (entry,) = [m for m in index if m.name == name]
    assert entry.state == "UNAVAILABLE"
    assert REFUSED[name][1] in entry.reason, entry.reason
    assert not stub.ModelReady(pb.ModelReadyRequest(name=name), timeout=10).ready


@pytest.mark.parametrize("name", ["good", "triton_extras"])
def test_the_other_models_serve(stub: Stub, name: str) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    req = pb.ModelInferRequest(model_name=name)
    for name in ("A", "B"):
        req.inputs.add(name=name, datatype="FP32", shape=[2, 4])
        req.raw_input_contents.append(a.tobytes())
    resp = stub.ModelInfer(req, timeout=10)
    got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4)
    np.testing.assert_array_equal(got, a + a)


def test_the_fields_a_triton_config_sets_in_vain_are_named_once(server: Server) -> None:
    warnings = [line for line in server.log().splitlines() if "accepted but ignored" in line]
    assert len(warnings) == 1, warnings
    assert (
        "model triton_extras: config fields accepted but ignored by microtune: "
        "instance_group.host_policy, optimization.priority, response_cache.enable"
    ) in warnings[0]
    assert '"level": "WARNING"' in warnings[0]
