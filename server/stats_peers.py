"""ModelStatistics for the pod with `--frontends N`: each front's counts, gathered on request.

Every front counts the requests it served (server.stats). A client's statistics call reaches
one front, which must answer for the pod, as Triton answers for the server: perf_analyzer reads
the statistics on one connection while its load spreads over every front. Each front therefore
serves a snapshot of its counts on a Unix socket in the supervisor's directory for its fronts
(`stats-<front index>.sock`), and the front that got the call asks every other one and sums
(server.stats.merged). A front that does not answer within the timeout (restarting, gone) is
left out; a restarted front counts from zero again, as a restarted Triton does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
from collections.abc import Callable
from pathlib import Path

import msgspec

from server.stats import VersionStats

__all__ = ["Snapshot", "StatsPeers"]

log = logging.getLogger(__name__)

Snapshot = list[tuple[str, int, VersionStats]]  # (model, version, its counts in this front)

_LEN = struct.Struct("<I")
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Snapshot)


class StatsPeers:
    def __init__(self, directory: Path, index: int, snapshot: Callable[[], Snapshot]) -> None:
        self.directory = directory
        self.path = directory / f"stats-{index}.sock"
        self._snapshot = snapshot
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # left by this index's previous front, if it died
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.path.unlink(missing_ok=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            body = _encoder.encode(self._snapshot())
            writer.write(_LEN.pack(len(body)) + body)
            await writer.drain()
        except OSError:
            pass  # the asking front gave up
        finally:
            writer.close()

    async def gather(self, timeout_s: float = 1.0) -> list[Snapshot]:
        """The other fronts' snapshots (those that answered within `timeout_s`)."""
        peers = [p for p in self.directory.glob("stats-*.sock") if p != self.path]
        got = await asyncio.gather(*(self._ask(p, timeout_s) for p in peers))
        return [s for s in got if s is not None]

    async def _ask(self, path: Path, timeout_s: float) -> Snapshot | None:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_unix_connection(str(path))
                try:
                    (size,) = _LEN.unpack(await reader.readexactly(_LEN.size))
                    return _decoder.decode(await reader.readexactly(size))
                finally:
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, msgspec.DecodeError) as exc:
            log.debug("no statistics from %s: %s", path.name, exc)
            return None
