"""The pod's routing admin tables, with `--frontends N`.

SetRouting and ClearRouting reach one front, and a canary guard rolls back in one front, but
each is a decision about the pod's traffic: every front must route by it. The front that made
the decision writes the model's admin table into a file of the supervisor's directory for its
fronts (`admin-<hash>`, replaced atomically; removed by ClearRouting), and every front polls
the directory four times a second and applies what changed (server.router.Router.apply_admin).
A front that starts or restarts applies them all before it listens. A table that does not
validate here yet (say, a version still loading) is tried again at the next poll.

Last writer wins: two fronts changing one model's table at once end with the one written last,
on every front.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

import msgspec

from server.errors import MicrotuneError
from server.pod_records import Watch, replace_file
from server.router import Router
from server.routing import table_to_dict

__all__ = ["AdminSync"]

log = logging.getLogger(__name__)

_PREFIX = "admin-"


class _Record(msgspec.Struct, frozen=True):
    model: str
    table_json: str
    rollback: str = ""  # the guard's reason, when the table is its rollback


_decoder = msgspec.json.Decoder(_Record)


class AdminSync:
    def __init__(self, directory: Path, router: Router) -> None:
        self.router = router
        self._watch = Watch(directory, _PREFIX)
        self._models: dict[Path, str] = {}  # the model of each record applied here

    def publish(self, model: str, rollback: str = "") -> None:
        """This front changed `model`'s admin table: make it the pod's (Router.on_admin)."""
        path = self._watch.path(model)
        table = self.router.admin_table(model)
        if table is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._models.pop(path, None)  # cleared here already: nothing to drop when gone
            return
        record = _Record(model, json.dumps(table_to_dict(table)), rollback)
        self._watch.take(path, replace_file(path, msgspec.json.encode(record)))
        self._models[path] = model

    def poll(self) -> None:
        """Apply what other fronts published since the last poll."""
        fresh, gone = self._watch.changed()
        for path, written in fresh:
            try:
                record = _decoder.decode(path.read_bytes())
                self.router.apply_admin(record.model, record.table_json, record.rollback)
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # replaced or removed meanwhile: the next poll sees what is there
            except MicrotuneError as exc:  # not valid here yet: try again next time
                log.debug("admin routing table of another front not applied yet: %s", exc)
                continue
            self._watch.take(path, written)
            self._models[path] = record.model
        for path in gone:
            model = self._models.pop(path, None)
            if model is not None:
                with contextlib.suppress(MicrotuneError):
                    self.router.drop_admin(model)
