"""Model control of the pod, with `--frontends N`.

RepositoryModelLoad and RepositoryModelUnload reach one front, but the model is the pod's: every
front must serve it (or stop). The front that did it writes what it did into a file of the
supervisor's directory for its fronts (`control-<hash>`, one per model, replaced atomically:
the last action wins), and every front polls the directory four times a second and does the
same (server.lifecycle.ModelManager.replay). A load's `file:` overrides were written into that
directory too, so every front loads the same path and the worker loads it once; an unload
frees the version in the worker when the last front lets it go. A front that starts replays
every record before it listens.

Loads are not atomic across fronts: a front that has not polled yet answers as before for up to
a quarter of a second (ModelReady false, or the previous version).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import msgspec

from server.errors import MicrotuneError
from server.lifecycle import ModelManager
from server.rundir import replace_file

__all__ = ["ControlSync"]

log = logging.getLogger(__name__)

_PREFIX = "control-"

Identity = tuple[int, int]  # (inode, mtime ns) of a record's file


class _Record(msgspec.Struct, frozen=True):
    name: str
    action: str  # "load" or "unload"
    root: str  # the repository the model was (re)loaded from: the server's, or an override
    config_json: str | None = None


_decoder = msgspec.json.Decoder(_Record)


class ControlSync:
    def __init__(self, directory: Path, manager: ModelManager) -> None:
        self.directory = directory
        self.manager = manager
        self._seen: dict[Path, Identity] = {}

    def _file(self, name: str) -> Path:
        return self.directory / (_PREFIX + hashlib.sha256(name.encode()).hexdigest()[:40])

    def publish(self, name: str, action: str, config_json: str | None, root: Path) -> None:
        """This front loaded or unloaded `name`: the pod does (ModelManager.on_control)."""
        record = _Record(name, action, str(root), config_json)
        path = self._file(name)
        self._seen[path] = replace_file(path, msgspec.json.encode(record))  # not replayed here

    async def poll(self) -> None:
        """Replay what other fronts did since the last poll."""
        for path in sorted(self.directory.glob(_PREFIX + "*")):
            try:
                st = os.stat(path)
                identity = (st.st_ino, st.st_mtime_ns)
                if self._seen.get(path) == identity:
                    continue
                record = _decoder.decode(path.read_bytes())
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # replaced meanwhile: the next poll reads the new one
            self._seen[path] = identity  # a failed replay is not retried every poll
            try:
                await self.manager.replay(
                    record.name, record.action, record.config_json, Path(record.root)
                )
            except MicrotuneError as exc:
                log.error(
                    "model %s: %s by another front failed here: %s",
                    record.name, record.action, exc.message,
                )  # fmt: skip
            except Exception:
                log.exception("model %s: %s by another front failed", record.name, record.action)
