"""The benchmark "floor": a bare grpc.aio KServe v2 / Triton server for ONE model.

It answers just enough of ``inference.GRPCInferenceService`` for perf_analyzer and
tritonclient to drive it (ServerLive, ServerReady, ServerMetadata, ModelReady,
ModelMetadata, ModelConfig, ModelStatistics, ModelInfer); every other method is
UNIMPLEMENTED (it is simply not registered).  ModelInfer does no inference work:

* ``dense`` / ``simple``: the serialized ModelInferResponse is built once at start-up
  and returned as raw bytes for every request (the request is never deserialized, so
  a request with another batch size still gets the batch-1 answer: it is a floor).
* ``identity_fp32``: the first ``raw_input_contents`` buffer is echoed back as
  ``raw_output_contents[0]`` with the request's shape.  The request is walked at the
  protobuf wire level (no message objects, the payload is never copied by Python
  before the single join that builds the reply).

Whatever a real server costs above this floor is its own overhead.

Usage (from the repo root)::

    PYTHONPATH=. python bench/floor_server.py --model dense --port 0 --port-file /tmp/p
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import struct
import sys
from dataclasses import dataclass

import grpc

from server._proto.inference import grpc_service_pb2 as pb
from server._proto.inference import grpc_service_pb2_grpc as pb_grpc  # noqa: F401  (canonical stubs)

SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE_BYTES = 256 * 1024 * 1024  # send and receive (>= 64 MiB as required)
MODEL_VERSION = "1"

log = logging.getLogger("floor")


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe v2 datatype ("FP32", "INT32")
    dims: tuple[int, ...]  # without the batch dimension


@dataclass(frozen=True)
class FloorModel:
    name: str
    max_batch_size: int
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    # one raw little-endian buffer per output, for a batch-1 request (None: identity)
    batch1_outputs: tuple[bytes, ...] | None


def _fp32(values) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}f", *values)


def _int32(values) -> bytes:
    values = list(values)
    return struct.pack(f"<{len(values)}i", *values)


MODELS: dict[str, FloorModel] = {
    "dense": FloorModel(
        name="dense",
        max_batch_size=8,
        inputs=(Tensor("INPUT0", "FP32", (256,)),),
        outputs=(Tensor("OUTPUT0", "FP32", (10,)),),
        batch1_outputs=(_fp32(i / 10.0 for i in range(10)),),
    ),
    # Triton's "simple" example: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1,
    # here precomputed for INPUT0 = 0..15, INPUT1 = 1.
    "simple": FloorModel(
        name="simple",
        max_batch_size=8,
        inputs=(Tensor("INPUT0", "INT32", (16,)), Tensor("INPUT1", "INT32", (16,))),
        outputs=(Tensor("OUTPUT0", "INT32", (16,)), Tensor("OUTPUT1", "INT32", (16,))),
        batch1_outputs=(_int32(i + 1 for i in range(16)), _int32(i - 1 for i in range(16))),
    ),
    "identity_fp32": FloorModel(
        name="identity_fp32",
        max_batch_size=0,
        inputs=(Tensor("INPUT0", "FP32", (-1,)),),
        outputs=(Tensor("OUTPUT0", "FP32", (-1,)),),
        batch1_outputs=None,
    ),
}

_CONFIG_DTYPE = {"FP32": pb.TYPE_FP32, "INT32": pb.TYPE_INT32}


def _metadata_shape(model: FloorModel, t: Tensor) -> list[int]:
    return ([-1] if model.max_batch_size > 0 else []) + list(t.dims)


def build_model_metadata(model: FloorModel) -> pb.ModelMetadataResponse:
    TM = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=[MODEL_VERSION],
        platform="floor",
        inputs=[
            TM(name=t.name, datatype=t.datatype, shape=_metadata_shape(model, t))
            for t in model.inputs
        ],
        outputs=[
            TM(name=t.name, datatype=t.datatype, shape=_metadata_shape(model, t))
            for t in model.outputs
        ],
    )


def build_model_config(model: FloorModel) -> pb.ModelConfigResponse:
    return pb.ModelConfigResponse(
        config=pb.ModelConfig(
            name=model.name,
            platform="floor",
            backend="floor",
            version_policy=pb.ModelVersionPolicy(
                latest=pb.ModelVersionPolicy.Latest(num_versions=1)
            ),
            max_batch_size=model.max_batch_size,
            input=[
                pb.ModelInput(name=t.name, data_type=_CONFIG_DTYPE[t.datatype], dims=t.dims)
                for t in model.inputs
            ],
            output=[
                pb.ModelOutput(name=t.name, data_type=_CONFIG_DTYPE[t.datatype], dims=t.dims)
                for t in model.outputs
            ],
            instance_group=[
                pb.ModelInstanceGroup(name=model.name, count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
            ],
        )
    )


def build_model_statistics(model: FloorModel, count: int = 0) -> pb.ModelStatisticsResponse:
    """Valid statistics for the model: every duration present, every count = ``count``, all ns 0.

    ``count`` 0 gives the empty-but-valid answer.
    """

    def zero() -> pb.StatisticDuration:
        return pb.StatisticDuration(count=count, ns=0)

    return pb.ModelStatisticsResponse(
        model_stats=[
            pb.ModelStatistics(
                name=model.name,
                version=MODEL_VERSION,
                last_inference=0,
                inference_count=count,
                execution_count=count,
                inference_stats=pb.InferStatistics(
                    success=zero(),
                    fail=pb.StatisticDuration(),
                    queue=zero(),
                    compute_input=zero(),
                    compute_infer=zero(),
                    compute_output=zero(),
                    cache_hit=pb.StatisticDuration(),
                    cache_miss=pb.StatisticDuration(),
                ),
            )
        ]
    )


def build_batch1_response(model: FloorModel) -> bytes:
    assert model.batch1_outputs is not None
    resp = pb.ModelInferResponse(
        model_name=model.name,
        model_version=MODEL_VERSION,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=t.name, datatype=t.datatype, shape=[1, *t.dims]
            )
            for t in model.outputs
        ],
        raw_output_contents=list(model.batch1_outputs),
    )
    return resp.SerializeToString()


# ------------------------------------------------------- protobuf wire-level helpers

_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


def _encode_varint(value: int) -> bytes:
    if value < 0:  # int64 negatives are 10-byte two's complement varints
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise ValueError("varint too long")


def _iter_fields(buf: memoryview):
    """Yield (field_number, wire_type, value) where value is an int or a memoryview."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _decode_varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == _WT_LEN:
            n, pos = _decode_varint(buf, pos)
            if pos + n > end:
                raise ValueError("truncated length-delimited field")
            yield field, wt, buf[pos : pos + n]
            pos += n
        elif wt == _WT_VARINT:
            v, pos = _decode_varint(buf, pos)
            yield field, wt, v
        elif wt == _WT_I64:
            yield field, wt, buf[pos : pos + 8]
            pos += 8
        elif wt == _WT_I32:
            yield field, wt, buf[pos : pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _tensor_shape(tensor: memoryview) -> list[int]:
    """shape (field 3, repeated int64, packed or not) of an InferInputTensor."""
    shape: list[int] = []
    for field, wt, value in _iter_fields(tensor):
        if field != 3:
            continue
        if wt == _WT_LEN:  # packed
            pos = 0
            while pos < len(value):
                v, pos = _decode_varint(value, pos)
                shape.append(_signed64(v))
        elif wt == _WT_VARINT:
            shape.append(_signed64(value))
    return shape


def _len_field(field: int, payload) -> list:
    return [_encode_varint(field << 3 | _WT_LEN), _encode_varint(len(payload)), payload]


class IdentityResponder:
    """Builds ModelInferResponse bytes echoing raw_input_contents[0] with the input's shape."""

    def __init__(self, model: FloorModel) -> None:
        out = model.outputs[0]
        self._head = b"".join(
            _len_field(1, model.name.encode()) + _len_field(2, MODEL_VERSION.encode())
        )  # model_name, model_version
        self._tensor_head = b"".join(
            _len_field(1, out.name.encode()) + _len_field(2, out.datatype.encode())
        )

    def __call__(self, request: bytes) -> bytes:
        buf = memoryview(request)
        first_input = raw0 = req_id = None
        for field, wt, value in _iter_fields(buf):
            if wt != _WT_LEN:
                continue
            if field == 7 and raw0 is None:
                raw0 = value
            elif field == 5 and first_input is None:
                first_input = value
            elif field == 3:
                req_id = value
        if raw0 is None or first_input is None:
            raise ValueError("identity_fp32 floor needs one input sent as raw_input_contents")
        shape = _tensor_shape(first_input)
        packed = b"".join(_encode_varint(d) for d in shape)
        tensor = self._tensor_head + (b"".join(_len_field(3, packed)) if shape else b"")
        parts = [self._head]
        if req_id is not None and len(req_id):
            parts += _len_field(3, req_id)
        parts += _len_field(5, tensor)
        parts += _len_field(6, raw0)
        return b"".join(parts)


# ------------------------------------------------------------------------ service


class LogRpcInterceptor(grpc.aio.ServerInterceptor):
    """--log-rpcs: log every call (implemented or not) with its metadata."""

    async def intercept_service(self, continuation, handler_call_details):
        md = ", ".join(f"{k}={v!r}" for k, v in (handler_call_details.invocation_metadata or ()))
        log.info("rpc %s [%s]", handler_call_details.method, md)
        return await continuation(handler_call_details)


def _abort_unknown_model(context, name: str):
    return context.abort(
        grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found"
    )


def build_handler(
    model: FloorModel, *, statistics: bool = False, raw_bytes: bool = False
) -> grpc.GenericRpcHandler:
    """The service's method table.

    statistics=False (the default, the true floor): ServerMetadata lists no "statistics"
    extension, so perf_analyzer never calls ModelStatistics; the RPC still answers (for other
    clients) with empty-but-valid statistics.

    statistics=True: list "statistics" (as Triton does) and count ModelInfer calls (one integer
    increment per request), reported as inference/execution/success/queue/compute counts.
    perf_analyzer then calls ModelStatistics before and after every measurement window and,
    when no model version is given (-x), it needs the queue count to grow during the window:
    constant (empty) statistics make it fail with "failed to find the requested model version".
    """
    metadata = build_model_metadata(model)
    config = build_model_config(model)
    empty_stats = build_model_statistics(model)
    infer_count = 0
    extensions = ["model_configuration"] + (["statistics"] if statistics else [])
    server_meta = pb.ServerMetadataResponse(
        name="microtune-floor", version="0.0.0", extensions=extensions
    )
    live = pb.ServerLiveResponse(live=True)
    ready = pb.ServerReadyResponse(ready=True)
    model_is_ready = pb.ModelReadyResponse(ready=True)
    model_not_ready = pb.ModelReadyResponse(ready=False)

    def known(name: str, version: str) -> bool:
        return name == model.name and version in ("", MODEL_VERSION)

    async def server_live(request, context):
        return live

    async def server_ready(request, context):
        return ready

    async def server_metadata(request, context):
        return server_meta

    async def model_ready_rpc(request, context):
        return model_is_ready if known(request.name, request.version) else model_not_ready

    async def model_metadata(request, context):
        if not known(request.name, request.version):
            await _abort_unknown_model(context, request.name)
        return metadata

    async def model_config(request, context):
        if not known(request.name, request.version):
            await _abort_unknown_model(context, request.name)
        return config

    async def model_statistics(request, context):
        if request.name and not known(request.name, request.version):
            await _abort_unknown_model(context, request.name)
        return build_model_statistics(model, infer_count) if statistics else empty_stats

    if model.batch1_outputs is not None:
        response_bytes = build_batch1_response(model)

        if statistics:

            async def model_infer(request: bytes, context) -> bytes:
                nonlocal infer_count
                infer_count += 1
                return response_bytes

        else:

            async def model_infer(request: bytes, context) -> bytes:
                return response_bytes

    else:
        responder = IdentityResponder(model)

        async def model_infer(request: bytes, context) -> bytes:
            nonlocal infer_count
            try:
                response = responder(request)
            except (ValueError, IndexError) as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if statistics:
                infer_count += 1
            return response

    response_msg = (
        pb.ModelInferResponse.FromString(build_batch1_response(model))
        if model.batch1_outputs is not None
        else None
    )

    async def pb_model_infer(request: pb.ModelInferRequest, context) -> pb.ModelInferResponse:
        nonlocal infer_count
        if statistics:
            infer_count += 1
        if response_msg is not None:
            return response_msg  # precomputed; gRPC serializes it as for any response
        if not request.raw_input_contents or not request.inputs:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "identity needs raw input")
        out = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        out.outputs.add(name="OUTPUT0", datatype="FP32", shape=request.inputs[0].shape)
        out.raw_output_contents.append(request.raw_input_contents[0])
        return out

    def unary(fn, req_cls, resp_cls):
        return grpc.unary_unary_rpc_method_handler(
            fn,
            request_deserializer=req_cls.FromString,
            response_serializer=resp_cls.SerializeToString,
        )

    handlers = {
        "ServerLive": unary(server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
        "ServerReady": unary(server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
        "ServerMetadata": unary(
            server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse
        ),
        "ModelReady": unary(model_ready_rpc, pb.ModelReadyRequest, pb.ModelReadyResponse),
        "ModelMetadata": unary(model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
        "ModelConfig": unary(model_config, pb.ModelConfigRequest, pb.ModelConfigResponse),
        "ModelStatistics": unary(
            model_statistics, pb.ModelStatisticsRequest, pb.ModelStatisticsResponse
        ),
        # --raw-bytes: no protobuf (de)serialization at all on the hot path (below what any
        # gRPC server that reads its requests pays); default: parse and serialize as usual.
        "ModelInfer": grpc.unary_unary_rpc_method_handler(
            model_infer, request_deserializer=None, response_serializer=None
        )
        if raw_bytes
        else unary(pb_model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
    }
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)


async def serve(args: argparse.Namespace) -> None:
    model = MODELS[args.model]
    server = grpc.aio.server(
        interceptors=[LogRpcInterceptor()] if args.log_rpcs else None,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers(
        (build_handler(model, statistics=args.statistics, raw_bytes=args.raw_bytes),)
    )
    address = f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"
    port = server.add_insecure_port(address)
    if port == 0:
        raise SystemExit(f"floor_server: could not bind {address}")
    await server.start()
    log.info(
        "floor server for model %r serving on %s:%d (pid %d)",
        model.name,
        args.host,
        port,
        os.getpid(),
    )
    if args.port_file:
        _write_port_file(args.port_file, port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await server.stop(grace=1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, choices=sorted(MODELS))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (see --port-file)")
    p.add_argument("--port-file", help="write the bound port here once serving")
    p.add_argument(
        "--statistics",
        action="store_true",
        help='list the "statistics" extension in ServerMetadata and count ModelInfer calls in '
        "ModelStatistics (perf_analyzer then polls ModelStatistics around each window)",
    )
    p.add_argument(
        "--log-rpcs", action="store_true", help="log every RPC (method and metadata) to stderr"
    )
    p.add_argument(
        "--raw-bytes",
        action="store_true",
        help="answer ModelInfer without parsing the request or serializing the response",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
