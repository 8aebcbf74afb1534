"""Client shared-memory regions (Triton's system / CUDA shared-memory extensions).

System regions are POSIX shm objects the client created; the front maps them (whole file,
since mmap offsets must be page-aligned) and reads inputs from / writes outputs to
[offset, offset + byte_size). CUDA regions are device memory the front never touches: it
keeps their name, device and size (for status and bounds checks) and the worker opens the
client's IPC handle (runtime.engine.regions); tensors in them go to the worker as references.
System and CUDA regions share one namespace. Regions are never unlinked or freed here: the
client owns them.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from server.errors import AlreadyExists, InvalidInput, NotFound, Unsupported
from server.types import ShmRef

R = TypeVar("R")

__all__ = ["CudaRegion", "SharedMemoryRegistry", "ShmRef", "SystemRegion"]


_SHM_DIR = Path("/dev/shm")
# Triton reserves this prefix for its Python backend; refusing it keeps the same contract.
_RESERVED = "triton_python_backend_shm_region_"


@dataclass(slots=True)
class SystemRegion:
    name: str
    key: str
    offset: int
    byte_size: int
    _map: mmap.mmap
    view: memoryview  # exactly [offset, offset + byte_size) of the shm object

    def close(self) -> None:
        self.view.release()
        with contextlib.suppress(BufferError):
            self._map.close()


@dataclass(frozen=True, slots=True)
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    raw_handle: bytes = b""  # kept to open it again in a restarted worker


class SharedMemoryRegistry:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.system: dict[str, SystemRegion] = {}
        self.cuda: dict[str, CudaRegion] = {}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise Unsupported(
                "client shared memory is disabled; start the server with --allow-client-shm"
            )

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise InvalidInput("shared memory region name is required")
        if name in self.system or name in self.cuda:
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        stem = key.lstrip("/")
        if not stem or "/" in stem or stem.startswith(_RESERVED):
            raise InvalidInput(f"invalid shared memory key '{key}'")
        try:
            fd = os.open(_SHM_DIR / stem, os.O_RDWR)
        except OSError as exc:
            raise InvalidInput(
                f"unable to open shared memory region '{name}' (key '{key}'): {exc.strerror}"
            ) from None
        try:
            size = os.fstat(fd).st_size
            if byte_size == 0 or offset + byte_size > size:
                raise InvalidInput(
                    f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
                    f"exceeds the {size} bytes of '{key}'"
                )
            m = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        view = memoryview(m)[offset : offset + byte_size]
        self.system[name] = SystemRegion(name, key, offset, byte_size, m, view)

    def unregister_system(self, name: str) -> None:
        self._check_enabled()
        names = list(self.system) if not name else [name]
        for n in names:
            region = self.system.pop(n, None)
            if region is not None:
                region.close()

    def system_status(self, name: str) -> list[SystemRegion]:
        self._check_enabled()
        return _status(self.system, "system", name)

    def check_cuda(self, name: str, device_id: int) -> None:
        """What the front checks of a CUDA registration before the worker opens the handle."""
        self._check_enabled()
        if not name:
            raise InvalidInput("shared memory region name is required")
        if name in self.system or name in self.cuda:
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        if device_id < 0:
            raise InvalidInput(f"CUDA shared memory region '{name}': invalid device_id {device_id}")
        # The handle's length and the size are the worker's to judge: a worker without CUDA
        # answers UNIMPLEMENTED whatever the handle (runtime.engine.regions).

    def add_cuda(self, region: CudaRegion) -> None:
        """Record a region the worker has opened (after `check_cuda` and the worker's OK)."""
        if region.name in self.system or region.name in self.cuda:
            raise AlreadyExists(f"shared memory region '{region.name}' already in manager")
        self.cuda[region.name] = region

    def remove_cuda(self, name: str) -> list[str]:
        """Forget `name` ("" = all); the names forgotten (for the worker to close)."""
        self._check_enabled()
        names = list(self.cuda) if not name else [name] if name in self.cuda else []
        for n in names:
            del self.cuda[n]
        return names

    def cuda_status(self, name: str) -> list[CudaRegion]:
        self._check_enabled()
        return _status(self.cuda, "cuda", name)

    def cuda_ref(self, ref: ShmRef, tensor: str) -> CudaRegion | None:
        """The CUDA region `ref` names, bounds-checked; None when it names no CUDA region."""
        region = self.cuda.get(ref.region)
        if region is None:
            return None
        _check_bounds(ref, tensor, region.byte_size)
        return region

    def view(self, ref: ShmRef, tensor: str) -> memoryview:
        """The bytes of a tensor in a region, bounds-checked."""
        self._check_enabled()
        region = self.system.get(ref.region)
        if region is None:
            raise InvalidInput(
                f"tensor '{tensor}' refers to unregistered shared memory region '{ref.region}'"
            )
        _check_bounds(ref, tensor, region.byte_size)
        return region.view[ref.offset : ref.offset + ref.byte_size]

    def close(self) -> None:
        for region in self.system.values():
            region.close()
        self.system.clear()
        self.cuda.clear()


def _check_bounds(ref: ShmRef, tensor: str, size: int) -> None:
    if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > size:
        raise InvalidInput(
            f"tensor '{tensor}': offset {ref.offset} + byte_size {ref.byte_size} is outside "
            f"shared memory region '{ref.region}' ({size} bytes)"
        )


def _status(regions: dict[str, R], kind: str, name: str) -> list[R]:
    """Every region of one kind ("" = all), or the one named (Triton's NOT_FOUND wording)."""
    if not name:
        return list(regions.values())
    if name not in regions:
        raise NotFound(f"Unable to find {kind} shared memory region: '{name}'")
    return [regions[name]]
