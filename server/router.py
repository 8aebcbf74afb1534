"""Routing state of the front: the effective table per model, canary guards, shadow stats.

Tables come from three sources; the first that has one for a model wins:
admin RPC override > routing file (watched, e.g. a mounted ConfigMap) > the model config's
`parameters { key: "routing" }`. The effective tables are one immutable snapshot
(`RoutingTables`) replaced whole on every change, after validation against the loaded
versions; a rejected change leaves the previous snapshot serving. Per-request decisions are
the pure `server.routing.resolve` (the usual request, with nothing pinned and no table, is
answered by its step 3 here directly); time and randomness are injected here.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.errors import NotFound
from server.models import ModelTable
from server.routing import (
    GuardConfig,
    GuardState,
    Route,
    RoutingError,
    RoutingTable,
    RoutingTables,
    VersionNotReady,
    evaluate,
    observe,
    parse_routing_file_json,
    parse_table_json,
    resolve,
    table_to_dict,
    validate,
    with_canary_weight,
)

__all__ = ["RouteHints", "Router", "RoutingView", "ShadowTally"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RouteHints:
    """What a request says about routing besides model_version (gRPC metadata, parameters)."""

    header_version: str | None = None  # x-model-version: a number or a label
    routing_key: str | None = None  # x-routing-key, else the `routing_key` parameter
    canary_weight: str | None = None  # x-canary-weight


@dataclass(slots=True)
class ShadowTally:
    requests: int = 0
    errors: int = 0
    mismatches: int = 0
    max_abs_diff: float = 0.0
    latency_s: float = 0.0


@dataclass(slots=True)
class _Guard:
    state: GuardState
    # (stable, canary, rule, canary has a share) it samples for
    watching: tuple[int | None, int | None, GuardConfig, bool]
    last_eval: float = 0.0


@dataclass(frozen=True, slots=True)
class RoutingView:
    model: str
    source: str
    table: dict[str, object] | None
    ready_versions: tuple[int, ...]
    rollbacks: int
    last_rollback: str
    shadow: ShadowTally
    file_error: str


@dataclass(slots=True)
class _Counters:
    rollbacks: dict[str, int] = field(default_factory=dict)
    last_rollback: dict[str, str] = field(default_factory=dict)
    shadow: dict[str, ShadowTally] = field(default_factory=dict)


class Router:
    def __init__(
        self,
        models: ModelTable,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_rollback: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.models = models
        self.rng = rng or random.Random()
        self.clock = clock
        self.on_rollback = on_rollback
        # Called with (model, rollback reason or "") when this front's own decision (SetRouting,
        # ClearRouting, a guard rollback) changed a model's admin table: with several fronts,
        # server.admin_sync publishes it to the others.
        self.on_admin: Callable[[str, str], None] | None = None
        self.tables = RoutingTables()  # the effective snapshot, read per request
        self.sources: dict[str, str] = {}
        self._admin: dict[str, RoutingTable] = {}
        self._file = RoutingTables()
        self._config: dict[str, RoutingTable] = {}
        self._guards: dict[str, _Guard] = {}
        self._stable: dict[int, Route] = {}  # Route(v, "stable") by v: immutable, shared
        self.counters = _Counters()
        self.file_error = ""
        self._file_bytes: bytes | None = None  # the routing file as last read
        # Models whose config's routing table has been applied or refused since they were
        # (re)loaded as a whole: until then, one whose config has a table is not routed without
        # a pinned version (at start-up, or after an unload, its versions become READY one by
        # one before their table applies; the first to load took every request, whatever the
        # table said).
        self._config_seen: set[str] = set()

    # ------------------------------------------------------------------ per request

    def route(self, model: str, request_version: str, hints: RouteHints) -> Route:
        entry = self.models.get(model)
        # (A model unloaded, or never loaded, is not loading: its requests hear why it is not
        # available, below.)
        if model not in self.tables and model not in self._config_seen and entry.requested:
            spec = entry.spec
            pinned = request_version or hints.header_version
            if not pinned and spec is not None and "routing" in spec.parameters:
                raise VersionNotReady(
                    f"model '{model}' is loading: its routing table applies once its versions serve"
                )
        if (
            not request_version
            and hints.header_version is None
            and not hints.canary_weight
            and model not in self.tables
        ):
            # resolve()'s step 3, the usual request: nothing pinned, no table -> the highest
            # ready version, "stable". Taken here without building its arguments (two
            # frozensets, a sorted list: ~8k instructions a request); the test suite checks it
            # answers as resolve() does.
            best = entry.highest_ready()
            if best is not None:
                got = self._stable.get(best)
                if got is None:
                    got = self._stable[best] = Route(best, "stable")
                return got
        ready = frozenset(entry.ready_versions())
        try:
            return resolve(
                request_version=request_version,
                header_version=hints.header_version,
                routing_key=hints.routing_key,
                table=self.tables.get(model),
                ready_versions=ready,
                rng=self.rng,
                canary_weight_header=hints.canary_weight,
                model=model,
                known_versions=frozenset(entry.versions),
            )
        except VersionNotReady:
            pinned = request_version or (hints.header_version or "").strip()
            if pinned.isascii() and pinned.isdigit():
                # A pinned version: the table says why it is not ready (its load failure,
                # loading, unloaded), in Triton's words; this raises.
                self.models.resolve(model, pinned)
            if ready:
                raise
            # resolve() sees version numbers only; the table knows why none is ready (failed
            # to load, loading, worker restarting), which is what the client needs to hear.
            raise VersionNotReady(self.models.why_unavailable(model)) from None

    def observe(self, model: str, version: int, latency_s: float, ok: bool) -> None:
        """Feed the canary guard (if the model has one) and roll back on a breach."""
        table = self.tables.get(model)
        if table is None or table.guard is None:
            return
        now = self.clock()
        g = self._guards.get(model)
        canary_on = (
            table.canary_version is not None and table.weights.get(table.canary_version, 0) > 0
        )
        watching = (table.stable_version, table.canary_version, table.guard, canary_on)
        if g is None or g.watching != watching:
            # A new canary, stable or rule starts a fresh window: samples taken before (say, of
            # a version pinned for testing before it became the canary) must not judge it. So
            # does a canary given a share again: what it answered while it had none (pinned
            # requests to a build that was rolled back, then fixed) must not roll it back.
            g = self._guards[model] = _Guard(GuardState.for_config(table.guard), watching)
        g.state = observe(g.state, version, now, latency_s, ok)
        if now - g.last_eval < 0.5:  # evaluating twice a second is plenty
            return
        g.last_eval = now
        stable, canary = table.stable_version, table.canary_version
        if stable is None or canary is None or not canary_on:
            return
        decision = evaluate(g.state, table.guard, stable, canary, now)
        if decision.rollback:
            self._rollback(model, table, canary, decision.reason)

    def _rollback(self, model: str, table: RoutingTable, canary: int, reason: str) -> None:
        rolled = with_canary_weight(table, 0)
        # The rollback is an admin-level decision: it must survive file or config reloads.
        self._admin[model] = rolled
        self._rebuild()
        self._count_rollback(model, canary, reason)
        log.warning("canary guard rolled back model %s version %d: %s", model, canary, reason)
        if self.on_rollback is not None:
            self.on_rollback(model, canary, reason)
        if self.on_admin is not None:
            self.on_admin(model, reason)

    # ------------------------------------------------------------------ sources

    def set_admin(self, model: str, table_json: str) -> None:
        self.apply_admin(model, table_json)
        if self.on_admin is not None:
            self.on_admin(model, "")

    def clear_admin(self, model: str) -> None:
        self.drop_admin(model)
        if self.on_admin is not None:
            self.on_admin(model, "")

    def admin_table(self, model: str) -> RoutingTable | None:
        return self._admin.get(model)

    def apply_admin(self, model: str, table_json: str, rollback: str = "") -> None:
        """Set `model`'s admin table (validated); `rollback`: the reason when it is another
        front's guard rollback, counted here too so that GetRouting says so on every front."""
        self.models.get(model)
        table = parse_table_json(table_json)
        self._validate(model, table)
        self._admin[model] = table
        self._rebuild()
        if rollback:
            self._count_rollback(model, table.canary_version, rollback)

    def _count_rollback(self, model: str, canary: int | None, reason: str) -> None:
        """What a guard rollback leaves behind, this front's or another's: a fresh guard window
        (old samples would trigger the same rollback again), the counters GetRouting shows, and
        the canary version's reason."""
        self._guards.pop(model, None)
        self.counters.rollbacks[model] = self.counters.rollbacks.get(model, 0) + 1
        self.counters.last_rollback[model] = reason
        entry = self.models.models.get(model)
        if entry is not None and canary is not None and canary in entry.versions:
            entry.versions[canary].reason = f"canary rolled back by the guard: {reason}"

    def drop_admin(self, model: str) -> None:
        self.models.get(model)
        self._admin.pop(model, None)
        self._rebuild()

    def set_config_table(self, model: str, routing_json: str | None) -> None:
        """From the `routing` parameter of the model's config in force (ModelEntry.in_force),
        after each (re)load of the model, also one that failed (which leaves that config as it
        was: its versions serve on, their table with them).

        A rejected table leaves the model's previous config table serving, as any rejected
        table does: dropping it sent every request to the highest ready version, typically
        the canary, over a typo in a weight or a load that failed."""
        self._config_seen.add(model)
        if routing_json is None:
            self._config.pop(model, None)
        else:
            try:
                table = parse_table_json(routing_json)
                self._validate(model, table)
            except RoutingError as exc:
                kept = "the previous one" if model in self._config else "none"
                log.error(
                    "model %s: the routing table in its config is rejected (%s keeps serving): %s",
                    model,
                    kept,
                    exc.message,
                )
                return
            self._config[model] = table
        self._rebuild()

    def forget_config(self, model: str) -> None:
        """The model no longer serves (unloaded by request, gone from the repository): its
        config table goes, and its next load is gated as its first (`route`). Kept, the table
        of the versions it had sent requests to versions still loading, and so fell back to
        the highest ready one, the canary, for the length of the load."""
        self._config_seen.discard(model)
        if self._config.pop(model, None) is not None:
            self._rebuild()

    def reload_file(self, path: Path) -> bool:
        """(Re)read the routing file if it changed; True if a new file was applied."""
        # Compared by content, not mtime: a file rewritten in place within one tick of the
        # kernel's file clock (a jiffy before Linux 6.13), say by `>` that truncates and then
        # writes, keeps its mtime, and a poll between the two would keep the empty file's error.
        # The file is small and read once a second.
        try:
            raw = path.read_bytes()
        except OSError as exc:  # a typo'd path, a volume not mounted, a directory
            self._file_failed(f"cannot read {path}: {exc.strerror}")
            return False
        if raw == self._file_bytes and not self.file_error:
            return False
        # After an error the file is tried again at each poll, even unchanged: whether it is
        # valid depends on the server too (a version it names may be loading, a model not
        # loaded yet), and it must apply once that changes, not wait for an edit; and the file
        # in force that comes back after a failed read clears the error. Its error is logged
        # when it changes. `_file_bytes` is the file in force: bytes recorded before they were
        # parsed made the next poll skip a file that had failed in an unexpected way, with no
        # error to show.
        try:
            tables = parse_routing_file_json(raw)  # any problem of the content: RoutingError
            self._validate_file(tables)
        except RoutingError as exc:
            self._file_failed(f"{path}: {exc.message}; the previous tables keep serving")
            return False
        self._file, self._file_bytes, self.file_error = tables, raw, ""
        self._rebuild()
        log.info("routing file %s applied (%d model(s))", path, len(tables))
        return True

    def _file_failed(self, error: str) -> None:
        """Logged when the error changes, not at each poll of the file (once a second)."""
        if error != self.file_error:
            log.error("routing file rejected: %s", error)
        self.file_error = error

    def _validate(self, model: str, table: RoutingTable) -> None:
        entry = self.models.models.get(model)
        if entry is None:
            raise RoutingError("no such model in the repository")
        validate(table, frozenset(entry.ready_versions()))

    def _validate_file(self, tables: RoutingTables) -> None:
        """Every model's problems, each under its model's name: the file's one error is shown
        for every model (the whole file waits), so a bare "weights name version 2" read as
        if it were about each of them."""
        problems = []
        for model, table in tables.items():
            try:
                self._validate(model, table)
            except RoutingError as exc:
                problems.append(f"model '{model}': {exc.message}")
        if problems:
            raise RoutingError("; ".join(problems))

    def _rebuild(self) -> None:
        tables: dict[str, RoutingTable] = {}
        sources: dict[str, str] = {}
        for source, mapping in (
            ("config", self._config),
            ("file", self._file),
            ("admin", self._admin),
        ):
            for model, table in mapping.items():
                tables[model] = table
                sources[model] = source
        self.tables = RoutingTables(tables)
        self.sources = sources

    # ------------------------------------------------------------------ reporting

    def shadow_tally(self, model: str) -> ShadowTally:
        return self.counters.shadow.setdefault(model, ShadowTally())

    def view(self, model: str) -> RoutingView:
        entry = self.models.models.get(model)
        if entry is None:
            raise NotFound(f"Request for unknown model: '{model}' is not found")
        table = self.tables.get(model)
        return RoutingView(
            model=model,
            source=self.sources.get(model, "none"),
            table=None if table is None else table_to_dict(table),
            ready_versions=tuple(entry.ready_versions()),
            rollbacks=self.counters.rollbacks.get(model, 0),
            last_rollback=self.counters.last_rollback.get(model, ""),
            shadow=self.counters.shadow.get(model, ShadowTally()),
            file_error=self.file_error,
        )
