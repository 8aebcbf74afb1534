"""The pod's routing admin tables, with `--frontends N`.

SetRouting and ClearRouting reach one front, and a canary guard rolls back in one front, but
each is a decision about the pod's traffic: every front must route by it. The front that made
the decision writes the model's admin table into a file of the supervisor's directory for its
fronts (`admin-<hash>`, replaced atomically; ClearRouting writes an empty table), and every
front polls the directory four times a second and applies what changed
(server.router.Router.apply_admin). A front that starts or restarts applies them all before it
listens. A table that does not validate here yet (say, a version still loading) is tried again
at the next poll.

Each front acknowledges each table it has applied (server.pod_records.Acks), and SetRouting and
ClearRouting answer once every front has (`settled`): after the RPC, a client's next call routes
by the new table whichever front it reaches. A guard's rollback is decided on the request path
and waits for nobody; the other fronts apply it at their next poll.

Last writer wins: two fronts changing one model's table at once end with the one written last,
on every front.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from pathlib import Path

import msgspec

from server.errors import MicrotuneError
from server.pod_records import AckedRecords, Identity
from server.router import Router
from server.routing import table_to_dict

__all__ = ["AdminSync"]

log = logging.getLogger(__name__)

# A table waits for the other fronts' next poll, or for a version another front still loads
# (the worker loads it once for all: seconds). Past this, the RPC answers with a log line.
ACK_TIMEOUT_S = 30.0


class _Record(msgspec.Struct, frozen=True):
    model: str
    table_json: str  # "" when ClearRouting removed the model's admin table
    token: str  # this write's: each front acknowledges it once applied
    rollback: str = ""  # the guard's reason, when the table is its rollback


_decoder = msgspec.json.Decoder(_Record)


class AdminSync:
    def __init__(
        self, directory: Path, router: Router, index: int = 0, fronts: int = 1,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.router = router
        self.ack_timeout_s = ack_timeout_s
        self._records = AckedRecords(directory, "admin", index, fronts)
        # model -> (token, identity) of this front's last write of its record
        self._published: dict[str, tuple[str, Identity]] = {}

    def publish(self, model: str, rollback: str = "") -> None:
        """This front changed `model`'s admin table: make it the pod's (Router.on_admin)."""
        table = self.router.admin_table(model)
        table_json = "" if table is None else json.dumps(table_to_dict(table))
        record = _Record(model, table_json, secrets.token_hex(8), rollback)
        written = self._records.write(model, msgspec.json.encode(record), record.token)
        self._published[model] = (record.token, written)

    async def settled(self, model: str) -> None:
        """Until every front routes `model` by the table this front published last (or a newer
        one, whose writer waits for it), or ack_timeout_s: what SetRouting and ClearRouting
        wait for before they answer."""
        published = self._published.get(model)
        if published is None:
            return
        token, written = published
        silent = await self._records.wait(model, token, written, self.ack_timeout_s)
        if silent:
            log.warning(
                "model %s: routing table not acknowledged by front(s) %s within %.0f s",
                model, silent, self.ack_timeout_s,
            )  # fmt: skip

    def stop_waiting(self) -> None:
        """This front stops: `settled` no longer waits for the others (Acks.stopping)."""
        self._records.acks.stopping = True

    def poll(self) -> None:
        """Apply what other fronts published since the last poll."""
        fresh = self._records.watch.changed()
        for path, written in fresh:
            try:
                record = _decoder.decode(path.read_bytes())
                if record.table_json:
                    self.router.apply_admin(record.model, record.table_json, record.rollback)
                else:
                    with contextlib.suppress(MicrotuneError):  # a model unknown here: no table
                        self.router.drop_admin(record.model)
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # replaced meanwhile: the next poll sees what is there
            except MicrotuneError as exc:  # not valid here yet: try again next time
                log.debug("admin routing table of another front not applied yet: %s", exc)
                continue
            self._records.watch.take(path, written)
            self._records.acks.ack(record.model, record.token)
