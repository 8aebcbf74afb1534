"""Property test of model control: RepositoryModelLoad and RepositoryModelUnload with arbitrary
names, config overrides (a model's real config, mutated, or no JSON at all) and
`file:<version>/<name>` contents, on a server in explicit mode.

Every answer must be OK, or the refusal Triton gives (INVALID_ARGUMENT for a malformed call,
NOT_FOUND, INTERNAL "failed to load ..." naming the model), never the "internal error (id ...)"
of an unexpected exception. `simple`, which the test never touches, must still add after each
example; at the end the worker is the one the server started with and its log holds no
traceback, and a plain load brings every touched model back to its repository's config.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import DEMO, Server, assert_still_serving, build_repository, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc

Code = grpc.StatusCode
Stub = service_pb2_grpc.GRPCInferenceServiceStub
TOUCHED = ("id_fp32", "id_bytes", "dense", "identity_fp32", "simple_identity")
NAMES = st.one_of(  # half of them the models the test may touch
    st.sampled_from(TOUCHED),
    st.sampled_from(["no_such_model", "", "bad_corrupt", "simple/1"]),
    st.text(max_size=8),
    st.sampled_from(TOUCHED),
)


@pytest.fixture(scope="module")
def control(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Server, Stub, dict[str, Any]]]:
    # A repository of its own: the other modules' shared one must not see these loads.
    root = tmp_path_factory.mktemp("control")
    repo = build_repository(root / "models")
    args = ("--model-control-mode", "explicit", "--load-model", ",".join(("simple", *TOUCHED)))
    with running_server(repo, root / "server", args) as s, grpc.insecure_channel(s.url) as ch:
        stub = Stub(ch)
        configs = {m: config_json(stub, m) for m in TOUCHED}
        worker = s.worker_pid()
        yield s, stub, configs
        for m in TOUCHED:  # back to the repository's config
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=m), timeout=60)
            assert stub.ModelReady(pb.ModelReadyRequest(name=m), timeout=10).ready, m
            assert config_json(stub, m) == configs[m], m
        assert s.worker_pid() == worker
        log = s.log()
        assert "Traceback" not in log and "internal error" not in log, log[-6000:]


def config_json(stub: Stub, model: str) -> dict[str, Any]:
    """The model's config as Triton's JSON (what tritonclient's load_model(config=...) sends)."""
    from google.protobuf import json_format

    cfg = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    return json_format.MessageToDict(cfg, preserving_proto_field_name=True)


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(1 << 40), 1 << 40), st.text(max_size=6)),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
FIELDS = ["name", "platform", "max_batch_size", "input", "output", "instance_group",
          "dynamic_batching", "version_policy", "parameters", "backend"]  # fmt: skip


@st.composite
def overrides(draw: st.DrawFn, configs: dict[str, Any], model: str) -> str | None:
    """No override, text that is no config, or the model's config with fields changed."""
    kind = draw(st.sampled_from(["none", "text", "config"]))
    if kind == "none":
        return None
    if kind == "text":
        return draw(st.one_of(st.text(max_size=20), st.sampled_from(["{", "[]", "null", "1"])))
    cfg = json.loads(json.dumps(configs.get(model, configs["id_fp32"])))  # a deep copy
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.sampled_from(FIELDS))
        if draw(st.booleans()) and key in cfg:
            del cfg[key]
        elif key == "max_batch_size":
            cfg[key] = draw(st.sampled_from([0, 1, 8, -1, 1 << 31, "8"]))
        elif key in ("input", "output") and cfg.get(key):
            tensor = cfg[key][0]
            field = draw(st.sampled_from(["dims", "data_type", "name"]))
            tensor[field] = draw(
                st.sampled_from(
                    {
                        "dims": [[], [-1], [0], [4, 4], [1 << 40], ["x"]],
                        "data_type": ["TYPE_FP16", "TYPE_STRING", "TYPE_NOPE", 3, ""],
                        "name": ["", "IN", "OTHER", "OUT"],
                    }[field]
                )
            )
        elif key == "instance_group":
            cfg[key] = [{"count": draw(st.sampled_from([0, 1, 2, 65, -1])), "kind": "KIND_CPU"}]
        elif key == "dynamic_batching":
            cfg[key] = {
                "max_queue_delay_microseconds": draw(st.sampled_from([0, 100, -5, 1 << 40])),
                "preferred_batch_size": draw(st.sampled_from([[], [2], [0], [1000]])),
            }
        else:
            cfg[key] = draw(JSON_VALUES)
    return json.dumps(cfg)


FILE_KEYS = ["file:1/model.onnx", "file:2/model.onnx", "file:0/model.onnx", "file:1/../x",
             "file:1/a/b", "file:model.onnx", "file:1/" + "x" * 200]  # fmt: skip


MODEL = (DEMO / "simple_identity" / "1" / "model.onnx").read_bytes()  # a valid model file


@st.composite
def files(draw: st.DrawFn) -> dict[str, bytes]:
    """No files, or model files that are valid, truncated or noise, under good and bad names."""
    out: dict[str, bytes] = {}
    for _ in range(draw(st.integers(0, 2))):
        key = draw(st.sampled_from(FILE_KEYS))
        out[key] = draw(st.sampled_from([MODEL, MODEL[: len(MODEL) // 2], b"", b"\x08\x07noise"]))
    return out


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_any_load_or_unload_is_done_or_refused_with_a_reason(
    control: tuple[Server, Stub, dict[str, Any]], data: st.DataObject
) -> None:
    _server, stub, configs = control
    name = data.draw(NAMES)
    try:
        if data.draw(st.integers(0, 4)) == 0:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name=name), timeout=60)
        else:
            req = pb.RepositoryModelLoadRequest(model_name=name)
            config = data.draw(overrides(configs, name))
            if config is not None:
                req.parameters["config"].string_param = config
            for key, body in data.draw(files()).items():
                req.parameters[key].bytes_param = body
            if data.draw(st.integers(0, 9)) == 0:  # a parameter of the wrong kind
                req.parameters["config"].bool_param = True
            stub.RepositoryModelLoad(req, timeout=60)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert details and "internal error" not in details, (code, details)
        if code == Code.INTERNAL:  # a load that failed, as Triton words it
            assert details.startswith("failed to load"), details
        else:
            assert code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND), (code, details)
    assert_still_serving(stub)


@pytest.mark.parametrize("name", ["../escaped", "/tmp/microtune-escaped", "a/../../escaped", "."])
def test_a_model_name_cannot_lead_out_of_the_repository(
    control: tuple[Server, Stub, dict[str, Any]], tmp_path: Path, name: str
) -> None:
    """RepositoryModelLoad joined the name to paths unchecked: "../x" loaded a model from
    outside the repository, and with file: parameters an absolute name wrote the files
    anywhere the server could (Triton's CVE-2023-31036)."""
    _server, stub, configs = control
    req = pb.RepositoryModelLoadRequest(model_name=name)
    req.parameters["config"].string_param = json.dumps(configs["dense"])
    req.parameters["file:1/model.onnx"].bytes_param = b"not a model"
    with pytest.raises(grpc.RpcError) as ei:
        stub.RepositoryModelLoad(req, timeout=30)
    assert ei.value.code() == Code.INVALID_ARGUMENT, ei.value.details()
    assert ei.value.details() == (
        f"'{name}' is not a model name: a model is a directory of the repository, "
        "named without '/', '\\' or a leading '.'"
    )
    assert not Path("/tmp/microtune-escaped").exists()
    assert_still_serving(stub)


@pytest.mark.parametrize(
    ("name", "key", "message"),
    [
        ("dense", "file:1/..", "invalid file parameter 'file:1/..'"),
        ("dense", "file:1/.", "invalid file parameter 'file:1/.'"),
        ("m" * 256, "file:1/model.onnx", "a directory's name has at most 255 bytes"),
    ],
    ids=["dot-dot", "dot", "long-name"],
)
def test_an_upload_the_file_system_cannot_take_is_refused_as_such(
    control: tuple[Server, Stub, dict[str, Any]], name: str, key: str, message: str
) -> None:
    """(A file named ".." failed writing, and a model name past 255 bytes failed in the file
    system: INTERNAL "internal error", with a traceback in the log.)"""
    _server, stub, configs = control
    req = pb.RepositoryModelLoadRequest(model_name=name)
    req.parameters["config"].string_param = json.dumps(dict(configs["dense"], name=name))
    req.parameters[key].bytes_param = b"not a model"
    with pytest.raises(grpc.RpcError) as ei:
        stub.RepositoryModelLoad(req, timeout=30)
    assert ei.value.code() in (Code.INVALID_ARGUMENT, Code.INTERNAL), ei.value.details()
    details = ei.value.details() or ""
    assert message in details and "internal error" not in details, details
    assert_still_serving(stub)


def test_default_model_filename_cannot_lead_out_of_the_version(
    control: tuple[Server, Stub, dict[str, Any]],
) -> None:
    _server, stub, configs = control
    ready = stub.ModelReady(pb.ModelReadyRequest(name="dense"), timeout=10).ready
    config = dict(configs["dense"], default_model_filename="../../simple/1/model.onnx")
    req = pb.RepositoryModelLoadRequest(model_name="dense")
    req.parameters["config"].string_param = json.dumps(config)
    with pytest.raises(grpc.RpcError) as ei:
        stub.RepositoryModelLoad(req, timeout=30)
    assert ei.value.code() == Code.INTERNAL, ei.value.details()
    assert ei.value.details() == (
        "failed to load 'dense', failed to poll from model repository: invalid config "
        "override: model 'dense': default_model_filename '../../simple/1/model.onnx' is not "
        "a file name"
    )
    assert stub.ModelReady(pb.ModelReadyRequest(name="dense"), timeout=10).ready == ready
