"""A system region's key names a POSIX shm object; one that is a symbolic link (or no regular
file) is refused. The server opened /dev/shm/<key> following links: any local user could
plant /dev/shm/x -> a file the server may read and write, register it, and have inputs read
that file and outputs overwrite it. glibc's shm_open, which Triton uses, refuses links."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from server import shm_regions
from server.errors import InvalidInput
from server.shm_regions import SharedMemoryRegistry


def test_a_key_that_is_a_symbolic_link_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(shm_regions, "_SHM_DIR", shm)
    secret = tmp_path / "secret"
    secret.write_bytes(b"SECRET" * 100)
    (shm / "planted").symlink_to(secret)
    reg = SharedMemoryRegistry(True)
    with pytest.raises(InvalidInput) as caught:
        reg.register_system("r", "/planted", 0, 64)
    assert str(caught.value) == (
        "unable to open shared memory region 'r' (key '/planted'): a symbolic link"
    )
    assert not reg.system
    assert secret.read_bytes() == b"SECRET" * 100


def test_a_key_that_is_no_regular_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    os.mkfifo(tmp_path / "fifo")
    reg = SharedMemoryRegistry(True)
    fd = os.open(tmp_path / "fifo", os.O_RDONLY | os.O_NONBLOCK)  # (else opening it blocks)
    try:
        with pytest.raises(InvalidInput) as caught:
            reg.register_system("r", "/fifo", 0, 64)
    finally:
        os.close(fd)
    assert str(caught.value) == (
        "unable to open shared memory region 'r' (key '/fifo'): not a shared memory object"
    )


def test_the_servers_own_arena_cannot_be_registered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A front's arena holds every client's tensors: registered by a client (its name is in
    /dev/shm for anyone to list), it let that client read and write other clients' requests.
    Refused by its name, and by identity under another name (a hard link)."""
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    arena = tmp_path / "microtune-4242-1"
    arena.write_bytes(b"other clients' tensors" * 100)
    os.link(arena, tmp_path / "innocent")
    reg = SharedMemoryRegistry(True)
    with pytest.raises(InvalidInput) as caught:
        reg.register_system("r", "/microtune-4242-1", 0, 64)
    assert str(caught.value) == "invalid shared memory key '/microtune-4242-1'"
    with pytest.raises(InvalidInput) as caught:
        reg.register_system("r", "/innocent", 0, 64)
    assert str(caught.value) == (
        "unable to open shared memory region 'r' (key '/innocent'): not a shared memory object"
    )
    assert not reg.system


def test_a_key_with_a_nul_byte_is_invalid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(os.open raised ValueError: the client got INTERNAL and the log a traceback.)"""
    monkeypatch.setattr(shm_regions, "_SHM_DIR", tmp_path)
    with pytest.raises(InvalidInput) as caught:
        SharedMemoryRegistry(True).register_system("r", "/a\0b", 0, 64)
    assert str(caught.value) == "invalid shared memory key '/a\0b'"
