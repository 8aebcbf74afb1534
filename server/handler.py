"""The data plane: every RPC's logic, free of protobuf and gRPC.

Servicers (server/rpc) decode a request into domain types, call one method here, and encode the
result; errors are domain errors (server/errors) that server/rpc/status maps to gRPC codes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from runtime.client import ArenaFull, CallFailed, WorkerGone
from runtime.ipc.dtypes import BytesDecodeError, decode_bytes_tensor
from runtime.ipc.protocol import Code, ModelSignature
from server import __version__
from server.errors import (
    DeadlineExceeded,
    InvalidInput,
    MicrotuneError,
    ModelFailed,
    NotFound,
    NotReady,
    Overloaded,
    Unsupported,
)
from server.lifecycle import ModelManager
from server.models import ModelTable, VersionEntry
from server.shm_regions import SharedMemoryRegistry
from server.stats import VersionStats
from server.types import (
    InferRequest,
    InferResponse,
    ModelIndexEntry,
    ModelSpec,
    ShmRef,
    Tensor,
)
from server.validation import plan_call
from server.worker_link import WorkerLink

__all__ = ["EXTENSIONS", "InferenceHandler", "ModelView", "StatsRow"]

# Only what is really implemented (ServerMetadata.extensions).
EXTENSIONS = (
    "system_shared_memory",
    "model_configuration",
    "statistics",
    "model_repository",
    "model_repository(unload_dependents)",
)


@dataclass(frozen=True, slots=True)
class ModelView:
    """What ModelMetadata and ModelConfig report for one version."""

    name: str
    version: int
    versions: tuple[int, ...]
    spec: ModelSpec
    signature: ModelSignature


@dataclass(frozen=True, slots=True)
class StatsRow:
    name: str
    version: int
    stats: VersionStats


class InferenceHandler:
    def __init__(
        self,
        table: ModelTable,
        link: WorkerLink,
        manager: ModelManager,
        shm: SharedMemoryRegistry,
        server_name: str,
    ) -> None:
        self.shm = shm
        self.table = table
        self.link = link
        self.manager = manager
        self.server_name = server_name
        self.started = False  # the repository's first load pass has finished

    # ------------------------------------------------------------ health and metadata

    def live(self) -> bool:
        return True

    def ready(self) -> bool:
        return self.started and self.link.ready and not self.table.loading()

    def server_metadata(self) -> tuple[str, str, tuple[str, ...]]:
        return self.server_name, __version__, EXTENSIONS

    def model_ready(self, name: str, version: str) -> bool:
        # Unknown and unloaded models are simply not ready (OK status), as in Triton.
        if not name:
            raise InvalidInput("model name is required")
        return self.link.ready and self.table.is_ready(name, version)

    def model_view(self, name: str, version: str) -> ModelView:
        if not name:
            raise InvalidInput("model name is required")
        ve = self.table.resolve(name, version)
        entry = self.table.get(name)
        assert entry.spec is not None and ve.signature is not None
        return ModelView(name, ve.version, tuple(entry.ready_versions()), entry.spec, ve.signature)

    # ------------------------------------------------------------ inference

    async def infer(self, req: InferRequest, deadline: float | None) -> InferResponse:
        """Run one request. `deadline` is a time.monotonic() value (from the gRPC deadline)."""
        start = time.perf_counter_ns()
        ve = self.table.resolve(req.model, req.version)
        spec, sig = ve.spec, ve.signature
        assert spec is not None and sig is not None
        if any(t.shm is not None for t in req.inputs):
            req = replace(req, inputs=tuple(self._shm_input(t) for t in req.inputs))
        plan = plan_call(req, sig, spec.max_batch_size)
        # Counted from routing to the answer: unloading this version waits for it (drain).
        ve.inflight += 1
        try:
            client = self.link.require()
            result = await client.infer(
                req.model, ve.version, plan.inputs, plan.outputs, plan.output_reserve, deadline
            )
        except BaseException as exc:
            ve.stats.record_failure(time.perf_counter_ns() - start)
            raise _domain_error(exc, ve) from None
        finally:
            ve.inflight -= 1
        outputs = tuple(
            self._output(req, o.name, o.datatype, o.shape, o.data) for o in result.outputs
        )
        ve.stats.record_success(time.perf_counter_ns() - start, result.timings, plan.batch_size)
        return InferResponse(req.model, str(ve.version), req.id, outputs)

    def _shm_input(self, t: Tensor) -> Tensor:
        if t.shm is None:
            return t
        view = self.shm.view(t.shm, t.name)
        if t.datatype == "BYTES":
            try:
                decode_bytes_tensor(view, math.prod(t.shape))
            except BytesDecodeError as exc:
                raise InvalidInput(
                    f"input '{t.name}' has malformed BYTES content in shared memory: {exc}"
                ) from None
        return replace(t, data=view)

    def _output(
        self, req: InferRequest, name: str, datatype: str, shape: tuple[int, ...], data: bytes
    ) -> Tensor:
        ref = req.output_shm.get(name)
        if ref is None:
            return Tensor(name, datatype, shape, data)
        view = self.shm.view(ref, name)
        if len(data) > ref.byte_size:
            raise InvalidInput(
                f"shared memory size specified with the request for output '{name}' "
                f"({ref.byte_size} bytes) should be at least {len(data)} bytes to hold the results"
            )
        view[: len(data)] = data
        return Tensor(name, datatype, shape, b"", ShmRef(ref.region, ref.offset, len(data)))

    # ------------------------------------------------------------ statistics and repository

    def statistics(self, name: str, version: str) -> list[StatsRow]:
        entries = [self.table.get(name)] if name else list(self.table.models.values())
        rows: list[StatsRow] = []
        for e in entries:
            if version and name:
                v = int(version) if version.isascii() and version.isdigit() else -1
                ve = e.versions.get(v)
                if ve is None:
                    raise NotFound(f"model '{name}' has no version {version}")
                rows.append(StatsRow(e.name, ve.version, ve.stats))
                continue
            rows.extend(StatsRow(e.name, v, e.versions[v].stats) for v in e.ready_versions())
        return rows

    def repository_index(self, ready_only: bool) -> list[ModelIndexEntry]:
        return self.table.index(ready_only)

    async def load_model(
        self, name: str, config_json: str | None, files: Mapping[str, bytes]
    ) -> None:
        if not name:
            raise InvalidInput("model_name is required")
        await self.manager.load(name, config_json, files)

    async def unload_model(self, name: str) -> None:
        if not name:
            raise InvalidInput("model_name is required")
        await self.manager.unload(name)

    def unsupported(self, rpc: str, why: str) -> MicrotuneError:
        return Unsupported(f"{rpc} is not supported by this server: {why}")


def _domain_error(exc: BaseException, ve: VersionEntry) -> BaseException:
    if isinstance(exc, MicrotuneError):
        return exc
    if isinstance(exc, WorkerGone):
        return NotReady(f"the runtime worker is unavailable ({exc}); retry")
    if isinstance(exc, ArenaFull):
        return Overloaded(str(exc))
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return DeadlineExceeded("deadline exceeded before the model returned")
    if isinstance(exc, CallFailed):
        match exc.code:
            case Code.BAD_INPUT:
                return InvalidInput(exc.message)
            case Code.NOT_LOADED | Code.NOT_READY:
                return NotReady(f"model '{ve.model}' version {ve.version} is not loaded")
            case Code.OVERLOADED:
                return Overloaded(exc.message)
            case Code.DEADLINE:
                return DeadlineExceeded(exc.message)
            case Code.MODEL_FAILED:
                return ModelFailed(f"model '{ve.model}' version {ve.version} failed: {exc.message}")
    return exc  # unexpected: the status layer logs it and answers INTERNAL
