"""Client shared-memory regions (Triton's system / CUDA shared-memory extensions).

System regions are POSIX shm objects the client created; the front maps them (whole file,
since mmap offsets must be page-aligned) and reads inputs from / writes outputs to
[offset, offset + byte_size). System and CUDA regions share one namespace. Regions are never
unlinked here: the client owns them. CUDA regions need a GPU worker (issue 4's GPU part).
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from server.errors import AlreadyExists, InvalidInput, NotFound, Unsupported
from server.types import ShmRef

__all__ = ["SharedMemoryRegistry", "ShmRef", "SystemRegion"]

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


class SharedMemoryRegistry:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.system: dict[str, SystemRegion] = {}

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise Unsupported(
                "client shared memory is disabled; start the server with --allow-client-shm"
            )

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise InvalidInput("shared memory region name is required")
        if name in self.system:
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
        if not name:
            return list(self.system.values())
        if name not in self.system:
            raise NotFound(f"Unable to find system shared memory region: '{name}'")
        return [self.system[name]]

    def cuda_register(self, name: str) -> None:
        self._check_enabled()
        raise Unsupported(
            f"CUDA shared memory region '{name}': this server's worker has no CUDA device"
        )

    def cuda_unregister(self, name: str) -> None:
        self._check_enabled()  # nothing registered: unregistering all or one is a no-op

    def view(self, ref: ShmRef, tensor: str) -> memoryview:
        """The bytes of a tensor in a region, bounds-checked."""
        self._check_enabled()
        region = self.system.get(ref.region)
        if region is None:
            raise InvalidInput(
                f"tensor '{tensor}' refers to unregistered shared memory region '{ref.region}'"
            )
        if ref.offset < 0 or ref.byte_size < 0 or ref.offset + ref.byte_size > region.byte_size:
            raise InvalidInput(
                f"tensor '{tensor}': offset {ref.offset} + byte_size {ref.byte_size} is outside "
                f"shared memory region '{ref.region}' ({region.byte_size} bytes)"
            )
        return region.view[ref.offset : ref.offset + ref.byte_size]

    def close(self) -> None:
        for region in self.system.values():
            region.close()
        self.system.clear()
