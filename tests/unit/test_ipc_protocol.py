"""runtime.ipc.protocol: every message round-trips through a frame; anything else is rejected."""

from __future__ import annotations

import pickle
import typing

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.ipc.protocol import (
    FRAME_HEADER,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Attach,
    Cancel,
    CloseRegion,
    Code,
    FrameReader,
    FrontMessage,
    GetStatus,
    Hello,
    Infer,
    InferDone,
    LoadDone,
    LoadModel,
    ModelSignature,
    OpenRegion,
    OutputData,
    OutputRequest,
    QueuedCalls,
    RegionDone,
    Shutdown,
    TensorInfo,
    TensorRef,
    Timings,
    UnloadDone,
    UnloadModel,
    Welcome,
    WorkerMessage,
    WorkerStatus,
    decode_front,
    decode_worker,
    encode,
)

SIG = ModelSignature(
    inputs=(TensorInfo("INPUT0", "INT32", (-1, 16)), TensorInfo("INPUT1", "BYTES", (-1, -1))),
    outputs=(TensorInfo("OUTPUT0", "FP32", (-1, 10)),),
)

FRONT: list[FrontMessage] = [
    Hello(PROTOCOL_VERSION, 7, "/microtune-123-1", 64 * 1024 * 1024),
    LoadModel(1, "simple", 1, "/repo/simple/1/model.onnx", 8, SIG),
    LoadModel(2, "plain", 3, "/repo/plain/3/model.onnx", 0, ModelSignature((), ()), 4),
    UnloadModel(3, "simple", 1),
    Infer(
        call_id=42,
        name="simple",
        version=1,
        inputs=(
            TensorRef("INPUT0", "INT32", (1, 16), 0, 64),
            TensorRef("INPUT1", "BYTES", (1, 2), 128, 13),
        ),
        outputs=(OutputRequest("OUTPUT0"),),
        out_offset=4096,
        out_capacity=8192,
        deadline_ns=123_456_789,
    ),
    Infer(1, "m", 2, (), (), 0, 0),
    Infer(  # tensors in a client CUDA shared-memory region
        call_id=43,
        name="id",
        version=1,
        inputs=(TensorRef("IN", "FP32", (2, 4), 256, 32, "gpu0"),),
        outputs=(OutputRequest("OUT", "gpu0", 1024, 32),),
        out_offset=0,
        out_capacity=0,
        bound=True,
    ),
    Cancel(42, "simple", 1),
    GetStatus(5),
    OpenRegion(6, "gpu0", bytes(range(64)), 0, 1 << 20),
    CloseRegion(7, "gpu0"),
    CloseRegion(8, ""),
    Shutdown(),
    Attach(7),
]

WORKER: list[WorkerMessage] = [
    Welcome(PROTOCOL_VERSION, 999, "cpu", ("CPUExecutionProvider",)),
    Welcome(PROTOCOL_VERSION, 1, "cuda:0", ("CUDAExecutionProvider", "CPUExecutionProvider"), 3),
    LoadDone(1, Code.OK, signature=SIG, load_ns=5_000_000),
    LoadDone(2, Code.BAD_INPUT, "config input 'x' is not an input of the ONNX graph"),
    LoadDone(3, Code.OK, signature=SIG, reused=True, channel="/run/microtune/worker.sock.4"),
    UnloadDone(3),
    RegionDone(6, Code.OK),
    RegionDone(7, Code.UNSUPPORTED, "this server's worker has no CUDA device"),
    InferDone(
        42,
        Code.OK,
        outputs=(
            OutputData("OUTPUT0", "FP32", (1, 10), 4096, 40),
            OutputData("OUTPUT1", "BYTES", (1, 2), 0, 10, inline=b"\x01\x00\x00\x00a\x00\xff"),
        ),
        timings=Timings(queue_ns=1, input_ns=2, infer_ns=3, output_ns=4, batch_size=8),
    ),
    InferDone(43, Code.MODEL_FAILED, "Cast failed"),
    InferDone(44, Code.DEADLINE),
    InferDone(45, Code.CANCELLED, "cancelled by the client while queued"),
    WorkerStatus(5, (QueuedCalls("dense_large", 1, 3), QueuedCalls("dense", 2, 1)), 1 << 26),
    WorkerStatus(6),
]


def _ids(msgs: list[typing.Any]) -> list[str]:
    return [f"{type(m).__name__}-{i}" for i, m in enumerate(msgs)]


def test_examples_cover_every_message_type() -> None:
    assert {type(m) for m in FRONT} == set(typing.get_args(FrontMessage))
    assert {type(m) for m in WORKER} == set(typing.get_args(WorkerMessage))


def _body(frame: bytes) -> bytes:
    (n,) = FRAME_HEADER.unpack_from(frame)
    assert FRAME_HEADER.size == 4
    assert n == len(frame) - 4 <= MAX_FRAME
    return frame[4:]


@pytest.mark.parametrize("msg", FRONT, ids=_ids(FRONT))
def test_front_message_round_trip(msg: FrontMessage) -> None:
    body = _body(encode(msg))
    back = decode_front(body)
    assert type(back) is type(msg)
    assert back == msg
    assert decode_front(memoryview(body)) == msg


@pytest.mark.parametrize("msg", WORKER, ids=_ids(WORKER))
def test_worker_message_round_trip(msg: WorkerMessage) -> None:
    body = _body(encode(msg))
    back = decode_worker(body)
    assert type(back) is type(msg)
    assert back == msg
    if isinstance(back, LoadDone | InferDone):
        assert isinstance(back.code, Code)


@pytest.mark.parametrize("msg", WORKER, ids=_ids(WORKER))
def test_worker_message_is_not_a_front_message(msg: WorkerMessage) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_front(_body(encode(msg)))


@pytest.mark.parametrize("msg", FRONT, ids=_ids(FRONT))
def test_front_message_is_not_a_worker_message(msg: FrontMessage) -> None:
    with pytest.raises(msgspec.ValidationError):
        decode_worker(_body(encode(msg)))


@pytest.mark.parametrize("msg", FRONT + WORKER, ids=_ids(FRONT + WORKER))
def test_encoding_is_plain_msgpack_without_pickle(
    msg: typing.Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_pickle(*a: object, **k: object) -> typing.NoReturn:
        raise AssertionError("pickle used")

    for name in ("dumps", "loads", "dump", "load"):
        monkeypatch.setattr(pickle, name, no_pickle)
    frame = encode(msg)
    body = _body(frame)
    assert not body.startswith(b"\x80")  # a pickle stream starts with PROTO (0x80)
    generic = msgspec.msgpack.decode(body)  # untyped: only msgpack builtins
    assert isinstance(generic, list)  # array_like structs are msgpack arrays...
    assert generic[0] == type(msg).__struct_config__.tag  # ...led by the tag
    decoder = decode_front if isinstance(msg, typing.get_args(FrontMessage)) else decode_worker
    assert decoder(body) == msg


@pytest.mark.parametrize("decoder", [decode_front, decode_worker])
@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\xc1",  # never-used msgpack byte
        b"\x92\xa5hello",  # array of 2 with only one item
        b"garbage that is not msgpack at all \xff\xfe",
        pickle.dumps(Shutdown()),
    ],
    ids=["empty", "reserved-byte", "truncated", "garbage", "a-pickle"],
)
def test_garbage_raises_decode_error(decoder: typing.Any, body: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        decoder(body)


@pytest.mark.parametrize("decoder", [decode_front, decode_worker])
@pytest.mark.parametrize(
    "value",
    [
        ["bogus"],
        ["bogus", 1, 2],
        [],
        [1, 2, 3],
        {"type": "shutdown"},
        "shutdown",
        None,
        42,
    ],
    ids=["unknown-tag", "unknown-tag-fields", "no-tag", "int-tag", "map", "str", "nil", "int"],
)
def test_unknown_or_missing_tag_raises_validation_error(decoder: typing.Any, value: object) -> None:
    body = msgspec.msgpack.encode(value)
    with pytest.raises(msgspec.ValidationError):
        decoder(body)
    assert issubclass(msgspec.ValidationError, msgspec.DecodeError)


@pytest.mark.parametrize(
    ("value", "where"),
    [
        (["unload", 1, "simple"], "Expected `array` of at least length 4"),  # missing field
        (["unload", "1", "simple", 1], "Expected `int`, got `str` - at `$[1]`"),
        (["hello", 1, 2, "/x", "big"], "at `$[4]`"),
        (["infer", 1, "m", 1, [["x"]], [], 0, 0], "$[4][0]"),
    ],
    ids=["missing-field", "wrong-type", "wrong-type-late", "bad-nested"],
)
def test_malformed_front_fields_raise_validation_error(value: list[object], where: str) -> None:
    with pytest.raises(msgspec.ValidationError) as info:
        decode_front(msgspec.msgpack.encode(value))
    assert where in str(info.value)


def test_unknown_code_is_rejected() -> None:
    body = msgspec.msgpack.encode(["done", 1, 99])
    with pytest.raises(msgspec.ValidationError, match="Invalid enum value 99"):
        decode_worker(body)


def test_trailing_defaults_may_be_left_out() -> None:
    assert decode_worker(msgspec.msgpack.encode(["done", 1, 0])) == InferDone(1, Code.OK)
    assert decode_front(msgspec.msgpack.encode(["infer", 1, "m", 1, [], [], 0, 0])) == Infer(
        1, "m", 1, (), (), 0, 0, 0
    )
    assert _body(encode(Shutdown())) == msgspec.msgpack.encode(["shutdown"])


def test_messages_are_frozen() -> None:
    msg = UnloadModel(1, "m", 1)
    with pytest.raises(AttributeError):
        msg.name = "other"  # type: ignore[misc]


tensor_refs = st.builds(
    TensorRef,
    name=st.text(max_size=20),
    datatype=st.sampled_from(["FP32", "BYTES", "INT8"]),
    shape=st.lists(st.integers(0, 2**31), max_size=4).map(tuple),
    offset=st.integers(0, 2**62),
    nbytes=st.integers(0, 2**62),
)


@settings(max_examples=100, deadline=None)
@given(
    call_id=st.integers(0, 2**63 - 1),
    inputs=st.lists(tensor_refs, max_size=4).map(tuple),
    outputs=st.lists(st.text(max_size=10).map(OutputRequest), max_size=3).map(tuple),
    deadline_ns=st.integers(0, 2**63 - 1),
)
def test_infer_round_trip_property(
    call_id: int,
    inputs: tuple[TensorRef, ...],
    outputs: tuple[OutputRequest, ...],
    deadline_ns: int,
) -> None:
    msg = Infer(call_id, "model", 1, inputs, outputs, 64, 4096, deadline_ns)
    assert decode_front(_body(encode(msg))) == msg


@settings(max_examples=100, deadline=None)
@given(
    code=st.sampled_from(list(Code)),
    message=st.text(max_size=50),
    inline=st.none() | st.binary(max_size=200),
)
def test_infer_done_round_trip_property(code: Code, message: str, inline: bytes | None) -> None:
    msg = InferDone(5, code, message, (OutputData("o", "BYTES", (2,), 0, 0, inline),), Timings())
    assert decode_worker(_body(encode(msg))) == msg


def test_a_load_is_served_by_the_instance_of_the_same_revision() -> None:
    """The worker loads once what every front asks for with one revision; a new revision (a
    change of the files, a RepositoryModelLoad) loads again; "" takes any revision."""
    sig = ModelSignature((), ())
    loaded = LoadModel(7, "m", 1, "/r/m/1/model.onnx", 8, sig, revision="abc").identity()
    assert loaded.request_id == 0
    assert LoadModel(9, "m", 1, "/r/m/1/model.onnx", 8, sig, revision="abc").served_by(loaded)
    assert not LoadModel(9, "m", 1, "/r/m/1/model.onnx", 8, sig, revision="abc/t").served_by(loaded)
    assert LoadModel(9, "m", 1, "/r/m/1/model.onnx", 8, sig).served_by(loaded)
    assert not LoadModel(9, "m", 1, "/r/m/1/model.onnx", 4, sig).served_by(loaded)  # config
    assert not LoadModel(9, "m", 1, "/o/m/1/model.onnx", 8, sig).served_by(loaded)  # path
    assert not LoadModel(9, "m", 1, "/r/m/1/model.onnx", 8, sig).served_by(None)


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.sampled_from([0, 1, 7, 300, 70_000]), min_size=1, max_size=6),
    cuts=st.lists(st.integers(1, 20_000), min_size=1, max_size=40),
)
def test_frame_reader_yields_every_frame_however_the_stream_is_cut(
    sizes: list[int], cuts: list[int]
) -> None:
    """Frames of any size, large ones spanning many reads (kept until whole), headers cut
    anywhere: each body comes out once, in order."""
    bodies = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    stream = b"".join(FRAME_HEADER.pack(len(b)) + b for b in bodies)
    reader, got, pos, k = FrameReader(), [], 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        got += [bytes(b) for b in reader.frames(memoryview(stream[pos : pos + step]))]
        pos, k = pos + step, k + 1
    assert got == bodies


def test_frame_reader_refuses_a_frame_over_its_limit() -> None:
    reader = FrameReader(max_frame=100)
    with pytest.raises(ValueError, match="frame of 101 bytes"):
        list(reader.frames(memoryview(FRAME_HEADER.pack(101) + b"x" * 10)))
