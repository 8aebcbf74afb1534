"""Property tests: whatever a client sends, the server answers it with a result or a clear client
error, and keeps serving.

Hypothesis builds requests near the edge of valid: a correct request for a real model (its
contract read from ModelMetadata and ModelConfig), then a few mutations: a tensor dropped,
renamed or doubled; a datatype, shape or byte count changed; typed contents instead of raw
bytes; an input or output placed in a registered region (system or CUDA), or shared-memory
parameters naming unknown regions, wrong kinds or sizes and offsets out of range; odd request
parameters, versions and names. Every answer must be either
- OK, with outputs whose sizes match their shapes and, where the model is an identity, the
  input's bytes back exactly (from the response or from the region the output was put in); or
- a client error (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED) with a message that is not
  the "internal error (id ...)" of an unexpected exception.
A good request is answered after every example; at the end the worker is the one the server
started with and the server's log holds no traceback. The same holds for requests on one
ModelInferStream, and for the model and shared-memory RPCs called with arbitrary arguments.

Two servers: plain sessions, and `--cpu-graphs true` (the GPU worker's path on the CPU EP: graph
sets, padding to buckets, direct channels). Both with client shared memory on (`--fake-cuda-ipc`
plays the CUDA region with a POSIX shm object, as in test_cuda_shm.py).

With MICROTUNE_FUZZ_DEVICE=cuda:0 (scripts/gpu/run_gpu_checks.sh on a GPU machine) one server
instead: a CUDA worker (CUDA graphs per bucket, the pinned arena), real CUDA IPC, so that the
CUDA region is left out and arbitrary 64-byte handles reach cudaIpcOpenMemHandle.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import re
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.utils.shared_memory as shm
from harness import Server, assert_still_serving, running_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc
from tritonclient.utils import deserialize_bytes_tensor

from runtime.engine.regions import fake_handle

Code = grpc.StatusCode
Stub = service_pb2_grpc.GRPCInferenceServiceStub
ARGS = ("--allow-client-shm", "true", "--fake-cuda-ipc", "true")
# Copies with dynamic batching (a queue delay, so that requests in flight together batch):
# name -> the model copied.
BATCHED = {"b_simple": "simple", "b_simple_string": "simple_string", "b_id_fp32": "id_fp32"}
MODELS = (
    "simple", "simple_string", "simple_identity", "dense", "identity_fp32",
    "id_fp16", "id_bool", "id_bytes", "id_int8", "id_uint64", "id_fp64", "mixed_bytes",
    *BATCHED,
)  # fmt: skip
IDENTITIES = {"simple_identity", "identity_fp32"} | {m for m in MODELS if "id_" in m}
SUMS = {"simple", "b_simple"}  # OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (INT32)
DATATYPES = (
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES", "BF16",
)  # fmt: skip
ITEMSIZE = {"BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
            "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8}  # fmt: skip

# What a request may get besides OK: the client errors. UNAVAILABLE only for the model that
# failed to load: every other one is loaded and ready, so "not ready" would be a bug.
CLIENT_ERRORS = {Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.RESOURCE_EXHAUSTED}
NOT_LOADED = "bad_corrupt"
# simple_string parses its strings as integers in the graph (Cast): onnxruntime fails on other
# text, which the server answers as the model's failure (INTERNAL naming the model, as Triton).
# Requests whose every string is a small decimal integer must not fail (nor its batch's others).
PARSES = {"simple_string", "b_simple_string"}
DECIMAL = re.compile(rb"-?\d{1,2}")

# Two registered regions; valid placements put inputs in the first half, outputs in the second.
SYS, CUDA, REGION_BYTES, HALF = "fz_sys", "fz_cuda", 4096, 2048
REGIONS = (SYS, CUDA, "fz_unknown", "")
DEVICE = os.environ.get("MICROTUNE_FUZZ_DEVICE", "")  # a test knob; the servers never see it
SERVERS = ["device"] if DEVICE else ["sessions", "cpu-graphs"]


@dataclass(frozen=True)
class Contract:
    max_batch: int
    inputs: tuple[tuple[str, str, tuple[int, ...]], ...]  # name, datatype, dims (-1 = any)
    outputs: tuple[str, ...]


@dataclass(repr=False)  # a failing example prints the target: keep it short
class Target:
    server: Server
    stub: Stub
    contracts: dict[str, Contract]
    regions: dict[str, object]  # registered region name -> tritonclient shm handle
    keys: dict[str, str]  # region name -> POSIX shm key
    worker: int

    @property
    def places(self) -> list[str]:
        return sorted(self.regions)

    def __repr__(self) -> str:
        return f"Target({self.server.url})"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:  # what hypothesis prints
        p.text(repr(self))  # type: ignore[attr-defined]


def contract(stub: Stub, model: str) -> Contract:
    meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    config = stub.ModelConfig(pb.ModelConfigRequest(name=model), timeout=10).config
    batched = config.max_batch_size > 0
    return Contract(
        config.max_batch_size,
        tuple(
            (t.name, t.datatype, tuple(t.shape[1:] if batched else t.shape)) for t in meta.inputs
        ),
        tuple(t.name for t in meta.outputs),
    )


def register(stub: Stub, keys: dict[str, str]) -> None:
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=SYS, key=keys[SYS], byte_size=REGION_BYTES),
        timeout=10,
    )
    if CUDA in keys:
        stub.CudaSharedMemoryRegister(
            pb.CudaSharedMemoryRegisterRequest(
                name=CUDA, raw_handle=fake_handle(keys[CUDA]), device_id=0, byte_size=REGION_BYTES
            ),
            timeout=10,
        )


def fuzz_repository(source: Path, root: Path) -> Path:
    """`source`'s models (linked), and BATCHED's copies with dynamic batching."""
    root.mkdir(parents=True)
    for entry in source.iterdir():
        (root / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    for name, of in BATCHED.items():
        (root / name).mkdir()
        (root / name / "1").symlink_to((source / of / "1").resolve(), target_is_directory=True)
        config = (source / of / "config.pbtxt").read_text()
        config = config.replace(f'name: "{of}"', f'name: "{name}"')
        config += "dynamic_batching { max_queue_delay_microseconds: 5000 }\n"
        (root / name / "config.pbtxt").write_text(config)
    return root


@pytest.fixture(scope="module", params=SERVERS)
def target(
    request: pytest.FixtureRequest,
    model_repository: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Target]:
    args = {
        "sessions": (*ARGS, "--tracing", "console"),  # trace context headers are parsed
        "cpu-graphs": (*ARGS, "--cpu-graphs", "true"),
        "device": ("--allow-client-shm", "true", "--device", DEVICE),
    }[request.param]
    names = (SYS,) if request.param == "device" else (SYS, CUDA)
    keys = {r: f"/mt-fuzz-{r}-{os.getpid()}-{request.param}" for r in names}
    regions = {r: shm.create_shared_memory_region(r, k, REGION_BYTES) for r, k in keys.items()}
    log_dir = tmp_path_factory.mktemp("fuzz")
    repo = fuzz_repository(model_repository, log_dir / "models")
    try:
        with (
            running_server(repo, log_dir, args, start_timeout=300) as s,
            grpc.insecure_channel(s.url) as channel,
        ):
            stub = Stub(channel)
            register(stub, keys)
            contracts = {m: contract(stub, m) for m in MODELS}
            yield Target(s, stub, contracts, regions, keys, s.worker_pid())
            # No exception logged (spans on the console carry their own stack traces).
            log = s.log()
            assert '"exc": "Traceback' not in log and "internal error" not in log, log[-6000:]
    finally:
        for handle in regions.values():
            shm.destroy_shared_memory_region(handle)


# ----------------------------------------------------------------------------- the requests


@dataclass
class Case:
    """A request, and the region writes to make before sending it."""

    req: pb.ModelInferRequest
    writes: list[tuple[str, int, bytes]] = field(default_factory=list)

    def __repr__(self) -> str:  # the request without its tensors' bytes
        head = pb.ModelInferRequest()
        head.CopyFrom(self.req)
        del head.raw_input_contents[:]
        sizes = [len(r) for r in self.req.raw_input_contents]
        writes = [(r, o, len(b)) for r, o, b in self.writes]
        return f"Case({head}raw sizes {sizes}, writes {writes})"

    def _repr_pretty_(self, p: object, cycle: bool) -> None:
        p.text(repr(self))  # type: ignore[attr-defined]


INTEGERS = st.integers(-99, 99).map(lambda v: str(v).encode())  # what simple_string parses
TEXT_ELEMENTS = st.text(max_size=6).map(str.encode)
# One kind of BYTES element per request, so that whole tensors of each kind occur.
ELEMENTS = st.sampled_from(
    [INTEGERS, TEXT_ELEMENTS, st.one_of(INTEGERS, TEXT_ELEMENTS, st.binary(max_size=6))]
)


def encode(datatype: str, n: int, data: st.DataObject, elements: st.SearchStrategy[bytes]) -> bytes:
    """n elements of `datatype` as raw bytes (BYTES: 4-byte little-endian length + bytes)."""
    if datatype == "BYTES":
        items = data.draw(st.lists(elements, min_size=n, max_size=n))
        return b"".join(struct.pack("<I", len(b)) + b for b in items)
    if datatype == "BOOL":
        return bytes(data.draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    size = n * ITEMSIZE[datatype]
    return data.draw(st.binary(min_size=size, max_size=size))


def good_case(c: Contract, model: str, data: st.DataObject) -> Case:
    case = Case(pb.ModelInferRequest(model_name=model))
    batch = data.draw(st.integers(1, c.max_batch)) if c.max_batch else None
    free = data.draw(st.integers(0, 5))  # one size for every -1 dim
    elements = data.draw(ELEMENTS)
    for name, datatype, dims in c.inputs:
        shape = [batch] if batch is not None else []
        shape += [free if d < 0 else d for d in dims]
        raw = encode(datatype, int(np.prod(shape)), data, elements)
        case.req.inputs.add(name=name, datatype=datatype, shape=shape)
        case.req.raw_input_contents.append(raw)
    return case


def placed(params: object, region: str, offset: int, size: int) -> None:
    params["shared_memory_region"].string_param = region  # type: ignore[index]
    params["shared_memory_byte_size"].int64_param = size  # type: ignore[index]
    params["shared_memory_offset"].int64_param = offset  # type: ignore[index]


def odd_shm_params(params: object, data: st.DataObject) -> None:
    params["shared_memory_region"].string_param = data.draw(st.sampled_from(REGIONS))  # type: ignore[index]
    size = data.draw(st.sampled_from([0, 1, 4, 16, 64, 4096, 4097, -4, 1 << 40]))
    if data.draw(st.integers(0, 3)):
        params["shared_memory_byte_size"].int64_param = size  # type: ignore[index]
    else:  # the wrong kind of parameter
        params["shared_memory_byte_size"].string_param = str(size)  # type: ignore[index]
    if data.draw(st.booleans()):
        offset = data.draw(st.sampled_from([0, 4, 3, 4092, 4096, -8, 1 << 62]))
        params["shared_memory_offset"].int64_param = offset  # type: ignore[index]


def place_input(case: Case, i: int, data: st.DataObject, places: list[str]) -> None:
    """Input i's bytes into a registered region, as a client would put them (valid)."""
    req = case.req
    if len(req.raw_input_contents) != len(req.inputs):
        return  # which raw entry is whose is no longer clear
    raw = req.raw_input_contents[i]
    offset = data.draw(st.sampled_from([0, 64, 1024]))
    if len(raw) > HALF - offset:
        return
    region = data.draw(st.sampled_from(places))
    placed(req.inputs[i].parameters, region, offset, len(raw))
    case.writes.append((region, offset, raw))
    del req.raw_input_contents[i]


def mutate(case: Case, c: Contract, data: st.DataObject, places: list[str]) -> None:
    """One change that may or may not make the request invalid."""
    req = case.req
    kinds = ["drop", "double", "rename", "datatype", "shape", "bytes", "typed", "raws",
             "odd_shm", "place_in", "place_out", "outputs", "parameters", "version", "model",
             "id"]  # fmt: skip
    kind = data.draw(st.sampled_from(kinds))
    n = len(req.inputs)
    i = data.draw(st.integers(0, n - 1)) if n else None
    if kind == "drop" and i is not None:
        del req.inputs[i]
        if i < len(req.raw_input_contents):
            del req.raw_input_contents[i]
    elif kind == "double" and i is not None:
        req.inputs.add().CopyFrom(req.inputs[i])
        if i < len(req.raw_input_contents):
            req.raw_input_contents.append(req.raw_input_contents[i])
    elif kind == "rename" and i is not None:
        req.inputs[i].name = data.draw(st.sampled_from(["", "INPUT0", "INPUT1", "IN", "TAG", "x"]))
    elif kind == "datatype" and i is not None:
        req.inputs[i].datatype = data.draw(st.sampled_from([*DATATYPES, "", "fp32", "FLOAT"]))
    elif kind == "shape" and i is not None:
        dims = st.one_of(st.integers(-2, 20), st.sampled_from([1 << 31, 1 << 40, (1 << 63) - 1]))
        del req.inputs[i].shape[:]
        req.inputs[i].shape.extend(data.draw(st.lists(dims, max_size=4)))
    elif kind == "bytes" and i is not None and i < len(req.raw_input_contents):
        raw = req.raw_input_contents[i]
        cut = data.draw(st.integers(-len(raw), 9))
        req.raw_input_contents[i] = raw[:cut] if cut < 0 else raw + b"\x01" * cut
    elif kind == "typed" and i is not None:  # typed contents instead of (or beside) raw bytes
        values = data.draw(st.lists(st.integers(-3, 3), max_size=40))
        contents = req.inputs[i].contents
        typed = ["int_contents", "fp32_contents", "bytes_contents", "bool_contents",
                 "uint64_contents", "int64_contents", "fp64_contents", "uint_contents"]  # fmt: skip
        name = data.draw(st.sampled_from(typed))
        if name == "bytes_contents":
            contents.bytes_contents.extend(str(v).encode() for v in values)
        elif name == "bool_contents":
            contents.bool_contents.extend(v > 0 for v in values)
        elif name.startswith("uint"):
            getattr(contents, name).extend(abs(v) for v in values)
        else:
            getattr(contents, name).extend(values)
        if data.draw(st.booleans()):
            del req.raw_input_contents[:]
    elif kind == "raws":
        extra = data.draw(st.integers(-len(req.raw_input_contents), 2))
        if extra < 0:
            del req.raw_input_contents[extra:]
        else:
            req.raw_input_contents.extend([b"\x00" * 4] * extra)
    elif kind == "odd_shm" and i is not None:
        odd_shm_params(req.inputs[i].parameters, data)
        if data.draw(st.booleans()):
            del req.raw_input_contents[:]
    elif kind == "place_in" and i is not None and places:
        place_input(case, i, data, places)
    elif kind == "place_out" and c.outputs and places:
        out = req.outputs.add(name=data.draw(st.sampled_from(c.outputs)))
        offset = data.draw(st.sampled_from([HALF, HALF + 64, REGION_BYTES - 64]))
        size = data.draw(st.sampled_from([REGION_BYTES - offset, 64, 4]))
        placed(out.parameters, data.draw(st.sampled_from(places)), offset, size)
    elif kind == "outputs":
        names = st.sampled_from(["OUTPUT0", "OUTPUT1", "OUT", "TAG_OUT", "nope", ""])
        for name in data.draw(st.lists(names, max_size=3)):
            out = req.outputs.add(name=name)
            if data.draw(st.booleans()):
                odd_shm_params(out.parameters, data)
            elif data.draw(st.booleans()):
                out.parameters["classification"].int64_param = data.draw(st.integers(-1, 3))
    elif kind == "parameters":
        key = data.draw(st.sampled_from(["routing_key", "priority", "timeout", "sequence_id",
                                         "binary_data_output", "x"]))  # fmt: skip
        value = data.draw(st.one_of(st.integers(-(1 << 63), (1 << 63) - 1), st.text(max_size=6),
                                    st.booleans()))  # fmt: skip
        p = req.parameters[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        else:
            p.string_param = value
    elif kind == "version":
        versions = ["1", "2", "3", "0", "-1", "01", " 1", "1.0", "x", "99999999999999999999"]
        req.model_version = data.draw(st.sampled_from(versions))
    elif kind == "model":
        req.model_name = data.draw(st.sampled_from(["", "nope", "SIMPLE", "dense/1", NOT_LOADED]))
    elif kind == "id":
        req.id = data.draw(st.text(max_size=20))


@st.composite
def cases(
    draw: st.DrawFn, t: Target, places: list[str] | None = None, model: str | None = None
) -> Case:
    """A request for `model` (default: any of `t`'s), mutated; valid placements in `places`
    (default: every registered region)."""
    data = draw(st.data())
    model = model or draw(st.sampled_from(sorted(t.contracts)))
    case = good_case(t.contracts[model], model, data)
    for _ in range(draw(st.integers(0, 3))):
        mutate(case, t.contracts[model], data, t.places if places is None else places)
    return case


# ----------------------------------------------------------------------------- the checks


def read(t: Target, region: str, offset: int, size: int) -> bytes:
    return shm.get_contents_as_numpy(t.regions[region], np.uint8, [size], offset).tobytes()


def prepare(t: Target, case: Case) -> dict[str, bytes]:
    """Make the case's writes; returns the regions as the server will find them."""
    for handle in t.regions.values():  # outputs' half zeroed: a missed write cannot pass
        shm.set_shared_memory_region(handle, [np.zeros(HALF, np.uint8)], offset=HALF)
    for region, offset, raw in case.writes:
        shm.set_shared_memory_region(t.regions[region], [np.frombuffer(raw, np.uint8)], offset)
    return {r: read(t, r, 0, REGION_BYTES) for r in t.regions}


def check_ok(
    t: Target,
    case: Case,
    image: dict[str, bytes],
    resp: pb.ModelInferResponse,
    *,
    shared: bool = False,
) -> None:
    """`shared`: other requests in flight may write the regions, so what a region holds is
    not checked (for this request's outputs, nor as its inputs)."""
    req = case.req
    assert resp.model_name == req.model_name
    asked = {o.name: o.parameters for o in req.outputs}
    # As Triton: one raw entry per output, in order, left empty for an output in a region.
    assert len(resp.raw_output_contents) == len(resp.outputs), resp
    got: dict[str, bytes] = {}
    spans = placed_spans(req)
    for out, body in zip(resp.outputs, resp.raw_output_contents, strict=True):
        params = asked.get(out.name, {})
        if "shared_memory_region" in params:
            region, offset, _ = where(params)
            assert out.parameters["shared_memory_region"].string_param == region, out
            assert body == b"", out
            size = out.parameters["shared_memory_byte_size"].int64_param  # what was written
            if out.datatype != "BYTES":
                assert size == int(np.prod(out.shape)) * ITEMSIZE[out.datatype], out
            if not shared and not overlaps(spans, (region, offset, offset + size)):
                got[out.name] = read(t, region, offset, size)
            continue
        if out.datatype != "BYTES":
            assert len(body) == int(np.prod(out.shape)) * ITEMSIZE[out.datatype], (out, body)
        got[out.name] = body
    in_regions = any("shared_memory_region" in i.parameters for i in req.inputs)
    sent = None if shared and in_regions else sent_bytes(case, image)
    if sent is None:
        return
    if req.model_name in IDENTITIES and len(req.inputs) == 1 and len(resp.outputs) == 1:
        (inp,), (out,) = req.inputs, resp.outputs
        assert list(out.shape) == list(inp.shape), (out, inp)
        if out.name in got:
            assert got[out.name] == sent[inp.name], (got, sent)
    elif req.model_name in SUMS:
        a, b = (np.frombuffer(sent[n], np.int32) for n in ("INPUT0", "INPUT1"))
        expected = {"OUTPUT0": (a + b).tobytes(), "OUTPUT1": (a - b).tobytes()}
        for name, body in got.items():
            assert body == expected[name], (name, body, expected[name])
    elif req.model_name in PARSES and (numbers := decimal_strings(case)) is not None:
        a, b = (np.array(numbers[n]) for n in ("INPUT0", "INPUT1"))
        expected = {"OUTPUT0": a + b, "OUTPUT1": a - b}
        for name, body in got.items():
            values = [int(v) for v in deserialize_bytes_tensor(body)]
            assert values == expected[name].tolist(), (name, values, expected[name])


def decimal_strings(case: Case) -> dict[str, list[int]] | None:
    """The integers a request's text inputs hold when every element is a small decimal
    integer and every input is raw BYTES (what simple_string parses for sure); else None."""
    req = case.req
    if len(req.raw_input_contents) != len(req.inputs):
        return None
    numbers: dict[str, list[int]] = {}
    for inp, raw in zip(req.inputs, req.raw_input_contents, strict=True):
        if inp.datatype != "BYTES" or inp.parameters or inp.HasField("contents"):
            return None
        try:
            items = deserialize_bytes_tensor(raw)
        except Exception:  # malformed on purpose: not a case for this check
            return None
        if len(items) != int(np.prod(inp.shape)) or not all(DECIMAL.fullmatch(v) for v in items):
            return None
        numbers[inp.name] = [int(v) for v in items]
    return numbers


def where(params: Mapping[str, pb.InferParameter]) -> tuple[str, int, int]:
    """A tensor's region, offset and byte size (reading a map adds no key, unlike `[]`)."""

    def number(key: str) -> int:
        return params[key].int64_param if key in params else 0

    region = params["shared_memory_region"].string_param
    return region, number("shared_memory_offset"), number("shared_memory_byte_size")


def placed_spans(req: pb.ModelInferRequest) -> list[tuple[str, int, int]]:
    """Where the request puts its outputs: (region, start, end of its byte_size)."""
    spans = []
    for o in req.outputs:
        if "shared_memory_region" in o.parameters:
            region, start, size = where(o.parameters)
            spans.append((region, start, start + size))
    return spans


def overlaps(spans: list[tuple[str, int, int]], written: tuple[str, int, int]) -> bool:
    """Whether another output may have written over `written` (a client may place two outputs
    in one place, as Triton allows; the last one written is what stays)."""
    region, start, end = written
    return sum(r == region and s < end and start < e for r, s, e in spans) > 1


def sent_bytes(case: Case, image: dict[str, bytes]) -> dict[str, bytes] | None:
    """Each input's bytes as the server must have read them: raw, or from the regions as they
    were when the request was sent (`image`); None for typed contents, left alone here."""
    raws = iter(case.req.raw_input_contents)
    sent: dict[str, bytes] = {}
    for inp in case.req.inputs:
        if inp.HasField("contents"):
            return None
        params = inp.parameters
        if "shared_memory_region" in params:
            region, offset, size = where(params)
            sent[inp.name] = bytes(image[region][offset : offset + size])
        else:
            sent[inp.name] = next(raws)
    return sent


def check_error(case: Case, code: Code, details: str) -> None:
    req = case.req
    assert details and "internal error" not in details, (code, details, req)
    if code == Code.UNAVAILABLE and req.model_name == NOT_LOADED:
        assert f"'{NOT_LOADED}'" in details, details
    elif code == Code.UNIMPLEMENTED and any("classification" in o.parameters for o in req.outputs):
        assert "classification is not supported" in details, details
    elif code == Code.INTERNAL and req.model_name in PARSES:
        assert f"model '{req.model_name}' version 1 failed: " in details, details
        assert not decimal_strings(case), ("text every element of which parses failed", req)
    elif code == Code.DEADLINE_EXCEEDED and own_timeout(req):
        assert "deadline" in details, details  # (its own `timeout` parameter, microseconds)
    else:
        assert code in CLIENT_ERRORS, (code, details, req)


def own_timeout(req: pb.ModelInferRequest) -> bool:
    """Whether the request sets Triton's `timeout` parameter: a deadline of its own."""
    p = req.parameters.get("timeout")
    return p is not None and p.WhichOneof("parameter_choice") == "int64_param" and p.int64_param > 0


# Request headers the server reads (routing hints, W3C trace context), with odd values.
ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
HEADER_KEYS = ["x-model-version", "x-routing-key", "x-canary-weight", "traceparent",
               "tracestate", "baggage"]  # fmt: skip
ZERO_IDS = "00-" + "0" * 32 + "-" + "0" * 16 + "-01"  # invalid: all-zero trace and span ids
HEADER_VALUES = ["1", "2", "0", "-1", "1e3", "50", "100.5", TRACEPARENT,
                 TRACEPARENT.replace("01", "zz"), ZERO_IDS]  # fmt: skip
HEADERS = st.lists(
    st.tuples(st.sampled_from(HEADER_KEYS), st.one_of(ASCII, st.sampled_from(HEADER_VALUES))),
    max_size=3,
)

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(data=st.data())
def test_any_infer_request_gets_a_result_or_a_client_error(
    target: Target, data: st.DataObject
) -> None:
    case = data.draw(cases(target))
    metadata = data.draw(HEADERS)
    image = prepare(target, case)
    try:
        resp = target.stub.ModelInfer(case.req, timeout=10, metadata=metadata)
    except grpc.RpcError as e:
        check_error(case, e.code(), e.details() or "")
    else:
        check_ok(target, case, image, resp)
    assert_still_serving(target.stub)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_a_stream_answers_every_request_in_order_whatever_they_are(
    target: Target, data: st.DataObject
) -> None:
    batch = data.draw(st.lists(cases(target), min_size=1, max_size=4))
    for i, case in enumerate(batch):
        case.req.id = f"fz-{i}"
    # Placements may overlap across the stream's requests: only answers are checked here.
    prepare(target, Case(pb.ModelInferRequest(), writes=[w for c in batch for w in c.writes]))
    answers = list(target.stub.ModelStreamInfer(iter([c.req for c in batch]), timeout=20))
    assert len(answers) == len(batch)
    for case, a in zip(batch, answers, strict=True):
        if a.error_message:
            assert "internal error" not in a.error_message, (a.error_message, case.req)
        else:
            assert a.infer_response.id == case.req.id
    assert_still_serving(target.stub)


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_requests_in_flight_together_are_each_answered_as_alone(
    target: Target, data: st.DataObject
) -> None:
    """Up to 8 requests at once, so that a batched version batches odd ones beside good ones:
    each gets the answer it would get alone. None is placed in a region (requests in flight
    together would write over each other's places)."""
    model = data.draw(st.sampled_from([None, *BATCHED]))  # often one batched model for all
    batch = data.draw(st.lists(cases(target, places=[], model=model), min_size=2, max_size=8))
    image = prepare(target, Case(pb.ModelInferRequest()))
    with cf.ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(target.stub.ModelInfer, c.req, timeout=10) for c in batch]
    for case, future in zip(batch, futures, strict=True):
        try:
            resp = future.result()
        except grpc.RpcError as e:
            check_error(case, e.code(), e.details() or "")
        else:
            check_ok(target, case, image, resp, shared=True)
    assert_still_serving(target.stub)


# ------------------------------------------------------------------------- the other RPCs

TEXT = st.one_of(
    st.sampled_from(["", "simple", "dense", NOT_LOADED, SYS, CUDA]), st.text(max_size=8)
)
VERSION = st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "x"]), st.text(max_size=4))
SIZE = st.sampled_from([0, 1, 64, 4096, 4097, 1 << 40, (1 << 64) - 1])
HANDLE = st.binary(min_size=64, max_size=64)  # a cudaIpcMemHandle_t's size
KEYS = st.sampled_from(["", "nope", "/nope", "/a/b", "/../etc", "/dev/shm/x"])

CALLS: dict[str, Callable[[Target, st.DataObject], object]] = {
    "ModelReady": lambda t, d: t.stub.ModelReady(
        pb.ModelReadyRequest(name=d.draw(TEXT), version=d.draw(VERSION)), timeout=10
    ),
    "ModelMetadata": lambda t, d: t.stub.ModelMetadata(
        pb.ModelMetadataRequest(name=d.draw(TEXT), version=d.draw(VERSION)), timeout=10
    ),
    "ModelConfig": lambda t, d: t.stub.ModelConfig(
        pb.ModelConfigRequest(name=d.draw(TEXT), version=d.draw(VERSION)), timeout=10
    ),
    "ModelStatistics": lambda t, d: t.stub.ModelStatistics(
        pb.ModelStatisticsRequest(name=d.draw(TEXT), version=d.draw(VERSION)), timeout=10
    ),
    "SystemSharedMemoryStatus": lambda t, d: t.stub.SystemSharedMemoryStatus(
        pb.SystemSharedMemoryStatusRequest(name=d.draw(TEXT)), timeout=10
    ),
    "CudaSharedMemoryStatus": lambda t, d: t.stub.CudaSharedMemoryStatus(
        pb.CudaSharedMemoryStatusRequest(name=d.draw(TEXT)), timeout=10
    ),
    "SystemSharedMemoryRegister": lambda t, d: t.stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(
            name=d.draw(TEXT),
            key=d.draw(st.one_of(KEYS, st.sampled_from(list(t.keys.values())))),
            offset=d.draw(SIZE),
            byte_size=d.draw(SIZE),
        ),
        timeout=10,
    ),
    "CudaSharedMemoryRegister": lambda t, d: t.stub.CudaSharedMemoryRegister(
        pb.CudaSharedMemoryRegisterRequest(
            name=d.draw(TEXT),
            raw_handle=d.draw(
                st.one_of(st.binary(max_size=80), st.binary(min_size=64, max_size=64))
            ),
            device_id=d.draw(st.sampled_from([0, 1, -1, 1 << 40])),
            byte_size=d.draw(SIZE),
        ),
        timeout=10,
    ),
    "RepositoryModelLoad": lambda t, d: t.stub.RepositoryModelLoad(
        pb.RepositoryModelLoadRequest(model_name=d.draw(TEXT)), timeout=10
    ),
    "RepositoryModelUnload": lambda t, d: t.stub.RepositoryModelUnload(
        pb.RepositoryModelUnloadRequest(model_name=d.draw(TEXT)), timeout=10
    ),
}
# Each RPC's answers besides OK. Load and unload are UNIMPLEMENTED without model control.
OTHER_ERRORS = CLIENT_ERRORS | {Code.ALREADY_EXISTS}
CONTROL_OFF = {Code.UNIMPLEMENTED, Code.INVALID_ARGUMENT}


@FUZZ
@given(data=st.data())
def test_the_model_and_shared_memory_rpcs_answer_any_arguments(
    target: Target, data: st.DataObject
) -> None:
    rpc = data.draw(st.sampled_from(sorted(CALLS)))
    try:
        CALLS[rpc](target, data)
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        assert details and "internal error" not in details, (rpc, code, details)
        allowed = CONTROL_OFF if rpc.startswith("Repository") else OTHER_ERRORS
        if code == Code.UNAVAILABLE:  # only the model that failed to load is not ready
            assert f"'{NOT_LOADED}'" in details, (rpc, details)
        elif DEVICE == "cpu" and rpc == "CudaSharedMemoryRegister" and code == Code.UNIMPLEMENTED:
            assert "no CUDA device" in details, details  # a rehearsal of the GPU run, no fakes
        else:
            assert code in allowed, (rpc, code, details)
    else:
        if rpc.endswith("Register"):  # a new region: gone again, ours untouched
            status = target.stub.SystemSharedMemoryStatus(
                pb.SystemSharedMemoryStatusRequest(), timeout=10
            )
            cuda = target.stub.CudaSharedMemoryStatus(
                pb.CudaSharedMemoryStatusRequest(), timeout=10
            )
            for name in set(status.regions) - {SYS, CUDA}:
                target.stub.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10
                )
            for name in set(cuda.regions) - {SYS, CUDA}:
                target.stub.CudaSharedMemoryUnregister(
                    pb.CudaSharedMemoryUnregisterRequest(name=name), timeout=10
                )
    assert_still_serving(target.stub)


def test_the_worker_never_restarted(target: Target) -> None:
    """Runs after the property tests in this module (pytest keeps file order)."""
    assert_still_serving(target.stub)
    assert target.server.worker_pid() == target.worker
