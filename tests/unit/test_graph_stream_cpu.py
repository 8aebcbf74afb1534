"""GraphSet's copy-stream path without a GPU: runtime.engine.copy_stream.HostStream performs the
stream's copies as memmoves between host addresses (CPU OrtValues' data_ptr), so the order of
the calls, what is gathered and what is copied straight from each request, the padding, the
row offsets and the outputs coming back into the output staging are all checked here; the CUDA
stream itself runs in tests/gpu."""

from __future__ import annotations

import contextlib
import gc
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from graph_models import cpu_session, gm, rows

from runtime.engine.buckets import BucketTable
from runtime.engine.copy_stream import HostStream
from runtime.engine.graphs import GraphSet
from runtime.engine.session import signature_of

pytest.importorskip("onnx")

Array = npt.NDArray[Any]


def streamed(model: Any, sizes: tuple[int, ...] = (1, 2, 4, 8)) -> tuple[GraphSet, HostStream]:
    sess = cpu_session(model)
    stream = HostStream()
    gs = GraphSet(sess, BucketTable(sizes), signature_of(sess), device_type="cpu", stream=stream)
    gs.capture()
    stream.calls.clear()
    return gs, stream


def assert_bucket_4_holds(gs: GraphSet, x: Array) -> None:
    """Bucket 4's bound input holds `x`'s 3 rows, then a zeroed row of padding."""
    bound = gs.bucket(4).inputs["INPUT0"].numpy()
    np.testing.assert_array_equal(bound[:3], x)
    assert not bound[3:].any()  # zeroed, whatever a fuller batch left there


def assert_outputs_of(
    model: Any,
    inputs: list[Array],
    outputs: list[list[Array]],
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Each request's output is what a plain CPU session computes for its input."""
    ref = cpu_session(model)
    for x, (out,) in zip(inputs, outputs, strict=True):
        np.testing.assert_allclose(out, ref.run(None, {"INPUT0": x})[0], rtol=rtol, atol=atol)


@pytest.mark.parametrize("split", [[1], [3], [1, 1, 1], [2, 3], [1, 2, 4, 1], [5, 3]])
def test_streamed_replay_matches_a_plain_run(split: list[int]) -> None:
    model = gm.mlp()
    gs, _ = streamed(model)
    parts = [rows(n, seed=i) for i, n in enumerate(split)]
    result = gs.run([{"INPUT0": p} for p in parts])
    assert result.replayed and result.rows == sum(split)
    assert [out.shape for (out,) in result.outputs] == [(n, 10) for n in split]
    assert_outputs_of(model, parts, result.outputs)


def test_small_requests_are_gathered_then_copied_once_and_synchronised_once() -> None:
    """1 KiB rows are gathered into the staging and copied in one call; the padding is zeroed
    on the device, not in the staging (whose rows past the batch are stale)."""
    model = gm.mlp()
    gs, stream = streamed(model, (4,))
    gs.run([{"INPUT0": rows(2, seed=1)}, {"INPUT0": rows(2, seed=2)}])  # fills the bucket
    assert stream.calls == ["to_device", "to_host", "synchronize"]
    stream.calls.clear()
    parts = [rows(1, seed=3), rows(2, seed=4)]
    result = gs.run([{"INPUT0": p} for p in parts])
    assert stream.calls == ["to_device", "zero", "to_host", "synchronize"]
    assert_bucket_4_holds(gs, np.concatenate(parts))
    assert_outputs_of(model, parts, result.outputs)


def test_one_request_is_copied_from_where_it_is_and_the_padding_zeroed_on_the_device() -> None:
    model = gm.mlp()
    gs, stream = streamed(model, (4,))
    gs.run([{"INPUT0": rows(4, seed=9)}])  # fills the bucket: no zeroing
    assert stream.calls == ["to_device", "to_host", "synchronize"]
    stream.calls.clear()
    x = rows(3, seed=3)
    result = gs.run([{"INPUT0": x}])
    assert stream.calls == ["to_device", "zero", "to_host", "synchronize"]
    assert_bucket_4_holds(gs, x)
    assert_outputs_of(model, [x], result.outputs)


def test_large_requests_are_each_copied_to_their_row_offset() -> None:
    """Requests of >= 64 KiB each skip the host gather: one copy per request, at its row."""
    width = 16384  # 64 KiB rows
    model = gm.mlp((width, 8, 4))
    gs, stream = streamed(model, (4,))
    parts = [rows(1, width, seed=1), rows(2, width, seed=2)]
    result = gs.run([{"INPUT0": p} for p in parts])
    assert stream.calls == ["to_device", "to_device", "zero", "to_host", "synchronize"]
    assert_bucket_4_holds(gs, np.concatenate(parts))
    assert_outputs_of(model, parts, result.outputs, rtol=1e-4, atol=1e-5)


def test_a_strided_request_is_gathered_not_copied_from_its_address() -> None:
    model = gm.mlp()
    gs, stream = streamed(model, (2,))
    wide = rows(2, 512, seed=4)
    x = wide[:, ::2]  # not contiguous: one address cannot describe it
    result = gs.run([{"INPUT0": x}])
    assert stream.calls == ["to_device", "to_host", "synchronize"]
    assert_outputs_of(model, [np.ascontiguousarray(x)], result.outputs)


def test_only_the_outputs_wanted_on_the_host_come_back() -> None:
    gs, stream = streamed(gm.mlp(), (2,))
    result = gs.run([{"INPUT0": rows(2, seed=5)}], host_outputs=())
    assert stream.calls == ["to_device", "synchronize"]
    (out,) = result.outputs[0]
    assert out.shape == (2, 10) and out.strides == (0, 0)  # a placeholder, no bytes


def test_streamed_outputs_are_valid_until_the_next_run() -> None:
    """The outputs are views of the output staging (no host copy): the caller places them
    before the next run, which reuses that memory."""
    gs, _ = streamed(gm.mlp(), (2,))
    first = gs.run([{"INPUT0": rows(2, seed=1)}]).outputs[0][0]
    kept = first.copy()
    second = gs.run([{"INPUT0": rows(2, seed=2)}]).outputs[0][0]
    assert np.shares_memory(first, second)
    assert not np.array_equal(first, kept)


def test_above_the_largest_bucket_runs_eagerly_without_the_stream() -> None:
    gs, stream = streamed(gm.mlp(), (2,))
    result = gs.run([{"INPUT0": rows(3, seed=6)}])
    assert not result.replayed and stream.calls == []
    assert gs.stats().graphs.eager == {None: 1}


def test_a_replay_that_fails_waits_for_the_copies_it_queued() -> None:
    """The inputs' copies are queued before the replay; when it fails, the stream is
    synchronised before the error leaves, so neither the staging nor the requests' memory (an
    arena slot the answer frees) is reused while a copy may still read it."""
    gs, stream = streamed(gm.mlp(), (4,))

    def fails() -> None:
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : replay failed")

    gs._captured[4].call = fails  # what onnxruntime's replay call does when it fails
    with pytest.raises(RuntimeError, match="replay failed"):
        gs.run([{"INPUT0": rows(3, seed=7)}])
    assert stream.calls == ["to_device", "zero", "synchronize"]


def test_close_drops_the_output_staging_and_the_stream() -> None:
    gs, _ = streamed(gm.mlp(), (2,))
    gs.close()
    with pytest.raises(RuntimeError, match="closed"):
        gs.run([{"INPUT0": rows(1)}])


def test_a_graph_set_dropped_without_close_frees_its_session_before_its_stream() -> None:
    """The native session's destructor may still use the session's stream: a GraphSet that
    is only dropped (tests, the benchmark) must let go of the captured buckets, which hold the
    native session, before the stream."""
    seen: list[bool] = []

    class Stream(HostStream):
        def __del__(self) -> None:
            seen.append(call() is not None)  # a captured replay (the native session) alive?

    sess = cpu_session(gm.mlp())
    stream = Stream()
    sess._microtune_copy_stream = stream  # type: ignore[attr-defined]  # as make_streamed_graph_session
    gs = GraphSet(sess, BucketTable((1, 2)), signature_of(sess), device_type="cpu", stream=stream)
    gs.capture()
    call = weakref.ref(gs._captured[1].call)
    del stream, sess  # the GraphSet (and the session) hold them now
    del gs
    gc.collect()
    assert seen == [False]


def test_rows_in_device_memory_are_copied_by_the_copier_beside_streamed_host_rows() -> None:
    """A request held in a client CUDA region (DeviceRows; host memory with the CPU copier
    here) goes in through the copier, then synchronised; the other input path is unchanged."""
    from runtime.engine.device_rows import DeviceRows
    from runtime.engine.regions import host_copier

    model = gm.mlp()
    sess = cpu_session(model)
    stream = HostStream()
    gs = GraphSet(
        sess,
        BucketTable((4,)),
        signature_of(sess),
        device_type="cpu",
        stream=stream,
        copier=host_copier,
    )
    gs.capture()
    stream.calls.clear()
    a, b = rows(2, seed=1), rows(1, seed=2)
    feeds = [{"INPUT0": DeviceRows(a.ctypes.data, a.shape, a.dtype)}, {"INPUT0": b}]
    result = gs.run(feeds)
    assert stream.calls == ["to_host", "synchronize"]  # the inputs went through the copier
    assert_bucket_4_holds(gs, np.concatenate([a, b]))
    assert_outputs_of(model, [a, b], result.outputs)


def test_outputs_with_places_are_copied_from_the_device_straight_there() -> None:
    """`run(places=...)`: each request's rows of an output land in the array it named (its
    answer's place in the arena), one copy each, and that array is the request's output."""
    model = gm.mlp((16, 32))
    gs, stream = streamed(model, (4,))
    parts = [rows(1, 16, seed=1), rows(2, 16, seed=2)]
    places = [{"OUTPUT0": np.full((n, 32), np.nan, np.float32)} for n in (1, 2)]
    result = gs.run([{"INPUT0": p} for p in parts], places=places)
    assert stream.calls == ["to_device", "zero", "to_host", "to_host", "synchronize"]
    for place, (out,) in zip(places, result.outputs, strict=True):
        assert out is place["OUTPUT0"]
    assert_outputs_of(model, parts, result.outputs)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 32), np.float64),  # another dtype
        np.zeros((3, 32), np.float32),  # another row count
        np.zeros((32, 2), np.float32).T,  # not contiguous
        None,  # no place for this request
    ],
    ids=["dtype", "rows", "strided", "missing"],
)
def test_an_output_goes_through_staging_unless_every_request_has_a_fitting_place(
    bad: Array | None,
) -> None:
    model = gm.mlp((16, 32))
    gs, stream = streamed(model, (4,))
    parts = [rows(1, 16, seed=1), rows(2, 16, seed=2)]
    first = np.zeros((1, 32), np.float32)
    places: list[dict[str, Array]] = [{"OUTPUT0": first}, {} if bad is None else {"OUTPUT0": bad}]
    result = gs.run([{"INPUT0": p} for p in parts], places=places)
    assert stream.calls.count("to_host") == 1  # the whole batch, into staging
    assert result.outputs[0][0] is not first and not first.any()
    assert_outputs_of(model, parts, result.outputs)


# ---------------------------------------------------------------- the streamed session's making


def _stream_sessions(
    monkeypatch: pytest.MonkeyPatch, refuses: Callable[[dict[str, str]], bool]
) -> list[dict[str, str]]:
    """make_streamed_graph_session with HostStream for the CUDA stream and a session maker
    that raises SessionError when `refuses(its provider options)`; the options it got."""
    from runtime.engine import copy_stream, session

    tried: list[dict[str, str]] = []

    def make(path: str, device_id: int, threads: int, *, provider_options: Any = None) -> Any:
        tried.append(dict(provider_options or {}))
        if refuses(tried[-1]):
            raise session.SessionError(f"cannot load {path}")
        return object()

    monkeypatch.setattr(copy_stream, "CudaStream", lambda device_id: HostStream())
    monkeypatch.setattr(session, "make_graph_session", make)
    return tried


def test_a_model_that_cannot_load_says_so_without_blaming_the_stream(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from runtime.engine.session import SessionError, make_streamed_graph_session

    tried = _stream_sessions(monkeypatch, lambda options: True)  # a corrupt file
    with pytest.raises(SessionError, match=r"cannot load bad\.onnx"):
        make_streamed_graph_session("bad.onnx", 0, 1, None, contextlib.nullcontext())
    assert [("user_compute_stream" in o) for o in tried] == [True, False]
    assert "refused a user compute stream" not in caplog.text


def test_a_refused_stream_falls_back_to_blocking_copies_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from runtime.engine.session import make_streamed_graph_session

    _stream_sessions(monkeypatch, lambda options: "user_compute_stream" in options)
    sess, stream = make_streamed_graph_session("m.onnx", 0, 1, None, contextlib.nullcontext())
    assert sess is not None and stream is None
    assert "m.onnx: onnxruntime refused a user compute stream (cannot load m.onnx)" in caplog.text
