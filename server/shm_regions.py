"""Client shared-memory regions (Triton's system / CUDA shared-memory extensions).

System regions are POSIX shm objects the client created; the front opens them and reads
inputs from / writes outputs to [offset, offset + byte_size) with pread/pwrite, never through a
mapping (runtime.ipc.file_slice: a client that truncates its object would turn an access to a
mapping into SIGBUS, which kills the front). CUDA regions are device memory the front never
touches: it keeps their name, device and size (for status and bounds checks) and the worker
opens the client's IPC handle (runtime.engine.regions); tensors in them go to the worker as
references. System and CUDA regions share one namespace. Regions are never unlinked or freed
here: the client owns them.

With several fronts (`--frontends N`) the namespace is the pod's: registrations live in a
server.shm_directory.RegionDirectory, and each front opens (system) or has the worker open
(CUDA, through the handler) what it uses on first use, and drops it once the pod's record of it
is gone or replaced.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from runtime.ipc.file_slice import FileSlice, SharedFd
from runtime.ipc.shm import PREFIX as ARENA_PREFIX
from runtime.ipc.shm import reserve_pages
from server.errors import AlreadyExists, InvalidInput, NotFound, Overloaded, Unsupported
from server.pod_records import Identity
from server.shm_directory import RegionDirectory, RegionRecord
from server.types import ShmRef

R = TypeVar("R")

__all__ = ["CudaRegion", "SharedMemoryRegistry", "ShmRef", "SystemRegion"]


_SHM_DIR = Path("/dev/shm")
# Key prefixes refused: Triton's for its Python backend (the same contract), and the server's
# own arenas'.
_RESERVED = ("triton_python_backend_shm_region_", ARENA_PREFIX)


@dataclass(slots=True)
class SystemRegion:
    name: str
    key: str
    offset: int
    byte_size: int
    fd: SharedFd | None  # the object's descriptor (None once closed)
    object_id: tuple[int, int] = (0, 0)  # the object's (st_dev, st_ino) when opened

    def check_intact(self) -> None:
        # A client that truncates the object it registered (say, one restarted that creates
        # its region again, smaller, under the same key) gets a clear error before its bytes
        # are used; a truncation after this check only makes the copy short (FileSlice).
        assert self.fd is not None
        size = os.fstat(self.fd.fd).st_size
        if size < self.offset + self.byte_size:
            raise InvalidInput(
                f"shared memory region '{self.name}' (key '{self.key}') has shrunk to {size} "
                f"bytes since it was registered with offset {self.offset} and byte_size "
                f"{self.byte_size}; unregister it and register it again"
            )

    def slice(self, offset: int, nbytes: int) -> FileSlice:
        """[offset, offset + nbytes) of the region (bounds checked by the caller)."""
        assert self.fd is not None
        what = f"shared memory region '{self.name}' (key '{self.key}')"
        return FileSlice(self.fd, self.offset + offset, nbytes, what)

    def close(self) -> None:
        # The descriptor closes once no request still holds a slice of it (SharedFd).
        self.fd = None


@dataclass(frozen=True, slots=True)
class CudaRegion:
    name: str
    device_id: int
    byte_size: int
    raw_handle: bytes = b""  # kept to open it again in a restarted worker


class SharedMemoryRegistry:
    def __init__(self, enabled: bool, directory: RegionDirectory | None = None) -> None:
        self.enabled = enabled
        self.system: dict[str, SystemRegion] = {}
        self.cuda: dict[str, CudaRegion] = {}
        self.directory = directory  # the pod's registrations (several fronts), or None
        self._taken: dict[str, Identity] = {}  # what each local region was taken from
        # CUDA regions this front had opened in the worker whose registration is gone:
        # the handler has the worker close them (`take_stale_cuda`).
        self._stale_cuda: list[str] = []

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise Unsupported(
                "client shared memory is disabled; start the server with --allow-client-shm"
            )

    def register_system(self, name: str, key: str, offset: int, byte_size: int) -> None:
        self._check_enabled()
        if not name:
            raise InvalidInput("shared memory region name is required")
        self._drop_if_stale(name)
        if name in self.system or name in self.cuda:
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        region = _open_system(name, key, offset, byte_size)
        if self.directory is not None:
            try:
                assert region.fd is not None
                record = RegionRecord(
                    name,
                    "system",
                    byte_size,
                    key,
                    offset,
                    object_id=region.object_id,
                    holder=(os.getpid(), region.fd.fd),
                )
                self._taken[name] = self.directory.claim(record)
            except BaseException:
                region.close()
                raise
        self.system[name] = region

    def unregister_system(self, name: str) -> None:
        self._check_enabled()
        names = list(self.system) if not name else [name]
        if self.directory is not None:
            for n in self._pod_names("system", name):
                self.directory.remove(n)
        for n in names:
            self._forget_system(n)

    def system_status(self, name: str) -> list[SystemRegion] | list[RegionRecord]:
        self._check_enabled()
        if self.directory is not None:
            return _status(_by_name(self.directory.records("system")), "system", name)
        return _status(self.system, "system", name)

    def check_cuda(self, name: str, device_id: int) -> None:
        """What the front checks of a CUDA registration before the worker opens the handle."""
        self._check_enabled()
        if not name:
            raise InvalidInput("shared memory region name is required")
        self._drop_if_stale(name)
        if (
            name in self.system
            or name in self.cuda
            or (self.directory is not None and self.directory.lookup(name) is not None)
        ):
            raise AlreadyExists(f"shared memory region '{name}' already in manager")
        if device_id < 0:
            raise InvalidInput(f"CUDA shared memory region '{name}': invalid device_id {device_id}")
        # The handle's length and the size are the worker's to judge: a worker without CUDA
        # answers UNIMPLEMENTED whatever the handle (runtime.engine.regions).

    def add_cuda(self, region: CudaRegion) -> None:
        """Record a region the worker has opened (after `check_cuda` and the worker's OK)."""
        self._drop_if_stale(region.name)
        if region.name in self.system or region.name in self.cuda:
            raise AlreadyExists(f"shared memory region '{region.name}' already in manager")
        if self.directory is not None:
            record = RegionRecord(
                region.name, "cuda", region.byte_size, device_id=region.device_id,
                raw_handle=region.raw_handle,
            )  # fmt: skip
            self._taken[region.name] = self.directory.claim(record)
        self.cuda[region.name] = region

    def remove_cuda(self, name: str) -> list[str]:
        """Forget `name` ("" = all); the names forgotten here (for the worker to close)."""
        self._check_enabled()
        names = list(self.cuda) if not name else [name] if name in self.cuda else []
        if self.directory is not None:
            for n in self._pod_names("cuda", name):
                self.directory.remove(n)
        for n in names:
            del self.cuda[n]
            self._taken.pop(n, None)
        return names

    def cuda_status(self, name: str) -> list[CudaRegion] | list[RegionRecord]:
        self._check_enabled()
        if self.directory is not None:
            return _status(_by_name(self.directory.records("cuda")), "cuda", name)
        return _status(self.cuda, "cuda", name)

    # ------------------------------------------------------------ several fronts

    def cuda_to_adopt(self, names: set[str]) -> list[tuple[CudaRegion, Identity]]:
        """The pod's CUDA regions among `names` that this front has not opened yet."""
        if self.directory is None:
            return []
        out: list[tuple[CudaRegion, Identity]] = []
        for name in names:
            self._drop_if_stale(name)  # unregistered or replaced since this front opened it
            if name in self.cuda:
                continue
            found = self.directory.lookup(name)
            if found is not None and found[0].kind == "cuda":
                r, identity = found
                out.append((CudaRegion(r.name, r.device_id, r.byte_size, r.raw_handle), identity))
        return out

    def adopt_cuda(self, region: CudaRegion, identity: Identity) -> None:
        """Record a pod region the worker has opened for this front."""
        self.cuda[region.name] = region
        self._taken[region.name] = identity

    def take_stale_cuda(self) -> list[str]:
        stale, self._stale_cuda = self._stale_cuda, []
        return stale

    def sweep(self) -> None:
        """Drop what the pod no longer has registered (the CUDA ones go to `take_stale_cuda`)."""
        for name in [*self.system, *self.cuda]:
            self._drop_if_stale(name)

    def _pod_names(self, kind: str, name: str) -> list[str]:
        """The pod's regions of `kind` an unregister of `name` ("" = all) removes."""
        assert self.directory is not None
        if not name:
            return [r.name for r in self.directory.records(kind)]
        found = self.directory.lookup(name)
        return [name] if found is not None and found[0].kind == kind else []

    def _drop_if_stale(self, name: str) -> None:
        """Forget a local region the pod unregistered or replaced since this front took it
        (a CUDA one goes to `take_stale_cuda`). No-op with one front."""
        if self.directory is None or self._is_current(name):
            return
        self._forget_system(name)  # (and its `_taken` entry, a CUDA one's too)
        if self.cuda.pop(name, None) is not None:
            self._stale_cuda.append(name)

    def _forget_system(self, name: str) -> None:
        region = self.system.pop(name, None)
        if region is not None:
            region.close()
        # `_taken` holds exactly the local regions: a client that registers ever new names
        # (one per session, say) must not grow it without bound.
        self._taken.pop(name, None)

    def _is_current(self, name: str) -> bool:
        assert self.directory is not None
        taken = self._taken.get(name)
        return taken is not None and self.directory.current(name, taken)

    def _system_region(self, name: str) -> SystemRegion | None:
        """The pod's system region `name`, mapped here on first use (several fronts)."""
        assert self.directory is not None
        self._drop_if_stale(name)
        region = self.system.get(name)
        if region is not None:
            return region
        found = self.directory.lookup(name)
        if found is None or found[0].kind != "system":
            return None
        r, identity = found
        region = _open_held(r) or _open_system(r.name, r.key, r.offset, r.byte_size)
        if r.object_id != (0, 0) and region.object_id != r.object_id:
            # Another front registered it: its key now names another object (the client
            # unlinked it and made a new one). Served from it, this front's answers would
            # differ from the registering front's, which reads the object it opened.
            region.close()
            raise InvalidInput(
                f"shared memory region '{name}' (key '{r.key}') no longer names the object "
                "it was registered with (unlinked or replaced since); unregister it and "
                "register it again"
            )
        self.system[name] = region
        self._taken[name] = identity
        return region

    def cuda_ref(self, ref: ShmRef, tensor: str) -> CudaRegion | None:
        """The CUDA region `ref` names, bounds-checked; None when it names no CUDA region."""
        if ref.region in self.cuda:
            self._drop_if_stale(ref.region)  # unregistered through another front meanwhile
        region = self.cuda.get(ref.region)
        if region is None:
            return None
        _check_bounds(ref, tensor, region.byte_size)
        return region

    def view(self, ref: ShmRef, tensor: str) -> FileSlice:
        """The bytes of a tensor in a region, bounds-checked."""
        self._check_enabled()
        if self.directory is None:
            region = self.system.get(ref.region)
        else:
            region = self._system_region(ref.region)
        if region is None:
            raise InvalidInput(
                f"tensor '{tensor}' refers to unregistered shared memory region '{ref.region}'"
            )
        _check_bounds(ref, tensor, region.byte_size)
        region.check_intact()
        return region.slice(ref.offset, ref.byte_size)

    def close(self) -> None:
        for region in self.system.values():
            region.close()
        self.system.clear()
        self.cuda.clear()
        self._taken.clear()


def _open_system(name: str, key: str, offset: int, byte_size: int) -> SystemRegion:
    """Open [offset, offset + byte_size) of the client's POSIX shm object `key` (read and
    written with pread/pwrite: runtime.ipc.file_slice says why not through a mapping)."""
    stem = key.lstrip("/")
    # The server's own objects (its fronts' arenas hold every client's tensors: registered,
    # they would let a client read and write other clients' requests) are refused by name
    # here and by identity below (a hard link or a rename of one).
    if not stem or "/" in stem or "\0" in stem or stem.startswith(_RESERVED):
        raise InvalidInput(f"invalid shared memory key '{key[:256]}'")
    try:
        # As shm_open does (glibc adds O_NOFOLLOW): a symlink planted in /dev/shm must not
        # make the server read and write a file it points to.
        fd = os.open(_SHM_DIR / stem, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _unopenable(name, key, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or _is_servers(st):
            raise InvalidInput(
                f"unable to open shared memory region '{name}' (key '{key}'): not a shared "
                "memory object"
            )
        return _region_of(name, key, offset, byte_size, fd, st)
    except OSError as exc:
        os.close(fd)
        raise _unopenable(name, key, exc) from None
    except BaseException:
        os.close(fd)
        raise


def _region_of(
    name: str, key: str, offset: int, byte_size: int, fd: int, st: os.stat_result
) -> SystemRegion:
    """The region [offset, offset + byte_size) of the object open as `fd` (`st`: its stat);
    the caller closes `fd` if this raises."""
    size = st.st_size
    if byte_size == 0 or offset + byte_size > size:
        raise InvalidInput(
            f"shared memory region '{name}': offset {offset} + byte_size {byte_size} "
            f"exceeds the {size} bytes of '{key}'"
        )
    if not reserve_pages(fd, offset, byte_size):  # (or an output write could fail)
        raise Overloaded(
            f"shared memory region '{name}' (key '{key}'): /dev/shm has no room for its "
            f"{byte_size} bytes"
        )
    return SystemRegion(name, key, offset, byte_size, SharedFd(fd), (st.st_dev, st.st_ino))


def _open_held(r: RegionRecord) -> SystemRegion | None:
    """The region another front registered, opened through that front's own descriptor
    (/proc/<pid>/fd/<n>): the object it opened, even once the client has unlinked its key,
    as Triton (which maps it at registration) goes on serving it. None when that descriptor is
    gone or is no longer the object (the front died, or unregistered it and reused the number):
    the key is opened then."""
    pid, number = r.holder
    if not pid:
        return None
    try:
        # (not O_NOFOLLOW: /proc's fd entries are links; the identity check below decides)
        fd = os.open(f"/proc/{pid}/fd/{number}", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != r.object_id or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None
        return _region_of(r.name, r.key, r.offset, r.byte_size, fd, st)
    except OSError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _is_servers(st: os.stat_result) -> bool:
    """Whether an object opened for a client is one of the server's own (an arena), under
    whatever name the client gave. Registration is rare: /dev/shm is listed each time."""
    try:
        names = [n for n in os.listdir(_SHM_DIR) if n.startswith(ARENA_PREFIX)]
    except OSError:
        return False
    for n in names:
        try:
            own = os.stat(_SHM_DIR / n, follow_symlinks=False)
        except OSError:
            continue
        if (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino):
            return True
    return False


def _unopenable(name: str, key: str, exc: OSError) -> InvalidInput | Overloaded:
    why = "a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
    message = f"unable to open shared memory region '{name}' (key '{key}'): {why}"
    if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):  # the server's limits, not the key
        return Overloaded(f"{message}; unregister regions no longer used")
    return InvalidInput(message)


def _by_name(records: list[RegionRecord]) -> dict[str, RegionRecord]:
    return {r.name: r for r in records}


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
