"""Domain types of the front process: frozen, slotted, transport-free.

The three a request goes through (Tensor, InferRequest, InferResponse) are msgspec Structs:
built several times per call, and a frozen dataclass's __init__ costs ~7x as much (one
object.__setattr__ per field). Update them with msgspec.structs.replace."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from runtime.ipc.file_slice import FileSlice

__all__ = [
    "DynamicBatching",
    "Fingerprint",
    "InferRequest",
    "InferResponse",
    "ModelIndexEntry",
    "ModelSpec",
    "ModelState",
    "ParamValue",
    "ShmRef",
    "Tensor",
    "TensorSpec",
    "VersionPolicy",
]

ParamValue = bool | int | float | str
# A version directory's files as (path relative to it, size, mtime_ns), sorted
# (server.repository.fingerprint): two scans with the same one found the same files.
Fingerprint = tuple[tuple[str, int, int], ...]


class ModelState(enum.Enum):
    """Triton's state strings (RepositoryIndex)."""

    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADING = "UNLOADING"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: str  # KServe wire datatype
    dims: tuple[int, ...]  # without the batch dimension when max_batch_size > 0
    # Triton's reshape: the tensor's shape in the graph (same batch exclusion), which clients
    # see as `dims` (runtime.engine.reshape); None: the graph's shape is `dims`.
    reshape: tuple[int, ...] | None = None


@dataclass(frozen=True, slots=True)
class VersionPolicy:
    """Which version directories are served (Triton's semantics; default: the latest one)."""

    kind: str = "latest"  # "latest" | "all" | "specific"
    num_versions: int = 1
    versions: tuple[int, ...] = ()

    def select(self, available: list[int]) -> list[int]:
        ordered = sorted(available)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.num_versions :] if self.num_versions > 0 else []

    def missing(self, available: list[int]) -> list[int]:
        """The versions a `specific` policy names that have no directory (Triton loads the
        others and logs each of these)."""
        if self.kind != "specific":
            return []
        return sorted(set(self.versions) - set(available))


@dataclass(frozen=True, slots=True)
class DynamicBatching:
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    max_queue_size: int = 1024  # requests waiting; beyond it RESOURCE_EXHAUSTED
    instances: int = 1  # batches executing at once: instance_group counts, summed


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """A model's configuration as read from its config file (or defaulted)."""

    name: str
    max_batch_size: int = 0
    inputs: tuple[TensorSpec, ...] = ()
    outputs: tuple[TensorSpec, ...] = ()
    version_policy: VersionPolicy = VersionPolicy()
    dynamic_batching: DynamicBatching | None = None
    default_model_filename: str = "model.onnx"
    platform: str = "onnxruntime_onnx"
    parameters: Mapping[str, str] = field(default_factory=dict)
    # Fields the config sets that microtune accepts and does not act on (dotted paths, e.g.
    # "response_cache.enable"): the load names them in a warning (server.model_config).
    ignored: tuple[str, ...] = ()
    # instance_group counts, summed (calls or batches of a version that run at once); 0: the
    # config has no instance_group (dynamic batching: one batch at a time; otherwise
    # --worker-threads calls).
    instances: int = 0


@dataclass(frozen=True, slots=True)
class ShmRef:
    """A tensor's place in a registered client shared-memory region (tensor parameters)."""

    region: str
    offset: int
    byte_size: int


class Tensor(msgspec.Struct, frozen=True):
    """A tensor in KServe raw form: row-major little-endian bytes (BYTES: length-prefixed).
    With `shm` set, the data lives in a client shared-memory region instead."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview | FileSlice  # FileSlice: a client system region's bytes
    shm: ShmRef | None = None


class InferRequest(msgspec.Struct, frozen=True):
    model: str
    version: str  # as requested; "" = let the server choose
    id: str
    inputs: tuple[Tensor, ...]
    outputs: tuple[str, ...]  # requested outputs; empty = all
    parameters: Mapping[str, ParamValue]
    output_shm: Mapping[str, ShmRef] = msgspec.field(default_factory=dict)  # outputs to shm


class InferResponse(msgspec.Struct, frozen=True):
    model: str
    version: str  # the version that actually ran
    id: str
    outputs: tuple[Tensor, ...]
    route_reason: str = ""  # pinned | label | canary | stable


@dataclass(frozen=True, slots=True)
class ModelIndexEntry:
    name: str
    version: str
    state: str
    reason: str
