"""Model lifecycle in the front: scan the repository, ask the worker to load each selected
version, record READY or UNAVAILABLE with the reason, and reload everything after a worker
restart. Loads of different models run concurrently; a failure never affects other models.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from runtime.client import WorkerGone
from runtime.ipc.protocol import Code, LoadModel, ModelSignature, TensorInfo
from server.models import ModelEntry, ModelTable, VersionEntry
from server.repository import ScannedModel, scan_repository
from server.types import ModelSpec, ModelState
from server.worker_link import WorkerLink

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)


class ModelManager:
    def __init__(
        self, repository: Path, link: WorkerLink, table: ModelTable, intra_op_threads: int
    ) -> None:
        self.repository = repository
        self.link = link
        self.table = table
        self.intra_op_threads = intra_op_threads
        link.on_restart = self.reload_all
        link.on_lost = self.mark_worker_lost

    async def load_repository(self) -> None:
        scanned = await asyncio.to_thread(scan_repository, self.repository)
        for s in scanned:
            self.table.models[s.name] = _entry(s)
        await asyncio.gather(*(self._load_model(self.table.models[s.name]) for s in scanned))

    async def reload_all(self) -> None:
        """After a worker restart: every version that was READY or LOADING loads again."""
        entries = list(self.table.models.values())
        for e in entries:
            for ve in e.versions.values():
                if ve.state is ModelState.READY:
                    ve.state, ve.reason = ModelState.LOADING, "worker restarted; reloading"
        await asyncio.gather(*(self._load_model(e) for e in entries))

    def mark_worker_lost(self) -> None:
        for e in self.table.models.values():
            for ve in e.versions.values():
                if ve.state is ModelState.READY:
                    ve.state, ve.reason = ModelState.LOADING, "worker restarting"

    async def _load_model(self, entry: ModelEntry) -> None:
        if entry.spec is None:
            return
        spec = entry.spec
        await asyncio.gather(
            *(
                self._load_version(spec, ve)
                for ve in entry.versions.values()
                if ve.state is ModelState.LOADING
            )
        )

    async def _load_version(self, spec: ModelSpec, ve: VersionEntry) -> None:
        try:
            client = self.link.require()
            msg = LoadModel(
                client.next_request_id(),
                spec.name,
                ve.version,
                ve.path,
                spec.max_batch_size,
                _declared(spec),
                self.intra_op_threads,
            )
            done = await client.load(msg)
        except WorkerGone:
            return  # the restart path reloads it
        if done.code == Code.OK and done.signature is not None:
            ve.signature, ve.load_ns = done.signature, done.load_ns
            ve.state, ve.reason = ModelState.READY, ""
            log.info("loaded %s version %d in %.1f ms", spec.name, ve.version, done.load_ns / 1e6)
        else:
            ve.state, ve.reason = ModelState.UNAVAILABLE, done.message
            log.error("model %s version %d failed to load: %s", spec.name, ve.version, done.message)


def _entry(s: ScannedModel) -> ModelEntry:
    entry = ModelEntry(s.name, s.spec, s.reason)
    for v, path in s.versions.items():
        entry.versions[v] = VersionEntry(s.name, v, ModelState.LOADING, path=str(path))
    for v, why in s.version_errors.items():
        entry.versions[v] = VersionEntry(s.name, v, ModelState.UNAVAILABLE, why)
    return entry


def _declared(spec: ModelSpec) -> ModelSignature:
    return ModelSignature(
        tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.inputs),
        tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.outputs),
    )
