"""Reads a model's config file into a ModelSpec.

The format is Triton's: `config.pbtxt` (protobuf text) or `config.json` (the same message as
JSON, which is also what RepositoryModelLoad's `config` parameter carries), restricted to the
fields microtune uses. Everything is optional: inputs and outputs left out are read from the
ONNX graph by the worker. See docs/model-repository.md.
"""

from __future__ import annotations

import math
from pathlib import Path

from google.protobuf import json_format, text_format

from runtime.ipc.dtypes import BY_CONFIG
from server._proto.inference import grpc_service_pb2 as pb
from server.types import DynamicBatching, ModelSpec, TensorSpec, VersionPolicy

__all__ = ["ConfigError", "parse_config_json", "read_model_config", "spec_from_pb"]


class ConfigError(ValueError):
    """The config file is unreadable or asks for something microtune cannot do."""


def read_model_config(model_dir: Path) -> ModelSpec:
    pbtxt, js = model_dir / "config.pbtxt", model_dir / "config.json"
    msg = pb.ModelConfig()
    try:
        if pbtxt.exists():
            text_format.Parse(pbtxt.read_text(), msg)
        elif js.exists():
            return parse_config_json(js.read_text(), model_dir.name)
    except (text_format.ParseError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"config of model '{model_dir.name}' does not parse: {exc}") from exc
    return spec_from_pb(msg, model_dir.name)


def parse_config_json(text: str, name: str) -> ModelSpec:
    if not text.lstrip().startswith("{"):  # (protobuf's parser took "[]" for an empty config)
        raise ConfigError(f"config of model '{name}' does not parse: not a JSON object")
    msg = pb.ModelConfig()
    try:
        json_format.Parse(text, msg)
    except json_format.ParseError as exc:
        raise ConfigError(f"config of model '{name}' does not parse: {exc}") from exc
    return spec_from_pb(msg, name)


def spec_from_pb(msg: pb.ModelConfig, dir_name: str) -> ModelSpec:
    if msg.name and msg.name != dir_name:
        raise ConfigError(f"config name '{msg.name}' differs from its directory '{dir_name}'")
    platform = msg.platform or "onnxruntime_onnx"
    if platform != "onnxruntime_onnx" or msg.backend not in ("", "onnxruntime"):
        what = (
            f"backend '{msg.backend}'"
            if platform == "onnxruntime_onnx"
            else f"platform '{platform}'"
        )
        raise ConfigError(
            f"model '{dir_name}': {what} is not supported "
            "(microtune serves onnxruntime_onnx models)"
        )
    if msg.max_batch_size < 0:
        raise ConfigError(f"model '{dir_name}': max_batch_size must be >= 0")
    instances = _instances(msg, dir_name)
    batching = None
    if msg.HasField("dynamic_batching"):
        db = msg.dynamic_batching
        for size in db.preferred_batch_size:  # as Triton, rather than ignore one silently
            if not 1 <= size <= msg.max_batch_size:
                raise ConfigError(
                    f"model '{dir_name}': dynamic_batching preferred_batch_size {size} is not "
                    f"between 1 and max_batch_size {msg.max_batch_size}"
                )
        queue = db.default_queue_policy.max_queue_size or 1024
        batching = DynamicBatching(
            tuple(db.preferred_batch_size),
            db.max_queue_delay_microseconds,
            queue,
            instances or 1,
        )
    return ModelSpec(
        name=dir_name,
        max_batch_size=msg.max_batch_size,
        inputs=tuple(_tensor(dir_name, "input", t) for t in msg.input),
        outputs=tuple(_tensor(dir_name, "output", t) for t in msg.output),
        version_policy=_policy(msg),
        dynamic_batching=batching,
        default_model_filename=_file_name(dir_name, msg.default_model_filename or "model.onnx"),
        platform=platform,
        parameters={k: v.string_value for k, v in msg.parameters.items()},
        instances=instances,
    )


def _file_name(model: str, name: str) -> str:
    """default_model_filename: a file in the version directory, never a path out of it (a
    config override comes from a client: RepositoryModelLoad)."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"model '{model}': default_model_filename '{name}' is not a file name")
    return name


def _tensor(model: str, kind: str, t: pb.ModelInput | pb.ModelOutput) -> TensorSpec:
    name = t.name
    try:
        type_name = pb.DataType.Name(t.data_type)
    except ValueError:  # a number outside the enum (proto3 text and JSON accept it)
        type_name = str(t.data_type)
    dt = BY_CONFIG.get(type_name)
    if dt is None:
        raise ConfigError(f"model '{model}': {kind} '{name}' has unsupported type {type_name}")
    shape = tuple(int(d) for d in t.dims)
    if any(d < -1 or d == 0 for d in shape):
        raise ConfigError(f"model '{model}': {kind} '{name}' has invalid dims {list(shape)}")
    reshape = None
    if t.HasField("reshape"):
        reshape = tuple(int(d) for d in t.reshape.shape)
        # The graph is given the clients' shapes by a Reshape node (runtime.engine.reshape),
        # whose target may leave one dimension, the batch, to be worked out: so fixed ones.
        if any(d < 1 for d in (*shape, *reshape)) or math.prod(shape) != math.prod(reshape):
            raise ConfigError(
                f"model '{model}': {kind} '{name}': reshape {list(reshape)} of dims "
                f"{list(shape)} needs fixed dims (no -1) holding as many elements"
            )
    return TensorSpec(name, dt.wire, shape, reshape)


MAX_INSTANCES = 64


def _instances(msg: pb.ModelConfig, model: str) -> int:
    """How many batches (with dynamic batching) or calls (without) of a version may execute at
    once: the instance_group counts, summed (a group without a count is one instance, as in
    Triton); 0 without instance_group, for the default (one batch thread; --worker-threads
    calls). Each instance is a thread of the worker running the version's one session
    (onnxruntime sessions are safe to run concurrently), so on CPU several use several cores."""
    counts = [g.count for g in msg.instance_group]
    if any(c < 0 for c in counts):
        raise ConfigError(f"model '{model}': instance_group count must be >= 0")
    total = sum(c or 1 for c in counts)
    if total > MAX_INSTANCES:
        raise ConfigError(f"model '{model}': {total} instances is more than {MAX_INSTANCES}")
    return total


def _policy(msg: pb.ModelConfig) -> VersionPolicy:
    which = msg.version_policy.WhichOneof("policy_choice")
    if which == "all":
        return VersionPolicy("all")
    if which == "specific":
        return VersionPolicy("specific", versions=tuple(msg.version_policy.specific.versions))
    if which == "latest":
        return VersionPolicy("latest", num_versions=msg.version_policy.latest.num_versions or 1)
    return VersionPolicy()
