"""Pure protobuf <-> domain conversion for the inference service.

Input tensors arrive as raw bytes (one `raw_input_contents` entry per input, in order) or as
typed `contents`; both become a Tensor holding KServe raw bytes, after checking the datatype,
the shape, the byte count and (BYTES) the element framing. Responses are always raw.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from runtime.ipc.dtypes import DTYPES, BytesDecodeError, decode_bytes_tensor, encode_bytes_tensor
from server._proto.inference import grpc_service_pb2 as pb
from server.errors import InvalidInput
from server.handler import ModelView, StatsRow
from server.stats import Duration
from server.types import InferRequest, InferResponse, ModelIndexEntry, ParamValue, Tensor

__all__ = [
    "decode_infer",
    "encode_config",
    "encode_index",
    "encode_infer",
    "encode_metadata",
    "encode_statistics",
]


def decode_infer(req: pb.ModelInferRequest) -> InferRequest:
    if not req.model_name:
        raise InvalidInput("model_name is required")
    raw = req.raw_input_contents
    if raw:
        for i in req.inputs:
            if i.HasField("contents"):
                raise InvalidInput(  # Triton's wording
                    "contents field must not be specified when using raw_input_contents for "
                    f"'{i.name}' for model '{req.model_name}'"
                )
        if len(raw) != len(req.inputs):
            raise InvalidInput(
                f"request has {len(raw)} raw_input_contents entries for {len(req.inputs)} inputs"
            )
    tensors = tuple(_decode_input(inp, raw[i] if raw else None) for i, inp in enumerate(req.inputs))
    return InferRequest(
        model=req.model_name,
        version=req.model_version,
        id=req.id,
        inputs=tensors,
        outputs=tuple(o.name for o in req.outputs),
        parameters=decode_parameters(req.parameters),
    )


def _decode_input(inp: pb.ModelInferRequest.InferInputTensor, raw: bytes | None) -> Tensor:
    name = inp.name
    dt = DTYPES.get(inp.datatype)
    if dt is None:
        raise InvalidInput(f"input '{name}' has unknown datatype '{inp.datatype}'")
    shape = tuple(inp.shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {list(shape)}")
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
                decode_bytes_tensor(raw, count)
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
    try:
        arr = np.array(values, dtype=dt.numpy)
    except OverflowError:
        raise InvalidInput(f"input '{name}' has values out of range for {dt.wire}") from None
    return Tensor(name, dt.wire, shape, arr.tobytes())


def decode_parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, ParamValue]:
    out: dict[str, ParamValue] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if which is None:
            continue
        out[key] = getattr(p, which)
    return out


def decode_load_parameters(
    params: Mapping[str, pb.ModelRepositoryParameter],
) -> tuple[str | None, dict[str, bytes]]:
    """RepositoryModelLoad parameters: `config` (JSON string) and `file:<version>/<name>`."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        if key == "config":
            if which != "string_param":
                raise InvalidInput("load parameter 'config' must be a string (JSON)")
            config = p.string_param
        elif key.startswith("file:"):
            if which != "bytes_param":
                raise InvalidInput(f"load parameter '{key[:64]}' must be bytes")
            files[key] = p.bytes_param
    return config, files


def encode_infer(res: InferResponse) -> pb.ModelInferResponse:
    msg = pb.ModelInferResponse(model_name=res.model, model_version=res.version, id=res.id)
    for t in res.outputs:
        msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
    msg.raw_output_contents.extend(bytes(t.data) for t in res.outputs)
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
    policy = spec.version_policy
    if policy.kind == "all":
        cfg.version_policy.all.SetInParent()
    elif policy.kind == "specific":
        cfg.version_policy.specific.versions.extend(policy.versions)
    else:
        cfg.version_policy.latest.num_versions = policy.num_versions
    if spec.dynamic_batching is not None:
        cfg.dynamic_batching.preferred_batch_size.extend(
            spec.dynamic_batching.preferred_batch_sizes
        )
        cfg.dynamic_batching.max_queue_delay_microseconds = spec.dynamic_batching.max_queue_delay_us
    for k, val in spec.parameters.items():
        cfg.parameters[k].string_value = val
    cfg.instance_group.add(name=v.name, count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
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


def encode_index(entries: Iterable[ModelIndexEntry]) -> pb.RepositoryIndexResponse:
    return pb.RepositoryIndexResponse(
        models=[
            pb.RepositoryIndexResponse.ModelIndex(
                name=e.name, version=e.version, state=e.state, reason=e.reason
            )
            for e in entries
        ]
    )
