"""Model control of the pod, with `--frontends N`.

RepositoryModelLoad and RepositoryModelUnload reach one front, but the model is the pod's: every
front must serve it (or stop). The front that did it writes what it did into a file of the
supervisor's directory for its fronts (`control-<hash>`, one per model, replaced atomically:
the last action wins), and every front polls the directory four times a second and does the
same (server.lifecycle.ModelManager.replay). A load's `file:` overrides were written into that
directory too, so every front loads the same path and the worker loads it once; an unload
frees the version in the worker when the last front lets it go. A front that starts replays
every record before it listens. Each front acknowledges each action it has done
(server.pod_records.Acks), and the RPC answers once every front has: after it, a client's
next call finds the model loaded (or gone) whichever front it reaches. A front that does not
acknowledge within ACK_TIMEOUT_S (crashed and restarting slowly) is logged and not waited for;
none is once this front stops (`stop_waiting`: the pod is stopping).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import msgspec

from server.errors import MicrotuneError
from server.lifecycle import ModelManager
from server.pod_records import ACK_TIMEOUT_S, AckedRecords, Identity, is_current

__all__ = ["ControlSync"]

log = logging.getLogger(__name__)


class _Record(msgspec.Struct, frozen=True):
    name: str
    action: str  # "load" or "unload"
    root: str  # the repository the model was (re)loaded from: the server's, or an override
    token: str  # this action's: each front acknowledges it once done (pod_records.Acks)
    config_json: str | None = None
    failed: str = ""  # how the action failed on the front that did it ("": it did not)


_decoder = msgspec.json.Decoder(_Record)


class ControlSync:
    def __init__(
        self, directory: Path, manager: ModelManager, index: int, fronts: int,
        ack_timeout_s: float = ACK_TIMEOUT_S,
    ) -> None:  # fmt: skip
        self.manager = manager
        self.ack_timeout_s = ack_timeout_s
        self._records = AckedRecords(directory, "control", index, fronts)

    def publish(
        self, name: str, action: str, config_json: str | None, root: Path, token: str,
        failed: str = "",
    ) -> Identity:  # fmt: skip
        """This front loaded or unloaded `name` (ModelManager.control, under the model's lock):
        the record every front replays; what `settled` waits on. `token` is the action's own
        (its loads' revision: the worker loads it once); `failed`, how it failed here."""
        record = _Record(name, action, str(root), token, config_json, failed)
        return self._records.write(name, msgspec.json.encode(record), record.token)

    async def settled(
        self, name: str, action: str, token: str, written: Identity, retire: bool = False
    ) -> None:
        """Until every front has done it (or a newer action replaced it, whose writer waits
        instead), so a client's next call finds it done on any front; or ack_timeout_s. With
        `retire` (an unload that leaves the model as a starting front has it), the record and
        its acknowledgements then go, if every front did acknowledge it."""
        silent = await self._records.wait(name, token, written, self.ack_timeout_s)
        if silent:
            log.warning(
                "model %s: %s not acknowledged by front(s) %s within %.0f s; answering anyway",
                name, action, silent, self.ack_timeout_s,
            )  # fmt: skip
        elif retire:
            self._records.retire(name, token, written)

    def stop_waiting(self) -> None:
        """This front stops: `settled` no longer waits for the others (Acks.stopping)."""
        self._records.acks.stopping = True

    async def poll(self) -> None:
        """Replay what other fronts did since the last poll."""
        fresh = self._records.watch.changed()
        for path, written in fresh:
            try:
                record = _decoder.decode(path.read_bytes())
            except (FileNotFoundError, msgspec.DecodeError):
                continue  # replaced meanwhile: the next poll reads the new one
            self._records.watch.take(path, written)  # a failed replay is not retried every poll
            try:
                await self.manager.replay(
                    record.name, record.action, record.config_json, Path(record.root),
                    record.token, latest=functools.partial(is_current, path, written),
                )  # fmt: skip
            except MicrotuneError as exc:
                # Failing as the front that did it failed is the client's answer, not news:
                # an ERROR is for a front that diverges from the others.
                log.log(
                    logging.DEBUG if record.failed else logging.ERROR,
                    "model %s: %s by another front failed here: %s",
                    record.name, record.action, exc.message,
                )  # fmt: skip
            except Exception:
                log.exception("model %s: %s by another front failed", record.name, record.action)
            # Done here, well or not (a failure is logged): the front that asked stops waiting.
            self._records.acks.ack(record.name, record.token)
