"""Reading the worker's answers off a test's end of a Connection's socket pair."""

from __future__ import annotations

import socket

from runtime.ipc.protocol import FRAME_HEADER, WorkerMessage, decode_worker


def read_frame(sock: socket.socket) -> WorkerMessage:
    """The next message the worker wrote to `sock` (one length-prefixed frame)."""
    (size,) = FRAME_HEADER.unpack(sock.recv(FRAME_HEADER.size, socket.MSG_WAITALL))
    return decode_worker(sock.recv(size, socket.MSG_WAITALL))
