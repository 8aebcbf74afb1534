"""The front's side of client CUDA shared memory (Triton's extension): the registry's
bookkeeping (server.shm_regions) joined to the worker, which opens and closes each client IPC
handle for this front's connection (runtime.engine.regions).

With several fronts (`--frontends N`) a region another front registered is opened for this one
on its first use (`adopt`), and one unregistered elsewhere is closed once this front notices
(on use, or the app's sweep each second).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from runtime.client import WorkerGone
from runtime.ipc.protocol import Code, RegionDone
from server.errors import InvalidInput, NotReady, Unsupported
from server.shm_directory import RegionRecord
from server.shm_regions import CudaRegion, SharedMemoryRegistry
from server.types import InferRequest
from server.worker_link import WorkerLink

__all__ = ["CudaRegions"]

log = logging.getLogger("microtune.handler")


class CudaRegions:
    def __init__(self, shm: SharedMemoryRegistry, link: WorkerLink) -> None:
        self.shm = shm
        self.link = link

    async def register(self, name: str, raw_handle: bytes, device_id: int, byte_size: int) -> None:
        """Triton's CudaSharedMemoryRegister: the front checks, the worker opens the handle."""
        self.shm.check_cuda(name, device_id)
        async with _worker_needed():
            # An earlier registration of the name that this front had adopted and the pod
            # has unregistered since: the worker holds one region per name and connection.
            await self._close_stale()
            done = await self.link.require().open_region(name, raw_handle, device_id, byte_size)
        if done.code == Code.UNSUPPORTED:
            raise Unsupported(f"CUDA shared memory region '{name}': {done.message}")
        if done.code != Code.OK:
            raise InvalidInput(done.message)
        try:
            self.shm.add_cuda(CudaRegion(name, device_id, byte_size, bytes(raw_handle)))
        except BaseException:  # a concurrent register of the name won, or no record was written
            await self._close([name])
            raise

    async def unregister(self, name: str) -> None:
        """Forget the region(s) now; the worker closes each once no call uses it."""
        await self._close(self.shm.remove_cuda(name))

    def status(self, name: str) -> list[CudaRegion] | list[RegionRecord]:
        return self.shm.cuda_status(name)

    async def adopt(self, req: InferRequest) -> None:
        """Several fronts: have the worker open, for this front, the pod's CUDA regions the
        request names that another front registered (server.shm_directory)."""
        names = {t.shm.region for t in req.inputs if t.shm is not None}
        names.update(ref.region for ref in req.output_shm.values())
        todo = self.shm.cuda_to_adopt(names)
        async with _worker_needed():
            # A registration replaced under the same name: the worker closes this front's old
            # one first (its table holds one region per name).
            await self._close_stale()
            dones = [await self._open(region) for region, _identity in todo]
        for (region, identity), done in zip(todo, dones, strict=True):
            if done.code == Code.OK:
                self.shm.adopt_cuda(region, identity)
            else:  # the request then names an unregistered region (INVALID_ARGUMENT)
                log.warning("CUDA shared memory region '%s': %s", region.name, done.message)

    async def sweep(self) -> None:
        """Several fronts: let go of regions unregistered through another front."""
        self.shm.sweep()
        await self._close_stale()

    async def _close_stale(self) -> None:
        await self._close(self.shm.take_stale_cuda())

    async def _open(self, r: CudaRegion) -> RegionDone:
        return await self.link.require().open_region(r.name, r.raw_handle, r.device_id, r.byte_size)

    async def _close(self, names: list[str]) -> None:
        """Have the worker close this front's `names` (a worker restarting, or gone meanwhile,
        has none open)."""
        for name in names:
            if self.link.ready:
                with contextlib.suppress(WorkerGone):
                    await self.link.require().close_region(name)

    async def reopen(self) -> None:
        """After a worker restart: open every registered region in the new worker; one that
        no longer opens (its owner exited) is dropped, with a warning. Regions the pod has
        unregistered or replaced since this front took them are only forgotten here (the new
        worker has none open): their record, a client's newer registration perhaps, stays."""
        self.shm.sweep()
        self.shm.take_stale_cuda()
        for r in list(self.shm.cuda.values()):
            done = await self._open(r)
            if done.code != Code.OK:
                self.shm.remove_cuda(r.name)
                log.warning(
                    "CUDA shared memory region '%s' dropped after a worker restart: %s",
                    r.name,
                    done.message,
                )


@contextlib.asynccontextmanager
async def _worker_needed() -> AsyncIterator[None]:
    """A worker that is restarting, or whose link drops meanwhile: UNAVAILABLE, as for infer."""
    try:
        yield
    except WorkerGone as exc:
        raise NotReady(f"the runtime worker is unavailable ({exc}); retry") from None
