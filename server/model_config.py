"""Reads a model's config file into a ModelSpec.

The format is Triton's: `config.pbtxt` (protobuf text) or `config.json` (the same message as
JSON, which is also what RepositoryModelLoad's `config` parameter carries). Everything is
optional: inputs and outputs left out are read from the ONNX graph by the worker. See
docs/model-repository.md.

Every field of Triton's ModelConfig parses (repositories move over from Triton unchanged), and
each falls in one of three kinds:
- read (`_READ`): microtune acts on it;
- refused (`_refuse_unsupported`): ignoring it would change what clients get (a stateful
  model's sequence control inputs, an ensemble's steps, a decoupled model's many responses,
  inputs the server computes for a batch), so the model does not load, saying so;
- any other field set: accepted and ignored, as it changes nothing a client receives (a
  response cache, priorities, host policies, warm-up samples, CUDA graph or TensorRT
  settings...); `ModelSpec.ignored` names them and the load logs them in one warning.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

from google.protobuf import json_format, text_format
from google.protobuf.message import Message

from runtime.ipc.dtypes import BY_CONFIG
from server._proto.inference import grpc_service_pb2 as pb
from server.types import DynamicBatching, ModelSpec, TensorSpec, VersionPolicy

__all__ = ["CONFIG_FILES", "ConfigError", "parse_config_json", "read_model_config", "spec_from_pb"]


class ConfigError(ValueError):
    """The config file is unreadable or asks for something microtune cannot do."""


# A model's config file, by precedence: Triton's text format, else the same message in JSON.
CONFIG_FILES = ("config.pbtxt", "config.json")


def read_model_config(model_dir: Path) -> ModelSpec:
    pbtxt, js = (model_dir / n for n in CONFIG_FILES)
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
        # (Its first line says what is wrong; the next lists every field of the message.)
        first = str(exc).split("\n", 1)[0]
        raise ConfigError(f"config of model '{name}' does not parse: {first}") from exc
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
    _refuse_unsupported(msg, dir_name)
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
        ignored=ignored_fields(msg),
        instances=instances,
    )


def _refuse_unsupported(msg: pb.ModelConfig, model: str) -> None:
    """Triton features whose absence would change the answers: refused, not ignored."""
    unsupported = []
    if msg.HasField("sequence_batching"):  # a stateful model: no control inputs, no state
        unsupported.append("sequence_batching (stateful models)")
    if msg.HasField("ensemble_scheduling"):
        unsupported.append("ensemble_scheduling (ensembles)")
    if msg.model_transaction_policy.decoupled:  # responses are one per request here
        unsupported.append("model_transaction_policy { decoupled: true }")
    if msg.batch_input:  # tensors the server computes for each batch, which the model reads
        unsupported.append("batch_input")
    if msg.batch_output:
        unsupported.append("batch_output")
    if unsupported:
        raise ConfigError(f"model '{model}': {', '.join(unsupported)}: not supported by microtune")


# The fields microtune acts on, as dotted paths (a path covers the fields under it). The
# parameters other than `routing` are the backend's in Triton, so they are ignored here. An
# instance group's `kind` and `gpus` count as read: where versions run is --device's choice
# for every model, as documented, and nearly every Triton config sets them.
_READ = frozenset(
    {
        "name",
        "platform",
        "backend",
        "max_batch_size",
        "version_policy",
        "input.name",
        "input.data_type",
        "input.dims",
        "input.reshape",
        "output.name",
        "output.data_type",
        "output.dims",
        "output.reshape",
        "instance_group.name",
        "instance_group.count",
        "instance_group.kind",
        "instance_group.gpus",
        "dynamic_batching.preferred_batch_size",
        "dynamic_batching.max_queue_delay_microseconds",
        "dynamic_batching.default_queue_policy.max_queue_size",
        "default_model_filename",
        "parameters.routing",
    }
)


def ignored_fields(msg: pb.ModelConfig) -> tuple[str, ...]:
    """The fields `msg` sets that microtune does not act on, as dotted paths, each once. A
    message nothing of which is read is named whole (`model_warmup`), or, when it is a single
    one, by what it sets (`optimization.priority`, `response_cache.enable`)."""
    return tuple(dict.fromkeys(_ignored(msg, "")))


def _ignored(msg: Message, prefix: str) -> Iterator[str]:
    for fd, value in msg.ListFields():  # (proto3 scalars: only those not at their default)
        path = prefix + fd.name
        if any(path == r or path.startswith(r + ".") for r in _READ):
            continue
        is_map = fd.message_type is not None and fd.message_type.GetOptions().map_entry
        if not any(r.startswith(path + ".") for r in _READ):  # nothing under it is read
            if fd.message_type is None or is_map or fd.is_repeated:
                yield path
            else:
                yield from (f"{path}.{sub.name}" for sub, _ in value.ListFields())
        elif is_map:  # parameters: the backend's keys (Triton's), ours is `routing`
            yield from (f"{path}.{key}" for key in value if f"{path}.{key}" not in _READ)
        elif fd.is_repeated:
            for item in value:
                yield from _ignored(item, path + ".")
        else:
            yield from _ignored(value, path + ".")


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
