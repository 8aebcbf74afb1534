"""A range of an open file, read and written with pread/pwrite: a client's system shared-memory
region, which its client may truncate at any moment.

Through a mapping, an access past the object's new end is SIGBUS, and SIGBUS kills the process
(the front, with every request in it): a check of the size before the access cannot close the
window, since the client runs concurrently. pread and pwrite only come back short. The front
copies an input straight from the file into its arena (one copy, made by the kernel, as
memcpy from a mapping would be) and an output from the arena into the file.
"""

from __future__ import annotations

import contextlib
import os

__all__ = ["FileSlice", "SharedFd", "SliceTruncated"]


class SliceTruncated(Exception):
    """The file is shorter than the slice now (its owner truncated it)."""


class SharedFd:
    """A descriptor closed once its last holder is gone: a region unregistered while a request
    still reads it keeps the descriptor (and so the file) until that request is done, and the
    number is never reused under the request's feet."""

    __slots__ = ("fd",)

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class FileSlice:
    """Bytes [offset, offset + nbytes) of `fd`'s file; `what` names it in errors."""

    __slots__ = ("_fd", "nbytes", "offset", "what")

    def __init__(self, fd: SharedFd, offset: int, nbytes: int, what: str) -> None:
        self._fd = fd
        self.offset = offset
        self.nbytes = nbytes
        self.what = what

    def __len__(self) -> int:
        return self.nbytes

    def head(self, nbytes: int) -> FileSlice:
        return FileSlice(self._fd, self.offset, min(nbytes, self.nbytes), self.what)

    def readinto(self, dst: memoryview) -> None:
        """Fill `dst` (at least nbytes long) with the slice's bytes."""
        view = dst[: self.nbytes]
        done = 0
        while done < self.nbytes:  # (a read can return less than asked without EOF)
            got = os.preadv(self._fd.fd, [view[done:]], self.offset + done)
            if got <= 0:
                raise SliceTruncated(
                    f"{self.what} has shrunk since it was registered; unregister it and "
                    "register it again"
                )
            done += got

    def read(self) -> bytes:
        buf = bytearray(self.nbytes)
        self.readinto(memoryview(buf))
        return bytes(buf)

    __bytes__ = read

    def write(self, src: bytes | bytearray | memoryview) -> None:
        """Write `src` (at most nbytes) at the slice's start."""
        data = memoryview(src).cast("B")
        if len(data) > self.nbytes:
            raise ValueError(f"{len(data)} bytes do not fit the {self.nbytes} of {self.what}")
        done = 0
        while done < len(data):
            done += os.pwritev(self._fd.fd, [data[done:]], self.offset + done)
