"""The pod's directory of client shared-memory registrations, for `--frontends N`.

A client registers a region through one connection, but SO_REUSEPORT spreads its connections
over every front (perf_analyzer's threads each open their own): a region must be usable from
any front, listed by any front, and unregistered by any front. Each registration is one file
in the directory the supervisor made for its fronts (beside the worker's socket). A file is
created complete and atomically (a link of a written temporary file), so a name is claimed
pod-wide exactly once, and a reader never sees half a record.

A front keeps its own handle on what it uses (server.shm_regions: a system region's mapping;
a CUDA region opened in the worker for its connection), taken from the record on first use, and
before each use checks with one stat that the record is still the file it was taken from: an
unregister through another front, or a new registration under the same name, is seen at once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import msgspec

from server.errors import AlreadyExists
from server.pod_records import Identity, create_file, identity_of, is_current, record_path

__all__ = ["RegionDirectory", "RegionRecord"]

_PREFIX = "shm-"


class RegionRecord(msgspec.Struct, frozen=True):
    """One registration, as Triton's register call gave it (the status RPCs list these)."""

    name: str
    kind: str  # "system" or "cuda"
    byte_size: int
    key: str = ""  # system: the POSIX shm key
    offset: int = 0  # system: where the region starts in it
    device_id: int = 0  # cuda
    raw_handle: bytes = b""  # cuda: the client's 64-byte IPC handle
    # system: the object's (st_dev, st_ino) when registered; the other fronts open it by key
    # and must find that object there ((0, 0): unknown)
    object_id: tuple[int, int] = (0, 0)
    # system: (pid, fd) of the registering front's descriptor of it, which the other fronts
    # open through /proc (an object whose key the client unlinked stays usable, as in Triton)
    holder: tuple[int, int] = (0, 0)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(RegionRecord)


class RegionDirectory:
    def __init__(self, path: Path) -> None:
        self.path = path

    def _file(self, name: str) -> Path:
        # Any string may name a region: the file is named by its hash, the record holds it.
        return record_path(self.path, _PREFIX, name)

    def claim(self, record: RegionRecord) -> Identity:
        """Record a registration; AlreadyExists when the name is registered in the pod."""
        try:
            return create_file(self._file(record.name), _encoder.encode(record))
        except FileExistsError:
            raise AlreadyExists(
                f"shared memory region '{record.name}' already in manager"
            ) from None

    def lookup(self, name: str) -> tuple[RegionRecord, Identity] | None:
        """The registration of `name`, or None."""
        try:
            fd = os.open(self._file(name), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)  # of the file read, even if it is replaced meanwhile
            with os.fdopen(fd, "rb", closefd=False) as f:
                record = _decoder.decode(f.read())
        finally:
            os.close(fd)
        return (record, identity_of(st)) if record.name == name else None

    def current(self, name: str, written: Identity) -> bool:
        """Whether `written` is still the registration of `name`."""
        return is_current(self._file(name), written)

    def remove(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(name).unlink()

    def records(self, kind: str) -> list[RegionRecord]:
        """Every registration of one kind in the pod, by name."""
        found: list[RegionRecord] = []
        for f in self.path.glob(_PREFIX + "*"):
            with contextlib.suppress(FileNotFoundError, msgspec.DecodeError):
                record = _decoder.decode(f.read_bytes())
                if record.kind == kind:
                    found.append(record)
        return sorted(found, key=lambda r: r.name)
