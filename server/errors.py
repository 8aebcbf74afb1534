"""The domain error tree of the front process. No transport types here: server/rpc/status.py
maps each ErrorCode to a gRPC status in one table.

    MicrotuneError (code)
    ├── NotFound          model, version or region unknown
    ├── InvalidInput      request does not match the model (message names the tensor)
    │   └── DataRejected  the model refused the data as it ran (the canary guard counts it)
    ├── NotReady          loading, restarting, draining: retry later
    ├── Overloaded        queue or shared memory full, a response past the message limit
    ├── DeadlineExceeded  the deadline passed before the result
    ├── AlreadyExists     a name is taken
    ├── Unsupported       RPC or feature not implemented
    ├── ModelFailed       the model itself failed on this input (onnxruntime run error)
    └── LoadFailed        a repository load request failed (Triton answers INTERNAL)
        └── LoadInterrupted  it met only a restarting worker: retry (UNAVAILABLE)
"""

from __future__ import annotations

import enum

__all__ = [
    "AlreadyExists",
    "CannotStart",
    "DataRejected",
    "DeadlineExceeded",
    "ErrorCode",
    "InvalidInput",
    "LoadFailed",
    "LoadInterrupted",
    "MicrotuneError",
    "ModelFailed",
    "NotFound",
    "NotReady",
    "Overloaded",
    "Unsupported",
]


class ErrorCode(enum.Enum):
    NOT_FOUND = "not_found"
    INVALID_INPUT = "invalid_input"
    NOT_READY = "not_ready"
    OVERLOADED = "overloaded"
    DEADLINE = "deadline"
    ALREADY_EXISTS = "already_exists"
    UNSUPPORTED = "unsupported"
    MODEL_FAILED = "model_failed"
    LOAD_FAILED = "load_failed"


class MicrotuneError(Exception):
    code: ErrorCode

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(MicrotuneError):
    code = ErrorCode.NOT_FOUND


class InvalidInput(MicrotuneError):
    code = ErrorCode.INVALID_INPUT


class DataRejected(InvalidInput):
    """The model refused the request's data as it ran (onnxruntime's INVALID_ARGUMENT): the
    client's to fix, but also a failure of the version that ran it (the canary guard)."""


class NotReady(MicrotuneError):
    code = ErrorCode.NOT_READY


class Overloaded(MicrotuneError):
    code = ErrorCode.OVERLOADED


class DeadlineExceeded(MicrotuneError):
    code = ErrorCode.DEADLINE


class AlreadyExists(MicrotuneError):
    code = ErrorCode.ALREADY_EXISTS


class Unsupported(MicrotuneError):
    code = ErrorCode.UNSUPPORTED


class ModelFailed(MicrotuneError):
    code = ErrorCode.MODEL_FAILED


class LoadFailed(MicrotuneError):
    code = ErrorCode.LOAD_FAILED


class LoadInterrupted(LoadFailed):
    """A load that failed only because the worker was restarting: nothing is wrong with the
    model, and the load resumes once the worker is back, so the client is told to retry."""

    code = ErrorCode.NOT_READY


class CannotStart(Exception):
    """Not a request's error: a setting this machine cannot honour (a port in use, a device it
    does not have), found at start-up. The process exits with EXIT_CONFIG and this one line,
    not a traceback."""
