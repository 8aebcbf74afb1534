"""server.model_config: config.pbtxt / config.json -> ModelSpec, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.ipc.dtypes import DTYPES
from server.model_config import ConfigError, parse_config_json, read_model_config
from server.types import DynamicBatching, ModelSpec, TensorSpec, VersionPolicy

SIMPLE_PBTXT = """
name: "simple"
platform: "onnxruntime_onnx"
max_batch_size: 8
version_policy: { latest: { num_versions: 2 } }
input [
  { name: "INPUT0", data_type: TYPE_INT32, dims: [ 16 ] },
  { name: "INPUT1", data_type: TYPE_STRING, dims: [ -1, 3 ] }
]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ 16 ] } ]
dynamic_batching { preferred_batch_size: [ 4, 8 ] max_queue_delay_microseconds: 100 }
default_model_filename: "net.onnx"
parameters { key: "k" value: { string_value: "v" } }
"""


def model_dir(
    tmp_path: Path, name: str = "m", pbtxt: str | None = None, js: str | None = None
) -> Path:
    d = tmp_path / name
    d.mkdir()
    if pbtxt is not None:
        (d / "config.pbtxt").write_text(pbtxt)
    if js is not None:
        (d / "config.json").write_text(js)
    return d


def test_full_pbtxt(tmp_path: Path) -> None:
    spec = read_model_config(model_dir(tmp_path, "simple", SIMPLE_PBTXT))
    assert spec == ModelSpec(
        name="simple",
        max_batch_size=8,
        inputs=(TensorSpec("INPUT0", "INT32", (16,)), TensorSpec("INPUT1", "BYTES", (-1, 3))),
        outputs=(TensorSpec("OUTPUT0", "FP32", (16,)),),
        version_policy=VersionPolicy("latest", num_versions=2),
        dynamic_batching=DynamicBatching((4, 8), 100),
        default_model_filename="net.onnx",
        platform="onnxruntime_onnx",
        parameters={"k": "v"},
        ignored=("parameters.k",),  # (a backend parameter, in Triton)
    )


def test_no_config_file_gives_defaults(tmp_path: Path) -> None:
    spec = read_model_config(model_dir(tmp_path, "plain"))
    assert spec == ModelSpec(name="plain")
    assert spec.version_policy == VersionPolicy("latest", 1)
    assert spec.dynamic_batching is None
    assert spec.default_model_filename == "model.onnx"


@pytest.mark.parametrize(
    "text",
    [
        # json_format accepts both the proto field names and their lowerCamelCase JSON names
        '{"name": "m", "max_batch_size": 4, "version_policy": {"all": {}},'
        ' "input": [{"name": "a", "data_type": "TYPE_STRING", "dims": [-1]}],'
        ' "dynamic_batching": {}}',
        '{"maxBatchSize": 4, "versionPolicy": {"all": {}},'
        ' "input": [{"name": "a", "dataType": "TYPE_STRING", "dims": ["-1"]}],'
        ' "dynamicBatching": {}}',
    ],
    ids=["snake", "camel"],
)
def test_config_json(tmp_path: Path, text: str) -> None:
    want = ModelSpec(
        name="m",
        max_batch_size=4,
        inputs=(TensorSpec("a", "BYTES", (-1,)),),
        version_policy=VersionPolicy("all"),
        dynamic_batching=DynamicBatching((), 0),
    )
    assert read_model_config(model_dir(tmp_path, "m", js=text)) == want
    assert parse_config_json(text, "m") == want


def test_pbtxt_wins_over_json(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m", pbtxt="max_batch_size: 2", js='{"max_batch_size": 3}')
    assert read_model_config(d).max_batch_size == 2


@pytest.mark.parametrize(
    ("policy", "want"),
    [
        ("", VersionPolicy("latest", 1)),
        ("version_policy: { latest: { num_versions: 3 } }", VersionPolicy("latest", 3)),
        ("version_policy: { latest: {} }", VersionPolicy("latest", 1)),  # 0 means 1
        ("version_policy: { all: {} }", VersionPolicy("all")),
        (
            "version_policy: { specific: { versions: [ 3, 1 ] } }",
            VersionPolicy("specific", versions=(3, 1)),
        ),
    ],
    ids=["default", "latest-3", "latest-empty", "all", "specific"],
)
def test_version_policies(tmp_path: Path, policy: str, want: VersionPolicy) -> None:
    assert read_model_config(model_dir(tmp_path, "m", policy)).version_policy == want


@pytest.mark.parametrize("wire", sorted(DTYPES))
def test_every_config_type_maps_to_its_wire_type(tmp_path: Path, wire: str) -> None:
    cfg = DTYPES[wire].config
    text = f'input {{ name: "x" data_type: {cfg} dims: [ 2 ] }}'
    text += f' output {{ name: "y" data_type: {cfg} dims: [ -1 ] }}'
    spec = read_model_config(model_dir(tmp_path, "m", text))
    assert spec.inputs == (TensorSpec("x", wire, (2,)),)
    assert spec.outputs == (TensorSpec("y", wire, (-1,)),)


@pytest.mark.parametrize(
    ("pbtxt", "message"),
    [
        ("max_batch_size: eight", "config of model 'm' does not parse: "),
        ("nonsense_field: 1", "config of model 'm' does not parse: "),
        ('input { name: "x" ', "config of model 'm' does not parse: "),
        ('name: "other"', "config name 'other' differs from its directory 'm'"),
        (
            'platform: "tensorrt_plan"',
            "model 'm': platform 'tensorrt_plan' is not supported "
            "(microtune serves onnxruntime_onnx models)",
        ),
        ('backend: "python"', "model 'm': backend 'python' is not supported"),
        (
            'platform: "onnxruntime_onnx" backend: "pytorch"',
            "model 'm': backend 'pytorch' is not supported",
        ),
        ('platform: "onnxruntime_onnx" backend: "onnxruntime"', None),
        ('backend: "onnxruntime"', None),
        ("max_batch_size: -1", "model 'm': max_batch_size must be >= 0"),
        (
            'input { name: "x" data_type: TYPE_FP32 dims: [ 0 ] }',
            "model 'm': input 'x' has invalid dims [0]",
        ),
        (
            'output { name: "y" data_type: TYPE_FP32 dims: [ 4, -2 ] }',
            "model 'm': output 'y' has invalid dims [4, -2]",
        ),
        (
            'input { name: "x" data_type: TYPE_BF16 dims: [ 1 ] }',
            "model 'm': input 'x' has unsupported type TYPE_BF16",
        ),
        (
            'input { name: "x" dims: [ 1 ] }',
            "model 'm': input 'x' has unsupported type TYPE_INVALID",
        ),
        (
            # proto3 enums are open: text format takes a number outside DataType
            'output { name: "y" data_type: 99 dims: [ 1 ] }',
            "model 'm': output 'y' has unsupported type 99",
        ),
        (
            'input { name: "x" data_type: TYPE_FP32 dims: [ -1 ] reshape { shape: [ -1, 1 ] } }',
            "model 'm': input 'x': reshape [-1, 1] of dims [-1] needs fixed dims (no -1) "
            "holding as many elements",
        ),
        (
            'input { name: "x" data_type: TYPE_FP32 dims: [ 2, 3 ] reshape { shape: [ 5 ] } }',
            "model 'm': input 'x': reshape [5] of dims [2, 3] needs fixed dims (no -1) "
            "holding as many elements",
        ),
        (
            "max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 4, 16 ] }",
            "model 'm': dynamic_batching preferred_batch_size 16 is not between 1 and "
            "max_batch_size 8",
        ),
        (
            "max_batch_size: 8 dynamic_batching { preferred_batch_size: [ -2 ] }",
            "model 'm': dynamic_batching preferred_batch_size -2 is not between 1 and "
            "max_batch_size 8",
        ),
        (
            "dynamic_batching { preferred_batch_size: [ 1 ] }",
            "model 'm': dynamic_batching preferred_batch_size 1 is not between 1 and "
            "max_batch_size 0",
        ),
        ("max_batch_size: 8 dynamic_batching { preferred_batch_size: [ 1, 8 ] }", None),
    ],
    ids=[
        "bad-value",
        "unknown-field",
        "truncated",
        "name-mismatch",
        "platform",
        "backend",
        "platform-and-backend",
        "both-ok",
        "backend-ok",
        "negative-batch",
        "zero-dim",
        "negative-dim",
        "bf16",
        "no-type",
        "type-number",
        "reshape-variable",
        "reshape-count",
        "preferred-over-max",
        "preferred-negative",
        "preferred-without-batching",
        "preferred-ok",
    ],
)
def test_pbtxt_errors(tmp_path: Path, pbtxt: str, message: str | None) -> None:
    if message is None:  # accepted
        assert read_model_config(model_dir(tmp_path, "m", pbtxt)).platform == "onnxruntime_onnx"
        return
    with pytest.raises(ConfigError) as info:
        read_model_config(model_dir(tmp_path, "m", pbtxt))
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "config of model 'm' does not parse: Failed to load JSON"),
        (
            '{"bogus": 1}',
            "config of model 'm' does not parse: Message type \"inference.ModelConfig\"",
        ),
        ('{"max_batch_size": "x"}', "config of model 'm' does not parse: "),
        ('{"name": "n"}', "config name 'n' differs from its directory 'm'"),
        (
            '{"input": [{"name": "a", "data_type": 99, "dims": [1]}]}',
            "model 'm': input 'a' has unsupported type 99",
        ),
        ("[]", "config of model 'm' does not parse: not a JSON object"),  # (was {})
        ("[" * 100_000, "config of model 'm' does not parse"),
    ],
    ids=["syntax", "unknown-field", "bad-value", "name-mismatch", "type-number", "array", "deep"],
)
def test_json_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config_json(text, "m")
    assert str(info.value).startswith(message), str(info.value)
    with pytest.raises(ConfigError) as info:
        read_model_config(model_dir(tmp_path, "m", js=text))
    assert str(info.value).startswith(message), str(info.value)


def test_undecodable_pbtxt_is_a_config_error(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m")
    (d / "config.pbtxt").write_bytes(b'name: "\xff\xfe"')
    with pytest.raises(ConfigError, match="config of model 'm' does not parse"):
        read_model_config(d)


def test_unreadable_config_is_a_config_error(tmp_path: Path) -> None:
    d = model_dir(tmp_path, "m")
    (d / "config.pbtxt").mkdir()  # exists, but cannot be read
    with pytest.raises(ConfigError, match="config of model 'm' does not parse"):
        read_model_config(d)


def test_config_error_is_a_value_error() -> None:
    assert issubclass(ConfigError, ValueError)


def test_demo_configs_parse() -> None:
    from server.settings import DEMO_REPOSITORY

    spec = read_model_config(DEMO_REPOSITORY / "simple_string")
    assert spec.max_batch_size == 8
    assert [(t.name, t.datatype, t.dims) for t in spec.inputs] == [
        ("INPUT0", "BYTES", (16,)),
        ("INPUT1", "BYTES", (16,)),
    ]
    dense = read_model_config(DEMO_REPOSITORY / "dense")
    assert dense.version_policy == VersionPolicy("all")
    large = read_model_config(DEMO_REPOSITORY / "dense_large")
    assert large.dynamic_batching is not None
    assert large.dynamic_batching.max_queue_delay_us == 2000
    assert json.dumps(dict(large.parameters)) is not None


@pytest.mark.parametrize(
    ("groups", "instances"),
    [
        ("", 1),  # none: one batch at a time
        ("instance_group [ { count: 2 kind: KIND_CPU } ]", 2),
        ("instance_group [ { count: 2 }, { kind: KIND_CPU } ]", 3),  # no count = one
    ],
)
def test_instance_groups_set_the_batch_instances(
    tmp_path: Path, groups: str, instances: int
) -> None:
    pbtxt = f"max_batch_size: 8\ndynamic_batching {{ }}\n{groups}\n"
    spec = read_model_config(model_dir(tmp_path, pbtxt=pbtxt))
    assert spec.dynamic_batching == DynamicBatching((), 0, 1024, instances)


@pytest.mark.parametrize(
    ("groups", "instances"),
    [
        ("", 0),  # none: the worker's default (--worker-threads calls at once)
        ("instance_group [ { count: 1 kind: KIND_CPU } ]", 1),
        ("instance_group [ { count: 2 }, { kind: KIND_CPU } ]", 3),
    ],
)
def test_instance_groups_without_batching_set_the_calls_at_once(
    tmp_path: Path, groups: str, instances: int
) -> None:
    """A version without dynamic batching runs that many calls at once, each on a thread of
    its own lane (runtime.lanes), as a Triton model instance runs one request at a time."""
    spec = read_model_config(model_dir(tmp_path, pbtxt=f"max_batch_size: 8\n{groups}\n"))
    assert (spec.dynamic_batching, spec.instances) == (None, instances)


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        ("instance_group [ { count: -1 } ]", "model 'm': instance_group count must be >= 0"),
        ("instance_group [ { count: 65 } ]", "model 'm': 65 instances is more than 64"),
    ],
)
def test_bad_instance_groups(tmp_path: Path, groups: str, message: str) -> None:
    pbtxt = f"max_batch_size: 8\ndynamic_batching {{ }}\n{groups}\n"
    with pytest.raises(ConfigError) as err:
        read_model_config(model_dir(tmp_path, pbtxt=pbtxt))
    assert str(err.value) == message


def test_reshape_is_read(tmp_path: Path) -> None:
    pbtxt = (
        'max_batch_size: 4 input { name: "x" data_type: TYPE_FP32 dims: [ 1 ] '
        'reshape { shape: [ ] } } output { name: "y" data_type: TYPE_FP32 dims: [ 2, 3 ] '
        "reshape { shape: [ 6 ] } }"
    )
    spec = read_model_config(model_dir(tmp_path, "m", pbtxt))
    assert spec.inputs == (TensorSpec("x", "FP32", (1,), ()),)
    assert spec.outputs == (TensorSpec("y", "FP32", (2, 3), (6,)),)


# ----------------------------------------------------------------------------- Triton's fields

# A config written for Triton, setting fields microtune does not act on (each changes nothing
# a client receives). A subset of Triton's ModelConfig refused it as "does not parse".
TRITON_EXTRAS = """
max_batch_size: 8
input [ { name: "A" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [ 4 ] optional: true } ]
output [ { name: "C" data_type: TYPE_FP32 dims: [ 4 ] label_filename: "labels.txt" } ]
instance_group [
  { count: 2 kind: KIND_GPU gpus: [ 0 ] host_policy: "numa0"
    rate_limiter { resources [ { name: "R" count: 1 } ] } },
  { kind: KIND_CPU host_policy: "numa1" }
]
dynamic_batching {
  preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 100 priority_levels: 2
  default_queue_policy { max_queue_size: 5 timeout_action: DELAY }
}
optimization {
  priority: PRIORITY_MAX
  cuda { graphs: true }
  execution_accelerators {
    gpu_execution_accelerator [
      { name: "tensorrt" parameters { key: "precision_mode" value: "FP16" } }
    ]
  }
}
response_cache { enable: true }
model_warmup [ { name: "w" batch_size: 1
  inputs { key: "A" value: { data_type: TYPE_FP32 dims: [ 4 ] zero_data: true } } } ]
model_transaction_policy { decoupled: false }
model_operations { op_library_filename: "libcustom.so" }
model_repository_agents { agents [ { name: "checksum" } ] }
metric_tags { key: "team" value: "search" }
model_metrics { metric_control [ { metric_identifier { family: "nv_inference_queue_duration" } } ] }
cc_model_filenames { key: "8.0" value: "model.onnx" }
parameters [
  { key: "routing" value: { string_value: "{}" } },
  { key: "intra_op_thread_count" value: { string_value: "4" } }
]
"""

IGNORED = (
    "input.format",
    "input.optional",
    "output.label_filename",
    "instance_group.rate_limiter.resources",
    "instance_group.host_policy",
    "cc_model_filenames",
    "metric_tags",
    "dynamic_batching.priority_levels",
    "dynamic_batching.default_queue_policy.timeout_action",
    "optimization.priority",
    "optimization.cuda",
    "optimization.execution_accelerators",
    "parameters.intra_op_thread_count",
    "model_warmup",
    "model_operations.op_library_filename",
    "model_repository_agents.agents",
    "response_cache.enable",
    "model_metrics.metric_control",
)


def test_a_triton_config_loads_and_names_the_fields_it_ignores(tmp_path: Path) -> None:
    spec = read_model_config(model_dir(tmp_path, "m", TRITON_EXTRAS))
    assert spec.ignored == IGNORED
    # What is read is read as before.
    assert spec.dynamic_batching == DynamicBatching((4,), 100, 5, 3)
    assert spec.inputs == (TensorSpec("A", "FP32", (4,)),)
    assert spec.parameters["routing"] == "{}"


def test_the_same_config_as_json_parses_the_same(tmp_path: Path) -> None:
    """Triton's JSON (config.json, RepositoryModelLoad's `config`): field numbers and names
    are Triton's, so JSON written from Triton's message parses to the same spec."""
    from google.protobuf import json_format, text_format

    from server._proto.inference import grpc_service_pb2 as pb

    msg = text_format.Parse(TRITON_EXTRAS, pb.ModelConfig())
    text = json_format.MessageToJson(msg)  # lowerCamelCase, as Triton writes it
    assert "responseCache" in text
    assert parse_config_json(text, "m") == read_model_config(
        model_dir(tmp_path, "m", TRITON_EXTRAS)
    )


def test_a_config_with_only_read_fields_ignores_nothing(tmp_path: Path) -> None:
    only_read = SIMPLE_PBTXT.replace('parameters { key: "k" value: { string_value: "v" } }', "")
    assert read_model_config(model_dir(tmp_path, "simple", only_read)).ignored == ()
    # Defaults said out loud change nothing either.
    pbtxt = "model_transaction_policy { decoupled: false } response_cache { enable: false }"
    assert read_model_config(model_dir(tmp_path, "m", pbtxt)).ignored == ()


@pytest.mark.parametrize(
    ("pbtxt", "feature"),
    [
        (
            "max_batch_size: 8 sequence_batching { max_sequence_idle_microseconds: 5000000 "
            'control_input [ { name: "START" control [ { kind: CONTROL_SEQUENCE_START '
            "int32_false_true: [ 0, 1 ] } ] } ] oldest { max_candidate_sequences: 4 } }",
            "sequence_batching (stateful models)",
        ),
        ("sequence_batching { }", "sequence_batching (stateful models)"),
        (
            'ensemble_scheduling { step [ { model_name: "a" model_version: -1 '
            'input_map { key: "x" value: "y" } } ] }',
            "ensemble_scheduling (ensembles)",
        ),
        (
            "model_transaction_policy { decoupled: true }",
            "model_transaction_policy { decoupled: true }",
        ),
        (
            'batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: "N" data_type: TYPE_FP32 '
            'source_input: "A" } ]',
            "batch_input",
        ),
        ('batch_output [ { target_name: "C" source_input: "A" } ]', "batch_output"),
    ],
    ids=["sequence", "sequence-empty", "ensemble", "decoupled", "batch-input", "batch-output"],
)
def test_triton_features_that_would_change_the_answers_are_refused(
    tmp_path: Path, pbtxt: str, feature: str
) -> None:
    with pytest.raises(ConfigError) as info:
        read_model_config(model_dir(tmp_path, "m", pbtxt))
    assert str(info.value) == f"model 'm': {feature}: not supported by microtune"


def test_a_json_typo_is_one_line(tmp_path: Path) -> None:
    """(json_format's error goes on with every field name of the message.)"""
    with pytest.raises(ConfigError) as info:
        parse_config_json('{"respons_cache": {}}', "m")
    assert str(info.value) == (
        "config of model 'm' does not parse: Message type \"inference.ModelConfig\" has no "
        'field named "respons_cache" at "ModelConfig".'
    )
