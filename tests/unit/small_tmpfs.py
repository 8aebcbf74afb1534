"""A small tmpfs standing in for /dev/shm, for tests of what happens when it is full (mounting
needs root; the tests that use it skip elsewhere)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_tmpfs(path: Path, mib: int) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        # Lazy: a test that failed may still map a file there; the mount must not outlive it.
        subprocess.run(["umount", "-l", str(path)], check=False)
