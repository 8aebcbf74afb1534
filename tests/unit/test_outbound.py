"""runtime.ipc.outbound: frames to a front that does not read wait in order behind a writer
thread instead of blocking the sender; a full backlog makes senders wait; a front gone is an
OSError. Over a real socketpair with small buffers, so a few frames fill it."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from runtime.ipc.outbound import Outbound

FRAME = 4096


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    worker_end, front_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    front_end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    yield worker_end, front_end
    worker_end.close()
    front_end.close()


def frame(k: int) -> bytes:
    return k.to_bytes(4, "little") * (FRAME // 4)


def read_frames(sock: socket.socket, n: int) -> list[int]:
    """What the front reads: n frames, each named by its number."""
    buf = bytearray()
    while len(buf) < n * FRAME:
        chunk = sock.recv(1 << 16)
        assert chunk, "the worker's end closed"
        buf += chunk
    out = []
    for k in range(n):
        body = bytes(buf[k * FRAME : (k + 1) * FRAME])
        assert body == frame(int.from_bytes(body[:4], "little")), "a torn frame"
        out.append(int.from_bytes(body[:4], "little"))
    return out


def counting_stalls(sock: socket.socket) -> tuple[Outbound, list[int]]:
    """An Outbound on `sock` and the list its stalls are appended to (on_stall)."""
    stalls: list[int] = []
    return Outbound(sock, on_stall=lambda: stalls.append(1)), stalls


def test_a_front_that_does_not_read_never_holds_the_sender_and_reads_all_in_order(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, front_end = pair
    out, stalls = counting_stalls(worker_end)
    n = 200  # 800 KiB: far more than the socket holds
    started = time.monotonic()
    senders = [
        threading.Thread(target=lambda base=base: [out.send(frame(base + k)) for k in range(50)])
        for base in range(0, n, 50)
    ]
    for t in senders:
        t.start()
    for t in senders:
        t.join(10)
    assert not any(t.is_alive() for t in senders), "a sender waited for the front to read"
    assert time.monotonic() - started < 5
    assert len(stalls) >= 1
    got = read_frames(front_end, n)
    assert sorted(got) == list(range(n))
    for base in range(0, n, 50):  # each sender's frames in the order it sent them
        mine = [k for k in got if base <= k < base + 50]
        assert mine == list(range(base, base + 50))
    out.send(frame(n))  # once read, frames go out at once again
    assert read_frames(front_end, 1) == [n]


def test_a_full_backlog_makes_the_sender_wait_until_the_front_reads(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, front_end = pair
    out = Outbound(worker_end, backlog_max=8 * FRAME)
    sent = 0

    def send_many() -> None:
        nonlocal sent
        for k in range(100):
            out.send(frame(k))
            sent += 1

    sender = threading.Thread(target=send_many)
    sender.start()
    time.sleep(0.5)
    assert sender.is_alive() and sent < 100, "the backlog grew past its bound"
    assert read_frames(front_end, 100) == list(range(100))
    sender.join(10)
    assert sent == 100


def test_a_front_that_has_gone_is_an_os_error_for_every_sender(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    worker_end, front_end = pair
    out, stalls = counting_stalls(worker_end)
    for k in range(20):  # the socket fills: a writer holds the rest
        out.send(frame(k))
    assert len(stalls) == 1
    front_end.close()
    deadline = time.monotonic() + 10
    with pytest.raises(OSError):
        while time.monotonic() < deadline:  # the writer finds it gone
            out.send(frame(0))
            time.sleep(0.01)
    with pytest.raises(BrokenPipeError, match="the front has gone"):
        out.send(frame(1))


def test_closing_ends_a_writer_blocked_on_a_front_that_does_not_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """The worker closes a connection (the front broke the protocol) while answers wait: the
    writer returns, and the front sees the end instead of a socket held open by it."""
    worker_end, front_end = pair
    out, stalls = counting_stalls(worker_end)
    for k in range(20):
        out.send(frame(k))
    assert len(stalls) == 1
    out.close()
    deadline = time.monotonic() + 10
    while any(t.name == "outbound" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "the writer is still blocked"
        time.sleep(0.01)
    front_end.settimeout(10)
    while front_end.recv(1 << 16):
        pass
