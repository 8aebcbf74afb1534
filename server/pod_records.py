"""Record files the fronts of a pod share (`--frontends N`), in the supervisor's directory for
them: client shared-memory registrations (server.shm_directory), routing admin tables
(server.admin_sync) and model control (server.control_sync).

A record is named by a hash of its key (any string), written whole (a reader sees the old file
or the new one, never half of one), and told from its earlier writes by its `Identity`. A
`Watch` lists the records that changed since this front last took them. `Acks` lets the front
that wrote a record wait until every other front has acted on it, so that the RPC that caused
it answers only when any connection (whichever front it reached) sees the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "ACK_TIMEOUT_S",
    "AckedRecords",
    "Acks",
    "Identity",
    "Watch",
    "create_file",
    "identity",
    "identity_of",
    "is_current",
    "record_path",
    "replace_file",
]

# How long the front that wrote a record waits for the others (a load on a GPU, with graph
# captures, takes seconds; a front that is restarting acknowledges once it has caught up).
ACK_TIMEOUT_S = 120.0

# How long after a directory's mtime a scan must begin for that mtime to cover it (Watch):
# well over a jiffy of the kernel's file clock.
_SETTLED_NS = 1_000_000_000

Identity = tuple[int, int]  # (inode, mtime ns) of a record's file: which write of it it is

# Why the writer stamps the mtime itself (`_written`): a record removed or replaced frees its
# inode, and ext4 or xfs give the next file the same inode number at once; a kernel before
# 6.13 stamps files from a clock that ticks once per jiffy (1-10 ms), so the next write of a
# name could carry the very same (inode, mtime) as the one a front took, and that front would
# keep using a registration the client replaced (docs/architecture.md, "Several fronts"). A
# random stamp, whole seconds included (some filesystems keep no fractions), is another one
# for every write whatever the kernel's clock. Nothing reads a record's mtime as a time.
_STAMP_SECONDS = (1 << 31) - 1  # below 2038: every filesystem can store it


def record_path(directory: Path, prefix: str, key: str) -> Path:
    return directory / (prefix + hashlib.sha256(key.encode()).hexdigest()[:40])


def identity_of(st: os.stat_result) -> Identity:
    return st.st_ino, st.st_mtime_ns


def identity(path: Path) -> Identity:
    """FileNotFoundError when there is no such record."""
    return identity_of(os.stat(path))


def is_current(path: Path, written: Identity) -> bool:
    """Whether the record at `path` is still the write `written` (not replaced, not gone)."""
    try:
        return identity(path) == written
    except FileNotFoundError:
        return False


def replace_file(path: Path, data: bytes) -> Identity:
    """Write `path` whole, atomically; the new file's identity."""
    tmp, written = _written(path.parent, data)
    os.replace(tmp, path)
    return written


def create_file(path: Path, data: bytes) -> Identity:
    """Create `path` whole, atomically, only if there is none (FileExistsError otherwise): the
    one creator of a name among concurrent ones."""
    tmp, written = _written(path.parent, data)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return written


def _written(directory: Path, data: bytes) -> tuple[Path, Identity]:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        os.write(fd, data)
        stamp = _stamp()
        os.utime(fd, ns=(stamp, stamp))
        st = os.fstat(fd)  # the file's, which a rename or a link keeps
    finally:
        os.close(fd)
    return Path(tmp), identity_of(st)


class Watch:
    """The records `<directory>/<prefix>*` written since this front took them (`take`)."""

    def __init__(self, directory: Path, prefix: str) -> None:
        self.directory = directory
        self.prefix = prefix
        self._taken: dict[Path, Identity] = {}
        # The directory's mtime at the last scan, when that scan began (this machine's clock),
        # and what it listed: while the mtime stays, nothing was written or removed in it.
        self._scanned: tuple[int, int] = (0, 0)
        self._listed: list[tuple[Path, Identity]] = []

    def path(self, key: str) -> Path:
        return record_path(self.directory, self.prefix, key)

    def take(self, path: Path, written: Identity) -> None:
        """This write of `path` is applied here (or was written here): not listed again."""
        self._taken[path] = written

    def changed(self) -> list[tuple[Path, Identity]]:
        """The records written since taken, by name, with the identity of what is there now.

        Globbing and stating every file of the directory at each poll, four times a second on
        each front's event loop, cost idle CPU and request latency that grew with the files
        (registrations a client never removes, records of every model loaded). A record's
        write or removal renames or unlinks in the directory, which sets its mtime: while it
        stays, what was listed stands. The kernel stamps that mtime from a clock that may tick
        once per jiffy, so a write just after a scan could keep the mtime the scan saw: the
        scan is trusted only once it began clearly after that mtime (`_SETTLED_NS`)."""
        mtime = os.stat(self.directory).st_mtime_ns
        seen, began = self._scanned
        if mtime == seen and began > mtime + _SETTLED_NS:
            return [(p, w) for p, w in self._listed if self._taken.get(p) != w]
        began = time.time_ns()
        fresh: list[tuple[Path, Identity]] = []
        present: set[Path] = set()
        for path in sorted(self.directory.glob(self.prefix + "*")):
            try:
                written = identity(path)
            except FileNotFoundError:
                continue
            present.add(path)
            if self._taken.get(path) != written:
                fresh.append((path, written))
        # A record removed (AckedRecords.retire) is forgotten here too.
        self._taken = {p: w for p, w in self._taken.items() if p in present}
        self._scanned, self._listed = (mtime, began), fresh
        return fresh


class Acks:
    """Each front's acknowledgement of the record writes it has acted on: the file
    `ack-<kind>-<front>-<hash of key>` holds the token of the last write it did. The front
    that wrote waits (`wait`) for every other front's."""

    def __init__(self, directory: Path, kind: str, index: int, fronts: int) -> None:
        self.directory = directory
        self.kind = kind
        self.index = index  # this front's
        self.fronts = fronts  # how many the supervisor runs
        # Set once this front stops (App.stop): the pod is stopping (every front gets the
        # signal), the others no longer act on records, and a wait for them held the
        # shutdown to the grace period, then answered UNAVAILABLE an RPC whose action was done.
        self.stopping = False

    def ack(self, key: str, token: str) -> None:
        """This front has acted on the write of `key` that carries `token` (well or not)."""
        replace_file(self._path(self.index, key), token.encode())

    async def wait(
        self, key: str, token: str, record: Path, written: Identity, timeout_s: float
    ) -> list[int]:
        """Until every other front has acknowledged `token`, the write of `record` that this
        front made (`written`, acknowledged by this front already), or another write replaced
        it (its writer waits instead), or this front stops (`stopping`), or `timeout_s`: the
        fronts that had not acknowledged then (empty when all did, or it stops)."""
        deadline = time.monotonic() + timeout_s
        waiting = [i for i in range(self.fronts) if i != self.index]
        while True:
            waiting = [i for i in waiting if not self._acked(i, key, token)]
            if not waiting or self.stopping or _replaced(record, written):
                return []
            if time.monotonic() > deadline:
                return waiting
            await asyncio.sleep(0.02)

    def everyone_acked(self, key: str, token: str) -> bool:
        return all(self._acked(i, key, token) for i in range(self.fronts))

    def remove(self, key: str) -> None:
        for i in range(self.fronts):
            self._path(i, key).unlink(missing_ok=True)

    def _acked(self, front: int, key: str, token: str) -> bool:
        try:
            return self._path(front, key).read_text() == token
        except FileNotFoundError:
            return False

    def _path(self, front: int, key: str) -> Path:
        return record_path(self.directory, f"ack-{self.kind}-{front}-", key)


class AckedRecords:
    """Records of one kind (`<kind>-<hash of key>`) that every front of the pod acts on: a
    front's own write is not listed back to it (`watch`), each front acknowledges each write
    it has acted on (`acks`), and the writer may wait for every other front's (`wait`)."""

    def __init__(self, directory: Path, kind: str, index: int, fronts: int) -> None:
        self.watch = Watch(directory, f"{kind}-")
        self.acks = Acks(directory, kind, index, fronts)
        self._lock = directory / f".lock-{kind}"

    def write(self, key: str, data: bytes, token: str) -> Identity:
        """Write `key`'s record (whole, atomically), done here already; its identity."""
        path = self.watch.path(key)
        with _locked(self._lock):
            written = replace_file(path, data)
        self.watch.take(path, written)
        self.acks.ack(key, token)
        return written

    def retire(self, key: str, token: str, written: Identity) -> bool:
        """Remove `key`'s record and its acknowledgements if it is still the write `written`
        (carrying `token`) and every front has acknowledged it: no front has anything left to
        do for it. Whether it went.

        Under the pod's lock of this kind, which `write` takes too: another front's newer
        write of `key` between the check and the removal would go unseen by every front.
        (Acknowledgements need no lock: every front acknowledged this write, and a front
        acknowledges writes of a key in order, so none writes an older one after; a newer one
        needs a newer write, which waits for the lock.)"""
        path = self.watch.path(key)
        with _locked(self._lock):
            if not is_current(path, written) or not self.acks.everyone_acked(key, token):
                return False
            path.unlink()
            self.acks.remove(key)
        return True

    async def wait(self, key: str, token: str, written: Identity, timeout_s: float) -> list[int]:
        """Acks.wait for this front's write of `key` (`written`, carrying `token`)."""
        return await self.acks.wait(key, token, self.watch.path(key), written, timeout_s)


def _replaced(path: Path, written: Identity) -> bool:
    try:
        return identity(path) != written
    except FileNotFoundError:
        return True  # retired (AckedRecords.retire): a newer write, every front acknowledged


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock among the pod's fronts (held for a few file operations)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _stamp() -> int:
    """A random file time in nanoseconds (see `_STAMP_SECONDS`)."""
    seconds = 1 + secrets.randbelow(_STAMP_SECONDS)
    return seconds * 1_000_000_000 + secrets.randbelow(1_000_000_000)
