"""Private copies of models uploaded with RepositoryModelLoad's `file:<version>/<name>`
parameters (Triton's), one directory (a repository root holding just that model) per load.

A lone front makes them in the temp directory and removes them at exit; with several fronts
they go to the pod's directory (`directory`), where every front, and so the worker, finds them
under one path, and the supervisor removes them with it. A root is removed once no version of
its model is served from it (`prune`), never before: a load that fails leaves the version
that was serving, and a restarted worker reloads that version from its root.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from server.errors import LoadFailed

__all__ = ["Overrides"]

# A version number and a plain file name: "." and ".." (a name of dots alone) are no files.
_FILE_PARAM = re.compile(r"^file:([1-9][0-9]*)/(?!\.{1,2}$)([A-Za-z0-9._-]{1,128})$")


class Overrides:
    def __init__(self) -> None:
        self.directory: Path | None = None  # the pod's, with several fronts
        self._roots: dict[str, list[Path]] = {}  # by model: the roots this front made

    def write(self, name: str, files: Mapping[str, bytes]) -> Path:
        """A new root holding `name` made of `files` (keys `file:<version>/<file name>`)."""
        for key in files:
            if not _FILE_PARAM.match(key):
                raise LoadFailed(
                    f"failed to load '{name}', failed to poll from model "
                    f"repository: invalid file parameter '{key[:64]}'"
                )
        if self.directory is not None:
            root = Path(tempfile.mkdtemp(prefix="override-", dir=self.directory))
        else:
            root = Path(tempfile.mkdtemp(prefix="microtune-override-"))
        self._roots.setdefault(name, []).append(root)
        for key, data in files.items():
            m = _FILE_PARAM.match(key)
            assert m is not None
            target = root / name / m.group(1) / m.group(2)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return root

    def prune(self, name: str, in_use: Iterable[str], keep: Path | None = None) -> None:
        """Remove the roots of `name` this front made that hold none of the version paths
        `in_use` (those served, or loading), but `keep`: the root of the load just published,
        which the other fronts replay from even when it failed here."""
        roots = self._roots.get(name, [])
        paths = [Path(p) for p in in_use]
        kept = [r for r in roots if r == keep or any(p.is_relative_to(r) for p in paths)]
        for r in roots:
            if r not in kept:
                shutil.rmtree(r, ignore_errors=True)
        if kept:
            self._roots[name] = kept
        else:
            self._roots.pop(name, None)

    def close(self) -> None:
        if self.directory is not None:
            return  # the pod's overrides outlive a front: the supervisor removes them
        for roots in self._roots.values():
            for r in roots:
                shutil.rmtree(r, ignore_errors=True)
        self._roots.clear()
