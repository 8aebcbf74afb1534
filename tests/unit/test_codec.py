"""server.rpc.codec: protobuf <-> domain conversion (no gRPC, no worker).

Never import tritonclient here: it registers the same protobuf names as server._proto.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.ipc.dtypes import DTYPES, decode_bytes_tensor, encode_bytes_tensor
from runtime.ipc.protocol import ModelSignature, TensorInfo, Timings
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.handler import ModelView, StatsRow
from server.rpc.codec import (
    decode_infer,
    decode_parameters,
    encode_config,
    encode_index,
    encode_infer,
    encode_metadata,
    encode_statistics,
)
from server.stats import VersionStats
from server.types import (
    DynamicBatching,
    InferResponse,
    ModelIndexEntry,
    ModelSpec,
    ShmRef,
    Tensor,
    TensorSpec,
    VersionPolicy,
)

FIXED = sorted(w for w in DTYPES if w != "BYTES")
TYPED = sorted(w for w in DTYPES if DTYPES[w].contents_field is not None)

SAMPLES: dict[str, list[object]] = {
    "BOOL": [True, False, True, True, False, False],
    "UINT8": [0, 1, 2, 127, 128, 255],
    "UINT16": [0, 1, 65535, 300, 4, 5],
    "UINT32": [0, 1, 2**32 - 1, 7, 8, 9],
    "UINT64": [0, 1, 2**64 - 1, 2**40, 8, 9],
    "INT8": [-128, -1, 0, 1, 127, 5],
    "INT16": [-32768, -1, 0, 1, 32767, 5],
    "INT32": [-(2**31), -1, 0, 1, 2**31 - 1, 5],
    "INT64": [-(2**63), -1, 0, 1, 2**63 - 1, 5],
    "FP16": [0.5, -1.0, 2.0, 0.0, 65504.0, -0.25],
    "FP32": [0.5, -1.0, 2.0, 0.0, 3.25, -0.125],
    "FP64": [0.1, -1e300, 2.0, 0.0, 3.25, -0.125],
    "BYTES": [b"", b"a", b"\x00\xff", "ünï".encode(), b"x" * 100, b"end"],
}


def request(model: str = "simple", **kw: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name=model, **kw)  # type: ignore[arg-type]


def raw_of(wire: str, values: list[object]) -> bytes:
    if wire == "BYTES":
        return encode_bytes_tensor(values)  # type: ignore[arg-type]
    return np.array(values, dtype=DTYPES[wire].numpy).tobytes()


# ----------------------------------------------------------------------------- decode: data


@pytest.mark.parametrize("wire", sorted(DTYPES))
def test_decode_raw_contents(wire: str) -> None:
    raw = raw_of(wire, SAMPLES[wire])
    r = request(model_version="2", id="req-7")
    r.inputs.add(name="INPUT0", datatype=wire, shape=[2, 3])
    r.raw_input_contents.append(raw)
    out = decode_infer(r)
    assert out.model == "simple" and out.version == "2" and out.id == "req-7"
    assert out.inputs == (Tensor("INPUT0", wire, (2, 3), raw),)
    assert out.outputs == ()
    assert out.parameters == {}


@pytest.mark.parametrize("wire", TYPED)
def test_decode_typed_contents(wire: str) -> None:
    d = DTYPES[wire]
    assert d.contents_field is not None
    r = request()
    i = r.inputs.add(name="INPUT0", datatype=wire, shape=[3, 2])
    getattr(i.contents, d.contents_field).extend(SAMPLES[wire])
    (t,) = decode_infer(r).inputs
    assert (t.name, t.datatype, t.shape) == ("INPUT0", wire, (3, 2))
    assert bytes(t.data) == raw_of(wire, SAMPLES[wire])
    if wire == "BYTES":
        assert decode_bytes_tensor(t.data, 6) == SAMPLES["BYTES"]
    else:
        np.testing.assert_array_equal(
            np.frombuffer(t.data, dtype=d.numpy), np.array(SAMPLES[wire], dtype=d.numpy)
        )


@pytest.mark.parametrize("wire", ["FP32", "FP64"])
def test_large_float_contents_keep_every_value(wire: str) -> None:
    """FP32 / FP64 contents are read as the serialized field's bytes (no Python float per
    value: a 48 MB tensor held the event loop for seconds). Every value exactly, the
    parsed message's as much as a fresh one's, and a length of 128+ (a multi-byte varint)."""
    values = np.random.default_rng(3).standard_normal(300_001).astype(DTYPES[wire].numpy)
    values[:3] = [np.inf, -0.0, np.nan]
    r = request()
    i = r.inputs.add(name="INPUT0", datatype=wire, shape=[len(values)])
    getattr(i.contents, DTYPES[wire].contents_field).extend(values.tolist())
    for message in (r, pb.ModelInferRequest.FromString(r.SerializeToString())):
        (t,) = decode_infer(message).inputs
        assert bytes(t.data) == values.tobytes()


def test_float_contents_beside_other_fields_take_the_checked_path() -> None:
    """Contents holding another field too are read value by value, as before."""
    r = request()
    i = r.inputs.add(name="INPUT0", datatype="FP32", shape=[2])
    i.contents.fp32_contents.extend([1.0, 2.0])
    i.contents.int_contents.append(7)
    (t,) = decode_infer(r).inputs
    assert bytes(t.data) == np.array([1.0, 2.0], np.float32).tobytes()
    short = request()
    short.inputs.add(name="INPUT0", datatype="FP32", shape=[3]).contents.fp32_contents.extend(
        [1.0, 2.0]
    )
    with pytest.raises(InvalidInput, match=r"has 2 values in contents\.fp32_contents"):
        decode_infer(short)


def test_decode_several_inputs_keeps_request_order_and_outputs() -> None:
    r = request(id="x")
    r.inputs.add(name="B", datatype="INT32", shape=[1]).contents.int_contents.append(7)
    r.inputs.add(name="A", datatype="FP32", shape=[1]).contents.fp32_contents.append(1.5)
    r.outputs.add(name="OUT1")
    r.outputs.add(name="OUT0")
    out = decode_infer(r)
    assert [t.name for t in out.inputs] == ["B", "A"]
    assert out.outputs == ("OUT1", "OUT0")


@pytest.mark.parametrize("shape", [[0], [2, 0], []])
def test_decode_empty_and_scalar_raw(shape: list[int]) -> None:
    count = int(np.prod(shape))
    r = request()
    r.inputs.add(name="x", datatype="FP32", shape=shape)
    r.raw_input_contents.append(bytes(4 * count))
    (t,) = decode_infer(r).inputs
    assert t.shape == tuple(shape) and len(t.data) == 4 * count


# ----------------------------------------------------------------------------- decode: errors


def _raw(wire: str, shape: list[int], data: bytes, model: str = "simple") -> pb.ModelInferRequest:
    r = request(model)
    r.inputs.add(name="INPUT0", datatype=wire, shape=shape)
    r.raw_input_contents.append(data)
    return r


def _typed(wire: str, shape: list[int], field: str, values: list[object]) -> pb.ModelInferRequest:
    r = request()
    i = r.inputs.add(name="INPUT0", datatype=wire, shape=shape)
    getattr(i.contents, field).extend(values)
    return r


def _mixed() -> pb.ModelInferRequest:
    r = request()
    r.inputs.add(name="INPUT0", datatype="INT32", shape=[1]).contents.int_contents.append(1)
    r.inputs.add(name="INPUT1", datatype="INT32", shape=[1])
    r.raw_input_contents.extend([b"\x00" * 4, b"\x00" * 4])
    return r


def _raw_count() -> pb.ModelInferRequest:
    r = request()
    r.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    r.inputs.add(name="INPUT1", datatype="INT32", shape=[1])
    r.raw_input_contents.append(b"\x00" * 4)
    return r


def _no_data() -> pb.ModelInferRequest:
    r = request()
    r.inputs.add(name="INPUT0", datatype="INT32", shape=[1])
    return r


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: request(""), "model_name is required"),
        (
            _mixed,
            "contents field must not be specified when using raw_input_contents for 'INPUT0' "
            "for model 'simple'",
        ),
        (_raw_count, "request has 1 raw_input_contents entries for 2 inputs that carry data"),
        (
            lambda: _raw("INT32", [2, 2], b"\x00" * 12),
            "input 'INPUT0' has 12 bytes of raw content but shape [2, 2] of INT32 needs 16",
        ),
        (
            lambda: _raw("FP64", [3], b"\x00" * 25),
            "input 'INPUT0' has 25 bytes of raw content but shape [3] of FP64 needs 24",
        ),
        (
            lambda: _raw("BYTES", [2], encode_bytes_tensor([b"a"])),
            "input 'INPUT0' has malformed BYTES content: holds 1 elements but the shape needs 2",
        ),
        (
            lambda: _raw("BYTES", [1], b"\x09\x00\x00\x00abc"),
            "input 'INPUT0' has malformed BYTES content: element 0 claims 9 bytes but 3 remain",
        ),
        (
            lambda: _raw("BYTES", [1], b"\x01\x00"),
            "input 'INPUT0' has malformed BYTES content: truncated length prefix at byte 0",
        ),
        (
            lambda: _raw("INT32", [-1, 16], b""),
            "input 'INPUT0' has a negative dimension in shape [-1, 16]",
        ),
        (
            lambda: _raw("INT32", [1] * 65, b"\0" * 4),
            "input 'INPUT0' has 65 dimensions, more than a tensor may have (64)",
        ),
        (
            lambda: _raw("INT32", [0] * 2_000_000, b""),
            "input 'INPUT0' has 2000000 dimensions, more than a tensor may have (64)",
        ),
        (
            lambda: _typed("INT32", [2, -2], "int_contents", [1, 2, 3, 4]),
            "input 'INPUT0' has a negative dimension in shape [2, -2]",
        ),
        (
            lambda: _raw("FLOAT32", [1], b"\x00" * 4),
            "input 'INPUT0' has unknown datatype 'FLOAT32'",
        ),
        (lambda: _raw("", [1], b"\x00" * 4), "input 'INPUT0' has unknown datatype ''"),
        (lambda: _raw("fp32", [1], b"\x00" * 4), "input 'INPUT0' has unknown datatype 'fp32'"),
        (
            lambda: _typed("FP16", [2], "fp32_contents", [1.0, 2.0]),
            "input 'INPUT0': FP16 data can only be sent as raw content",
        ),
        (_no_data, "input 'INPUT0' has no data (neither contents nor raw content)"),
        (
            lambda: _typed("INT32", [2, 2], "int_contents", [1, 2, 3]),
            "input 'INPUT0' has 3 values in contents.int_contents but shape [2, 2] needs 4",
        ),
        (
            # values in another field than the datatype's do not count
            lambda: _typed("INT64", [2], "int_contents", [1, 2]),
            "input 'INPUT0' has 0 values in contents.int64_contents but shape [2] needs 2",
        ),
        (
            lambda: _typed("INT8", [2], "int_contents", [1, 200]),
            "input 'INPUT0' has values out of range for INT8",
        ),
        (
            lambda: _typed("INT8", [2], "int_contents", [-129, 0]),
            "input 'INPUT0' has values out of range for INT8",
        ),
        (
            lambda: _typed("INT16", [1], "int_contents", [40000]),
            "input 'INPUT0' has values out of range for INT16",
        ),
        (
            lambda: _typed("UINT8", [1], "uint_contents", [256]),
            "input 'INPUT0' has values out of range for UINT8",
        ),
        (
            lambda: _typed("UINT16", [1], "uint_contents", [70000]),
            "input 'INPUT0' has values out of range for UINT16",
        ),
    ],
    ids=[
        "no-model",
        "contents-and-raw",
        "raw-count",
        "raw-bytes-int32",
        "raw-bytes-fp64",
        "bytes-count",
        "bytes-length",
        "bytes-prefix",
        "negative-dim-raw",
        "rank-65",
        "rank-millions",
        "negative-dim-typed",
        "unknown-datatype",
        "empty-datatype",
        "lowercase-datatype",
        "fp16-typed",
        "no-data",
        "typed-count",
        "typed-wrong-field",
        "int8-over",
        "int8-under",
        "int16-over",
        "uint8-over",
        "uint16-over",
    ],
)
def test_decode_errors(build: object, message: str) -> None:
    r = build()  # type: ignore[operator]
    with pytest.raises(InvalidInput) as info:
        decode_infer(r)
    assert info.value.message == message


@pytest.mark.parametrize(("wire", "lo", "hi"), [("INT8", -128, 127), ("UINT8", 0, 255)])
def test_typed_range_bounds_are_accepted(wire: str, lo: int, hi: int) -> None:
    field = DTYPES[wire].contents_field
    assert field is not None
    (t,) = decode_infer(_typed(wire, [2], field, [lo, hi])).inputs
    assert np.frombuffer(t.data, dtype=DTYPES[wire].numpy).tolist() == [lo, hi]


# ----------------------------------------------------------------------------- parameters


def test_decode_parameters() -> None:
    r = request()
    r.parameters["b"].bool_param = True
    r.parameters["i"].int64_param = -5
    r.parameters["s"].string_param = "text"
    r.parameters["d"].double_param = 0.5
    r.parameters["u"].uint64_param = 2**64 - 1
    r.parameters["empty"].SetInParent()  # no choice made: left out
    r.parameters["f"].bool_param = False
    assert decode_infer(r).parameters == {
        "b": True,
        "i": -5,
        "s": "text",
        "d": 0.5,
        "u": 2**64 - 1,
        "f": False,
    }
    assert decode_parameters({}) == {}
    assert type(decode_parameters(r.parameters)["f"]) is bool


@pytest.mark.parametrize(
    ("key", "field", "value", "message"),
    [
        ("priority", "string_param", "high",
         "invalid value type for 'priority' parameter, expected int64_param or uint64_param."),
        ("priority", "int64_param", -1, "invalid value for 'priority', expected value >= 0."),
        ("timeout", "string_param", "x",
         "invalid value type for 'timeout' parameter, expected int64_param."),
        ("sequence_start", "string_param", "yes",
         "invalid value type for 'sequence_start' parameter, expected bool_param."),
        ("sequence_id", "double_param", 1.5,
         "invalid value type for 'sequence_id' parameter, expected int64_param or string_param."),
        ("triton_foo", "bool_param", True,
         "parameter keys starting with 'triton_' are reserved for Triton usage. Only the "
         "following keys starting with 'triton_' are allowed: "
         "triton_enable_empty_final_response"),
        ("triton_enable_empty_final_response", "int64_param", 1,
         "invalid value type for 'triton_enable_empty_final_response' parameter, expected "
         "bool_param."),
    ],
)  # fmt: skip
def test_parameters_triton_gives_a_meaning_are_checked_as_triton_does(
    key: str, field: str, value: object, message: str
) -> None:
    """(They were taken whatever their type.) Triton's own words."""
    r = request()
    setattr(r.parameters[key], field, value)
    with pytest.raises(InvalidInput) as info:
        decode_infer(r)
    assert info.value.message == message


def test_parameters_triton_gives_a_meaning_pass_when_well_typed() -> None:
    r = request()
    r.parameters["priority"].uint64_param = 2**64 - 1
    r.parameters["timeout"].int64_param = 1000
    r.parameters["sequence_id"].string_param = "s-1"
    r.parameters["sequence_end"].bool_param = True
    r.parameters["triton_enable_empty_final_response"].bool_param = True
    assert decode_infer(r).parameters["timeout"] == 1000


# ----------------------------------------------------------------------------- encode_infer


def test_encode_infer_keeps_output_order_and_raw_contents() -> None:
    out1 = np.arange(6, dtype=np.float32).reshape(2, 3)
    text = encode_bytes_tensor([b"a", b"bc"])
    res = InferResponse(
        model="simple",
        version="3",
        id="req-9",
        outputs=(
            Tensor("OUTPUT1", "FP32", (2, 3), out1.tobytes()),
            Tensor("OUTPUT0", "BYTES", (2,), memoryview(text)),
            Tensor("EMPTY", "INT8", (0,), b""),
        ),
    )
    msg = encode_infer(res)
    assert (msg.model_name, msg.model_version, msg.id) == ("simple", "3", "req-9")
    assert [(o.name, o.datatype, list(o.shape)) for o in msg.outputs] == [
        ("OUTPUT1", "FP32", [2, 3]),
        ("OUTPUT0", "BYTES", [2]),
        ("EMPTY", "INT8", [0]),
    ]
    assert list(msg.raw_output_contents) == [out1.tobytes(), text, b""]
    assert not any(o.HasField("contents") for o in msg.outputs)
    # survives the wire
    back = pb.ModelInferResponse.FromString(msg.SerializeToString())
    assert back == msg


# ----------------------------------------------------------------------------- metadata / config


SIG = ModelSignature(
    inputs=(TensorInfo("INPUT0", "INT32", (-1, 16)), TensorInfo("TEXT", "BYTES", (-1, -1))),
    outputs=(TensorInfo("OUTPUT0", "FP16", (-1, 16)),),
)


def view(spec: ModelSpec, sig: ModelSignature = SIG, instances: int = 1) -> ModelView:
    return ModelView(spec.name, 2, (1, 2), spec, sig, instances)


def test_encode_metadata_has_full_shapes() -> None:
    msg = encode_metadata(view(ModelSpec(name="simple", max_batch_size=8)))
    assert msg.name == "simple"
    assert list(msg.versions) == ["1", "2"]
    assert msg.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.inputs] == [
        ("INPUT0", "INT32", [-1, 16]),
        ("TEXT", "BYTES", [-1, -1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in msg.outputs] == [
        ("OUTPUT0", "FP16", [-1, 16])
    ]


def test_encode_config_drops_the_batch_dim() -> None:
    spec = ModelSpec(
        name="simple",
        max_batch_size=8,
        inputs=(TensorSpec("INPUT0", "INT32", (16,)),),
        dynamic_batching=DynamicBatching((4, 8), 100, max_queue_size=50, instances=3),
        default_model_filename="net.onnx",
        parameters={"k": "v"},
    )
    cfg = encode_config(view(spec, instances=3)).config
    assert cfg.name == "simple"
    assert cfg.platform == "onnxruntime_onnx"
    assert cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 8
    assert cfg.default_model_filename == "net.onnx"
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [
        ("INPUT0", pb.TYPE_INT32, [16]),
        ("TEXT", pb.TYPE_STRING, [-1]),
    ]
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.output] == [
        ("OUTPUT0", pb.TYPE_FP16, [16])
    ]
    assert cfg.version_policy.WhichOneof("policy_choice") == "latest"
    assert cfg.version_policy.latest.num_versions == 1
    assert list(cfg.dynamic_batching.preferred_batch_size) == [4, 8]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 100
    # (the queue bound and the instance count in force: they were left out, and 1)
    assert cfg.dynamic_batching.default_queue_policy.max_queue_size == 50
    assert cfg.parameters["k"].string_value == "v"
    assert [(g.name, g.count, g.kind) for g in cfg.instance_group] == [
        ("simple", 3, pb.ModelInstanceGroup.KIND_CPU)
    ]


def test_encode_config_without_batching_keeps_every_dim() -> None:
    sig = ModelSignature((TensorInfo("x", "FP32", (-1,)),), (TensorInfo("y", "FP32", (-1,)),))
    cfg = encode_config(view(ModelSpec(name="identity_fp32"), sig, instances=2)).config
    assert cfg.max_batch_size == 0
    assert list(cfg.input[0].dims) == [-1]
    assert list(cfg.output[0].dims) == [-1]
    assert not cfg.HasField("dynamic_batching")
    # (the calls of the version that run at once: --worker-threads' 2 without instance_group)
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, pb.ModelInstanceGroup.KIND_CPU)]


@pytest.mark.parametrize(
    ("policy", "which", "check"),
    [
        (VersionPolicy("all"), "all", lambda vp: True),
        (
            VersionPolicy("specific", versions=(1, 3)),
            "specific",
            lambda vp: list(vp.specific.versions) == [1, 3],
        ),
        (VersionPolicy("latest", 2), "latest", lambda vp: vp.latest.num_versions == 2),
    ],
    ids=["all", "specific", "latest"],
)
def test_encode_config_version_policy(policy: VersionPolicy, which: str, check: object) -> None:
    cfg = encode_config(view(ModelSpec(name="m", version_policy=policy))).config
    assert cfg.version_policy.WhichOneof("policy_choice") == which
    assert check(cfg.version_policy)  # type: ignore[operator]


@pytest.mark.parametrize("wire", sorted(DTYPES))
def test_encode_config_data_types(wire: str) -> None:
    sig = ModelSignature((TensorInfo("x", wire, (2,)),), ())
    cfg = encode_config(view(ModelSpec(name="m"), sig)).config
    assert pb.DataType.Name(cfg.input[0].data_type) == DTYPES[wire].config


# ----------------------------------------------------------------------------- statistics / index


def test_encode_statistics() -> None:
    s = VersionStats()
    s.record_success(1000, Timings(10, 20, 30, 40, batch_size=4), batch_size=4)
    s.record_success(3000, Timings(1, 2, 3, 4, batch_size=1), batch_size=1)
    s.record_failure(500)
    empty = VersionStats()
    msg = encode_statistics([StatsRow("dense", 2, s), StatsRow("simple", 1, empty)])
    assert [(m.name, m.version) for m in msg.model_stats] == [("dense", "2"), ("simple", "1")]
    m = msg.model_stats[0]
    assert m.inference_count == 5
    assert m.execution_count == 2
    assert m.last_inference == s.last_inference_ms > 0
    st = m.inference_stats
    assert (st.success.count, st.success.ns) == (2, 4000)
    assert (st.fail.count, st.fail.ns) == (1, 500)
    assert (st.queue.count, st.queue.ns) == (2, 11)
    assert (st.compute_input.count, st.compute_input.ns) == (2, 22)
    assert (st.compute_infer.count, st.compute_infer.ns) == (2, 33)
    assert (st.compute_output.count, st.compute_output.ns) == (2, 44)
    assert [b.batch_size for b in m.batch_stats] == [1, 4]  # sorted
    b4 = m.batch_stats[1]
    assert (b4.compute_input.count, b4.compute_input.ns) == (1, 20)
    assert (b4.compute_infer.count, b4.compute_infer.ns) == (1, 30)
    assert (b4.compute_output.count, b4.compute_output.ns) == (1, 40)
    e = msg.model_stats[1]
    assert (e.inference_count, e.execution_count, e.last_inference) == (0, 0, 0)
    assert len(e.batch_stats) == 0
    assert encode_statistics([]) == pb.ModelStatisticsResponse()


def test_encode_index() -> None:
    msg = encode_index(
        [
            ModelIndexEntry("a", "1", "READY", ""),
            ModelIndexEntry("b", "", "UNAVAILABLE", "bad config"),
        ]
    )
    assert [(m.name, m.version, m.state, m.reason) for m in msg.models] == [
        ("a", "1", "READY", ""),
        ("b", "", "UNAVAILABLE", "bad config"),
    ]


def test_outputs_in_shared_memory_keep_an_empty_raw_entry_each() -> None:
    # perf_analyzer's C++ client indexes raw_output_contents by output position and crashes
    # (SIGSEGV) when an output written to shared memory has no entry.
    res = InferResponse(
        "simple",
        "1",
        "",
        (
            Tensor("OUTPUT0", "INT32", (1, 16), b"", ShmRef("out", 0, 64)),
            Tensor("OUTPUT1", "INT32", (1, 16), b"\x01" * 64),
        ),
    )
    msg = encode_infer(res)
    assert list(msg.raw_output_contents) == [b"", b"\x01" * 64]
    assert msg.outputs[0].parameters["shared_memory_region"].string_param == "out"
