"""Pure protobuf <-> domain conversion for the inference service.

Input tensors arrive as raw bytes (one `raw_input_contents` entry per input, in order) or as
typed `contents`; both become a Tensor holding KServe raw bytes, after checking the datatype,
the shape, the byte count and (BYTES) the element framing. Responses are always raw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final

import numpy as np

from runtime.ipc.dtypes import (
    DTYPES,
    BytesDecodeError,
    check_bytes_tensor,
    encode_bytes_tensor,
)
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput, Unsupported
from server.handler import ModelView, StatsRow
from server.shm_directory import RegionRecord
from server.shm_regions import CudaRegion, SystemRegion
from server.stats import Duration
from server.types import (
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ParamValue,
    ShmRef,
    Tensor,
)

__all__ = [
    "check_repository_name",
    "check_unload_parameters",
    "decode_infer",
    "decode_load_parameters",
    "encode_config",
    "encode_index",
    "encode_infer",
    "encode_metadata",
    "encode_statistics",
    "read_varint",
]


def decode_infer(req: pb.ModelInferRequest) -> InferRequest:
    if not req.model_name:
        raise InvalidInput("model_name is required")
    raw = req.raw_input_contents
    shm = [_shm_ref(i.name, i.parameters) for i in req.inputs]
    if raw:
        for i in req.inputs:
            if i.HasField("contents"):
                raise InvalidInput(  # Triton's wording
                    "contents field must not be specified when using raw_input_contents for "
                    f"'{i.name}' for model '{req.model_name}'"
                )
        # Inputs in shared memory have no raw entry (Triton advances only for the others).
        with_data = sum(1 for ref in shm if ref is None)
        if len(raw) != with_data:
            raise InvalidInput(
                f"request has {len(raw)} raw_input_contents entries for {with_data} inputs "
                "that carry data"
            )
    tensors: list[Tensor] = []
    k = 0
    for inp, ref in zip(req.inputs, shm, strict=True):
        if ref is not None:
            tensors.append(_decode_shm_input(inp, ref))
        else:
            tensors.append(_decode_input(inp, raw[k] if raw else None))
            k += 1
    output_shm = {}
    names = []
    for o in req.outputs:
        names.append(o.name)
        if o.parameters and "classification" in o.parameters:
            # Triton's classification extension (tritonclient's class_count), not implemented:
            # answering the raw tensor instead would hand the client data of another type and
            # shape than it asked for.
            raise Unsupported(
                f"output '{o.name}': classification is not supported (Triton's classification "
                "extension); request the tensor itself"
            )
        ref = _shm_ref(o.name, o.parameters)
        if ref is not None:
            output_shm[o.name] = ref
    return InferRequest(
        model=req.model_name,
        version=req.model_version,
        id=req.id,
        inputs=tuple(tensors),
        outputs=tuple(names),
        parameters=decode_parameters(req.parameters),
        output_shm=output_shm,
    )


def _shm_ref(name: str, params: Mapping[str, pb.InferParameter]) -> ShmRef | None:
    if not params:  # the common case, and map lookups cost more than this check
        return None
    region = params.get("shared_memory_region")
    size = params.get("shared_memory_byte_size")
    if region is None and size is None:
        return None
    if region is None or size is None:
        raise InvalidInput(
            f"tensor '{name}': shared_memory_region and shared_memory_byte_size must be given "
            "together"
        )
    offset = params.get("shared_memory_offset")
    if region.WhichOneof("parameter_choice") != "string_param":
        raise InvalidInput(f"tensor '{name}': shared_memory_region must be a string")
    return ShmRef(
        region.string_param,
        _int_param(name, "shared_memory_offset", offset),
        _int_param(name, "shared_memory_byte_size", size),
    )


def _int_param(tensor: str, key: str, p: pb.InferParameter | None) -> int:
    if p is None:
        return 0
    which = p.WhichOneof("parameter_choice")
    if which not in ("int64_param", "uint64_param"):
        raise InvalidInput(f"tensor '{tensor}': {key} must be an integer")
    value = int(getattr(p, which))
    if value < 0:
        raise InvalidInput(f"tensor '{tensor}': {key} must be >= 0")
    return value


# No tensor has more elements: numpy (and onnxruntime) size arrays in a signed 64-bit count of
# bytes, and an element takes up to 8.
_MAX_ELEMENTS = 1 << 59


# The most dimensions an input may have: numpy's limit (NPY_MAXDIMS), which onnxruntime's
# Python binding needs to hand the tensor over.
MAX_RANK = 64


def _shape(name: str, dims: Sequence[int]) -> tuple[int, ...]:
    """An input's shape: no negative dimension, and no size past what an array can have, even
    with no element at all ([0, 2**62] is 0 bytes, but numpy cannot shape an array so: the
    worker failed the call INTERNAL, and with it every call batched with it); and no more
    dimensions than an array can have (numpy's 64): a shape of millions of dimensions held the
    event loop for the Python passes over it, and messages quoted it whole."""
    if len(dims) > MAX_RANK:  # (a repeated field: its length is known before any pass)
        raise InvalidInput(
            f"input '{name}' has {len(dims)} dimensions, more than a tensor may have ({MAX_RANK})"
        )
    shape = tuple(dims)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {list(shape)}")
    if math.prod(d for d in shape if d) > _MAX_ELEMENTS:
        raise InvalidInput(f"input '{name}' has shape {list(shape)}: too large a tensor")
    return shape


def _decode_shm_input(inp: pb.ModelInferRequest.InferInputTensor, ref: ShmRef) -> Tensor:
    dt = DTYPES.get(inp.datatype)
    if dt is None:
        raise InvalidInput(f"input '{inp.name}' has unknown datatype '{inp.datatype}'")
    if inp.HasField("contents"):
        raise InvalidInput(f"input '{inp.name}' is in shared memory and must not set contents")
    shape = _shape(inp.name, inp.shape)
    if dt.itemsize:
        want = math.prod(shape) * dt.itemsize
        if ref.byte_size != want:
            raise InvalidInput(
                f"input '{inp.name}' has shared_memory_byte_size {ref.byte_size} but shape "
                f"{list(shape)} of {dt.wire} needs {want}"
            )
    return Tensor(inp.name, dt.wire, shape, b"", ref)


def _decode_input(inp: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name = inp.name
    dt = DTYPES.get(inp.datatype)
    if dt is None:
        raise InvalidInput(f"input '{name}' has unknown datatype '{inp.datatype}'")
    shape = _shape(name, inp.shape)
    count = math.prod(shape)
    if raw is not None:
        if dt.itemsize:
            want = count * dt.itemsize
            if len(raw) != want:
                raise InvalidInput(
                    f"input '{name}' has {len(raw)} bytes of raw content but shape "
                    f"{list(shape)} of {dt.wire} needs {want}"
                )
        else:
            try:
                check_bytes_tensor(raw, count)  # (on the event loop: bounded work)
            except BytesDecodeError as exc:
                raise InvalidInput(f"input '{name}' has malformed BYTES content: {exc}") from None
        return Tensor(name, dt.wire, shape, raw)
    if not inp.HasField("contents"):
        raise InvalidInput(f"input '{name}' has no data (neither contents nor raw content)")
    if dt.contents_field is None:
        raise InvalidInput(f"input '{name}': {dt.wire} data can only be sent as raw content")
    values = getattr(inp.contents, dt.contents_field)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}' has {len(values)} values in contents.{dt.contents_field} but shape "
            f"{list(shape)} needs {count}"
        )
    if dt.wire == "BYTES":
        return Tensor(name, dt.wire, shape, encode_bytes_tensor(list(values)))
    packed = _packed_floats(inp.contents, dt.wire, count)
    if packed is not None:
        return Tensor(name, dt.wire, shape, packed)
    try:
        arr = np.array(values, dtype=dt.numpy)
    except OverflowError:
        raise InvalidInput(f"input '{name}' has values out of range for {dt.wire}") from None
    return Tensor(name, dt.wire, shape, arr.tobytes())


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The protobuf varint at `pos` of serialized bytes and where it ends; IndexError past the
    end or past 10 bytes. (server.rpc.wire's walk of every request inlines its own.)"""
    value = shift = 0
    while True:
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise IndexError("a varint of more than 10 bytes")


# InferTensorContents' fixed-width fields: wire tag (packed: length-delimited) and item size.
_PACKED_FLOATS = {"FP32": (6 << 3 | 2, 4), "FP64": (7 << 3 | 2, 8)}


def _packed_floats(contents: pb.InferTensorContents, wire: str, count: int) -> bytes | None:
    """FP32 / FP64 contents as their raw little-endian bytes, taken from the serialized field
    (a packed repeated float is exactly those bytes) instead of building a Python float per
    value: ~50 ns a value, so a 48 MB tensor held the event loop (every other request) for
    seconds. None when the contents hold anything else too (the slow path checks them)."""
    spec = _PACKED_FLOATS.get(wire)
    if spec is None or count == 0:
        return None
    tag, width = spec
    data = contents.SerializeToString()
    if not data or data[0] != tag:
        return None
    try:
        size, pos = read_varint(data, 1)  # the field's length
    except IndexError:
        return None
    if size != count * width or pos + size != len(data):
        return None
    return memoryview(data)[pos:]  # (no copy of the tensor)


# The request parameters Triton gives a meaning to, and the value types it takes for each
# (its gRPC front checks them, and refuses a request whose type is wrong with these words).
_TYPED_PARAMETERS: Final[dict[str, tuple[tuple[str, ...], str]]] = {
    "sequence_id": (("int64_param", "string_param"), "int64_param or string_param"),
    "sequence_start": (("bool_param",), "bool_param"),
    "sequence_end": (("bool_param",), "bool_param"),
    "priority": (("int64_param", "uint64_param"), "int64_param or uint64_param"),
    "timeout": (("int64_param",), "int64_param"),
}
_TRITON_RESERVED = ("triton_enable_empty_final_response",)


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    """A request's parameters. Those Triton gives a meaning to are checked as Triton checks
    them, with its words: their value types, and keys starting with "triton_". Others pass
    as they are (a parameter with no value is left out)."""
    if not params:
        return {}
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        typed = _TYPED_PARAMETERS.get(key)
        if typed is not None and which not in typed[0]:
            raise InvalidInput(f"invalid value type for '{key}' parameter, expected {typed[1]}.")
        if key.startswith("triton_"):
            if key not in _TRITON_RESERVED:
                raise InvalidInput(
                    "parameter keys starting with 'triton_' are reserved for Triton usage. "
                    f"Only the following keys starting with 'triton_' are allowed: "
                    f"{' '.join(_TRITON_RESERVED)}"
                )
            if which != "bool_param":
                raise InvalidInput(
                    f"invalid value type for '{key}' parameter, expected bool_param."
                )
        if which is None:
            continue
        value = getattr(p, which)
        if key == "priority" and value < 0:
            raise InvalidInput("invalid value for 'priority', expected value >= 0.")
        out[key] = value
    return out


def decode_load_parameters(
    params: Mapping[str, pb.ModelRepositoryParameter],
) -> tuple[str | None, dict[str, bytes]]:
    """RepositoryModelLoad parameters: `config` (JSON string) and `file:<version>/<name>`;
    any other is refused, as in Triton (a misspelt "configs" loaded the model without the
    override, and tritonclient's `files` without their "file:" prefix failed later, unclearly).
    Messages in Triton's words."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if key == "config":
            if which != "string_param":
                raise InvalidInput(
                    "invalid value type for load parameter 'config', expected string_param."
                )
            config = p.string_param
        elif key.startswith("file:"):
            if which != "bytes_param":
                raise InvalidInput(
                    f"invalid value type for load parameter '{key[:64]}', expected bytes_param."
                )
            files[key] = p.bytes_param
        else:
            raise InvalidInput(f"unrecognized load parameter '{key[:64]}'.")
    return config, files


def check_unload_parameters(params: Mapping[str, pb.ModelRepositoryParameter]) -> None:
    """RepositoryModelUnload's `unload_dependents` must be a bool (there are no ensembles, so
    it changes nothing); other parameters are ignored, as in Triton."""
    p = params.get("unload_dependents")
    if p is not None and p.WhichOneof("parameter_choice") != "bool_param":
        raise InvalidInput(
            "invalid value type for 'unload_dependents' parameter, expected bool_param."
        )


def check_repository_name(name: str) -> None:
    """One repository, unnamed: a request naming one is refused, as in Triton."""
    if name:
        raise Unsupported("'repository_name' specification is not supported")


def encode_infer(res: InferResponse) -> pb.ModelInferResponse:
    msg = encode_infer_head(res)
    # One entry per output, empty for those written to shared memory: clients index raw
    # contents by output position (perf_analyzer's C++ client crashes on a missing entry).
    msg.raw_output_contents.extend(bytes(t.data) for t in res.outputs)
    return msg


def encode_infer_head(res: InferResponse) -> pb.ModelInferResponse:
    """The response without its raw_output_contents (server.rpc.wire appends them)."""
    msg = pb.ModelInferResponse(model_name=res.model, model_version=res.version, id=res.id)
    for t in res.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if t.shm is not None:
            out.parameters["shared_memory_region"].string_param = t.shm.region
            out.parameters["shared_memory_byte_size"].int64_param = t.shm.byte_size
            if t.shm.offset:
                out.parameters["shared_memory_offset"].int64_param = t.shm.offset
    return msg


def encode_metadata(v: ModelView) -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name=v.name,
        versions=[str(x) for x in v.versions],
        platform=v.spec.platform,
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in v.signature.inputs
        ],
        outputs=[
            pb.ModelMetadataResponse.TensorMetadata(name=t.name, datatype=t.datatype, shape=t.shape)
            for t in v.signature.outputs
        ],
    )


def encode_config(v: ModelView) -> pb.ModelConfigResponse:
    spec = v.spec
    cut = 1 if spec.max_batch_size > 0 else 0
    cfg = pb.ModelConfig(
        name=v.name,
        platform=spec.platform,
        backend="onnxruntime",
        max_batch_size=spec.max_batch_size,
        default_model_filename=spec.default_model_filename,
        input=[
            pb.ModelInput(name=t.name, data_type=_config_type(t.datatype), dims=t.shape[cut:])
            for t in v.signature.inputs
        ],
        output=[
            pb.ModelOutput(name=t.name, data_type=_config_type(t.datatype), dims=t.shape[cut:])
            for t in v.signature.outputs
        ],
    )
    reshapes = {t.name: t.reshape for t in (*spec.inputs, *spec.outputs) if t.reshape is not None}
    for tensor in (*cfg.input, *cfg.output):
        if tensor.name in reshapes:  # (the config's, as Triton echoes it)
            tensor.reshape.shape.extend(reshapes[tensor.name])
    policy = spec.version_policy
    if policy.kind == "all":
        cfg.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        cfg.version_policy.specific.versions.extend(policy.versions)
    else:
        cfg.version_policy.latest.num_versions = policy.num_versions
    batching = spec.dynamic_batching
    if batching is not None:
        cfg.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        # (the bound in force, the default included: Triton's default is unbounded)
        cfg.dynamic_batching.default_queue_policy.max_queue_size = batching.max_queue_size
    for k, val in spec.parameters.items():
        cfg.parameters[k].string_value = val
    # The batches (with dynamic batching) or calls (without) that may execute at once: the
    # config's counts, summed, or the default in force (Triton echoes its default count too).
    cfg.instance_group.add(name=v.name, count=v.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    return pb.ModelConfigResponse(config=cfg)


def _config_type(wire: str) -> int:
    return int(pb.DataType.Value(DTYPES[wire].config))


def _dur(d: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d.count, ns=d.ns)


def encode_statistics(rows: Iterable[StatsRow]) -> pb.ModelStatisticsResponse:
    out = pb.ModelStatisticsResponse()
    for r in rows:
        s = r.stats
        ms = out.model_stats.add(
            name=r.name,
            version=str(r.version),
            last_inference=s.last_inference_ms,
            inference_count=s.inference_count,
            execution_count=s.execution_count,
        )
        st = ms.inference_stats
        st.success.CopyFrom(_dur(s.success))
        st.fail.CopyFrom(_dur(s.fail))
        st.queue.CopyFrom(_dur(s.queue))
        st.compute_input.CopyFrom(_dur(s.compute_input))
        st.compute_infer.CopyFrom(_dur(s.compute_infer))
        st.compute_output.CopyFrom(_dur(s.compute_output))
        for size in sorted(s.batches):
            b = s.batches[size]
            ms.batch_stats.add(
                batch_size=size,
                compute_input=_dur(b.compute_input),
                compute_infer=_dur(b.compute_infer),
                compute_output=_dur(b.compute_output),
            )
    return out


def encode_system_shm_status(
    regions: Iterable[SystemRegion | RegionRecord],
) -> pb.SystemSharedMemoryStatusResponse:
    out = pb.SystemSharedMemoryStatusResponse()
    for r in regions:
        st = out.regions[r.name]
        st.name, st.key, st.offset, st.byte_size = r.name, r.key, r.offset, r.byte_size
    return out


def encode_cuda_shm_status(
    regions: Iterable[CudaRegion | RegionRecord],
) -> pb.CudaSharedMemoryStatusResponse:
    out = pb.CudaSharedMemoryStatusResponse()
    for r in regions:
        st = out.regions[r.name]
        st.name, st.device_id, st.byte_size = r.name, r.device_id, r.byte_size
    return out


def encode_index(entries: Iterable[ModelIndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=e.version, state=e.state, reason=e.reason
            )
            for e in entries
        ]
    )
