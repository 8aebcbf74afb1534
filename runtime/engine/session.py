"""Creates onnxruntime sessions on the right execution provider and reads their signatures.

The only module (with engine/model.py) that touches onnxruntime's session API; it asserts the
provider actually obtained, because onnxruntime-gpu silently falls back to CPU otherwise.
Every session is made with `enable_fallback=0`: else onnxruntime's Python wrapper, on an EP
error at creation or an EPFail in `run()`, re-creates the session on the CPU EP (printing to
stdout) and hides the original error; a server must answer that call with an error instead.
A graph session may compute on a CUDA stream of ours (`make_streamed_graph_session`), reached
through runtime.engine.copy_stream inside that function: this module imports anywhere.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any, Final

import onnxruntime as ort

from runtime.ipc.dtypes import BY_ONNX
from runtime.ipc.protocol import ModelSignature, TensorInfo

if TYPE_CHECKING:
    from runtime.engine.copy_stream import CopyStream

__all__ = [
    "ORT_LOG_SEVERITY",
    "GraphsUnsupported",
    "SessionError",
    "choose_device",
    "device_index",
    "first_line",
    "make_graph_session",
    "make_session",
    "make_streamed_graph_session",
    "preload_cuda_libraries",
    "signature_of",
]

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

# Sessions log nothing below FATAL (4). Everything a session logs at ERROR (a failed run, a
# refused model) is also raised to us, and reaches the log through our own logger (the load's
# reason, the failed request's WARNING line): the raw native line, written straight to fd 2 with
# colour codes, was a duplicate that broke JSON logs. What other native code writes to stderr
# is routed into the log by runtime.native_stderr.
ORT_LOG_SEVERITY: Final = 4


class SessionError(Exception):
    """The model cannot be loaded (corrupt file, unsupported type, provider unavailable)."""


def choose_device(requested: str) -> str:
    """Resolve "auto" to "cuda:0" when the CUDA EP is compiled in and really usable, else "cpu"."""
    if requested != "auto":
        if requested.startswith("cuda") and CUDA not in ort.get_available_providers():
            raise SessionError(f"device {requested} requested but onnxruntime has no CUDA EP")
        return requested
    if CUDA not in ort.get_available_providers():
        return "cpu"
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return "cuda:0"
    except Exception:  # no driver, no device: the CPU EP it is
        log.info("CUDA EP compiled in but no usable GPU; using the CPU EP")
    return "cpu"


def device_index(device: str) -> int:
    """The CUDA device number of a device string: "cuda:1" -> 1; "cuda" and "cpu" -> 0."""
    return int(device.partition(":")[2] or 0)


def make_session(path: str, device: str, intra_op_threads: int) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = ORT_LOG_SEVERITY
    providers: list[Any]
    if device.startswith("cuda"):
        providers = [(CUDA, {"device_id": device_index(device)}), CPU]
    else:
        providers = [CPU]
    try:
        sess = ort.InferenceSession(path, so, providers=providers, enable_fallback=0)
    except Exception as exc:  # onnxruntime raises several unrelated types for bad files
        raise SessionError(f"onnxruntime cannot load {path}: {first_line(exc)}") from exc
    wanted = CUDA if device.startswith("cuda") else CPU
    if sess.get_providers()[0] != wanted:
        raise SessionError(f"asked for {wanted} but onnxruntime gave {sess.get_providers()}")
    return sess


def signature_of(sess: ort.InferenceSession) -> ModelSignature:
    return ModelSignature(
        inputs=tuple(_info(a) for a in sess.get_inputs()),
        outputs=tuple(_info(a) for a in sess.get_outputs()),
    )


def _info(arg: Any) -> TensorInfo:
    dtype = BY_ONNX.get(arg.type)
    if dtype is None:
        raise SessionError(f"tensor {arg.name!r} has type {arg.type}, which KServe cannot carry")
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (arg.shape or ()))
    return TensorInfo(arg.name, dtype.wire, shape)


def first_line(exc: BaseException) -> str:
    """The first line of `exc` (at most 300 characters), or its type name when it has none."""
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --- CUDA graphs (issue 4): the session runtime.engine.graphs captures on ---------------------
# Kept apart from make_session: a graph session differs in three ways, each load-bearing.
# (1) `enable_cuda_graph` with the device id. (2) Only the CUDA EP is named; onnxruntime adds
# the CPU EP itself and, for graphs, applies its ALLOW_CPU_FOR_SHAPES policy (1.26+): the
# shape arithmetic the CUDA EP leaves on the CPU (Shape -> Gather -> Concat -> Reshape, in
# most exports with a dynamic batch dimension) is allowed, a compute node that needs a Memcpy
# to or from the CPU is refused. `session.disable_cpu_ep_fallback` is NOT set: it refuses any
# node on the CPU EP, shape nodes included, which would take graphs away from such exports.
# (3) Refusals that mean "this model cannot be captured" (control flow, compute nodes on the
# CPU) are told apart from real load errors: the version then runs eagerly, it still loads.

_CONTROL_FLOW_REFUSAL = "control flow"  # "...as the model has control flow nodes..." (1.31.1)
# "This session cannot use the graph capture feature as requested by the user as all compute
# graph nodes have not been partitioned to the CUDAExecutionProvider": nodes on the CPU EP.
_GRAPH_CAPTURE_REFUSAL = "graph capture feature"


class GraphsUnsupported(Exception):
    """onnxruntime will not capture this model (control-flow nodes, nodes on the CPU EP).
    Not a load failure: the version runs without graphs, and `str(exc)` is the reason."""


def preload_cuda_libraries() -> None:
    """Load the CUDA 13 / cuDNN 9 libraries of onnxruntime-gpu before the first CUDA session.

    onnxruntime-gpu's provider library has no RUNPATH to pip's nvidia/ packages; its
    `preload_dlls` looks beside onnxruntime, then on the default search path (LD_LIBRARY_PATH).
    A no-op on a CPU build. Never raises: a missing library shows up as a SessionError when
    the CUDA session is created, with onnxruntime's own message."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is None or CUDA not in ort.get_available_providers():
        return
    try:
        preload(cuda=True, cudnn=True, msvc=False)
    except Exception as exc:  # preload_dlls raises RuntimeError for a bad directory only
        log.warning("onnxruntime.preload_dlls failed: %s", first_line(exc))


def make_graph_session(
    path: str,
    device_id: int,
    intra_op_threads: int,
    *,
    provider_options: dict[str, str] | None = None,
) -> ort.InferenceSession:
    """A CUDA EP session with CUDA graphs enabled, every compute node on the GPU.

    Raises GraphsUnsupported when the model cannot be captured (the caller falls back to a
    session without graphs) and SessionError when it cannot be loaded on the GPU at all (bad
    file, no CUDA EP in this onnxruntime build, the EP failed to start). `provider_options`
    adds CUDA EP options (tests use {"arena_extend_strategy": "kSameAsRequested"})."""
    if CUDA not in ort.get_available_providers():
        raise SessionError(
            f"CUDA graphs need onnxruntime-gpu; this onnxruntime {ort.__version__} has "
            f"{ort.get_available_providers()}"
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = ORT_LOG_SEVERITY
    options = {
        **(provider_options or {}),
        "device_id": str(device_id),
        "enable_cuda_graph": "1",
    }
    try:
        sess = ort.InferenceSession(path, so, providers=[(CUDA, options)], enable_fallback=0)
    except Exception as exc:
        text = str(exc)
        if _CONTROL_FLOW_REFUSAL in text.lower():
            raise GraphsUnsupported(
                "the model has control-flow nodes (If/Loop/Scan), which onnxruntime cannot "
                f"capture: {first_line(exc)}"
            ) from exc
        if _GRAPH_CAPTURE_REFUSAL in text:
            _raise_for_cpu_nodes(path, device_id, exc)
        raise SessionError(
            f"onnxruntime cannot load {path} on CUDA with graphs: {first_line(exc)}"
        ) from exc
    if sess.get_providers()[0] != CUDA:  # the CUDA EP did not start; onnxruntime fell back
        raise SessionError(
            f"asked for {CUDA} with graphs but onnxruntime gave {sess.get_providers()}"
        )
    return sess


def make_streamed_graph_session(
    path: str,
    device_id: int,
    intra_op_threads: int,
    provider_options: dict[str, str] | None,
    lock: contextlib.AbstractContextManager[Any],
) -> tuple[ort.InferenceSession, CopyStream | None]:
    """A graph session computing on a stream of ours (user_compute_stream), so that the
    batch's copies are queued on the stream the replay runs on; without one (no cupy, or an
    onnxruntime that refuses the option: logged) a session on onnxruntime's own stream.
    Raises what make_graph_session raises."""
    from runtime.engine.copy_stream import CudaStream
    from runtime.ipc.pinning import CudaError

    try:
        stream: CopyStream | None = CudaStream(device_id)
    except CudaError as exc:
        log.warning("no copy stream for %s (%s): blocking copies", path, first_line(exc))
        stream = None
    refused: SessionError | None = None
    if stream is not None:
        options = {**(provider_options or {}), "user_compute_stream": str(stream.ptr)}
        try:
            with lock:
                sess = make_graph_session(
                    path, device_id, intra_op_threads, provider_options=options
                )
            # The stream must outlive the session computing on it, whoever drops the session
            # last: the session's attributes are released after its native session (`_sess`,
            # set first), so the stream is destroyed after.
            sess._microtune_copy_stream = stream  # type: ignore[attr-defined]
            return sess, stream
        except SessionError as exc:
            refused = exc
    with lock:
        sess = make_graph_session(
            path, device_id, intra_op_threads, provider_options=provider_options
        )  # a model that cannot load at all fails here, with its own error and no warning
    if refused is not None:
        log.warning(
            "%s: onnxruntime refused a user compute stream (%s): blocking copies",
            path,
            first_line(refused),
        )
    return sess, None


def _raise_for_cpu_nodes(path: str, device_id: int, exc: Exception) -> None:
    """The "not all nodes on the CUDA EP" refusal has two causes that need different answers:
    some compute nodes have no CUDA kernel (the model runs, without graphs), or the CUDA EP
    itself failed to start and *every* node landed on the CPU (a GPU load error). A plain
    session tells them apart; this costs a second session creation, on this failure path."""
    so = ort.SessionOptions()
    so.log_severity_level = ORT_LOG_SEVERITY
    try:
        probe = ort.InferenceSession(
            path, so, providers=[(CUDA, {"device_id": str(device_id)}), CPU], enable_fallback=0
        )
    except Exception as probe_exc:
        raise SessionError(
            f"onnxruntime cannot load {path} on CUDA: {first_line(probe_exc)}"
        ) from probe_exc
    if probe.get_providers()[0] != CUDA:
        raise SessionError(
            f"the CUDA EP did not start on device {device_id} (onnxruntime fell back to "
            f"{probe.get_providers()}): check the CUDA 13 and cuDNN 9 libraries"
        ) from exc
    raise GraphsUnsupported(
        "some compute nodes of the model have no CUDA kernel and would run on the CPU EP, "
        f"which a CUDA graph cannot contain: {first_line(exc)}"
    ) from exc
