"""Model lifecycle in the front: which versions are loaded, loading, draining and unloading.

Load is "load, warm up, self-test, then take traffic": a version becomes routable only after the
worker has created its session, checked it against the config, run a warm-up batch of every
batch size and, when the version has a golden.json, reproduced its golden answer. Reloading a
loaded version swaps it in the worker only on success, so a failed reload leaves the old one
serving. Unload first stops routing to a version (UNLOADING), waits for the requests already
routed to it to finish (drain), then frees it in the worker. Model control follows Triton's
modes: none (everything at start-up), explicit (Load/Unload RPCs) and poll (periodic rescan).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from runtime.client import WorkerGone
from runtime.ipc.protocol import (
    GOLDEN_FILE,
    Batching,
    Code,
    LoadModel,
    ModelSignature,
    TensorInfo,
)
from server.errors import (
    InvalidInput,
    LoadFailed,
    LoadInterrupted,
    NotFound,
    Unsupported,
)
from server.model_config import ConfigError, parse_config_json
from server.models import NOT_LOADED, ModelEntry, ModelTable, VersionEntry
from server.overrides import Overrides
from server.pod_records import Identity
from server.poll_policy import (
    Seen,
    config_unsettled,
    held_back,
    next_poll_in,
    poll_work,
    revision,
    seen_since,
    unsettled,
)
from server.repository import ScannedModel, listed_models, scan_model, scan_repository
from server.types import ModelSpec, ModelState
from server.worker_link import WorkerLink

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0
# Worker deaths during a version's load after which it is left UNAVAILABLE (the second one has
# it loading alone: reload_all) and the repository poll stops trying it.
GIVE_UP_AFTER_CRASHES = 2
# Load failures that say nothing of the model: the worker restarts, and the load resumes once it
# is back (reload_all). A RepositoryModelLoad that meets only these is LoadInterrupted:
# UNAVAILABLE, which clients retry, rather than INTERNAL.
RESTARTING = "the runtime worker is restarting"
RESTARTED = "the runtime worker restarted during the load"


class ControlLog(Protocol):
    """Where a front publishes its model control for the others (server.control_sync)."""

    def publish(
        self, name: str, action: str, config_json: str | None, root: Path, token: str,
        failed: str = "",
    ) -> Identity:  # fmt: skip
        """Record the action (under the model's lock), and how it failed here if it did;
        what `settled` waits on."""

    async def settled(
        self, name: str, action: str, token: str, written: Identity, retire: bool = False
    ) -> None:
        """Until every front has done it (outside the lock); then, with `retire`, its record
        goes."""


class ModelManager:
    def __init__(
        self,
        repository: Path,
        link: WorkerLink,
        table: ModelTable,
        intra_op_threads: int,
        mode: str = "none",
        startup: str = "*",
    ) -> None:
        self.repository = repository
        self.link = link
        self.table = table
        self.intra_op_threads = intra_op_threads
        self.mode = mode
        self.startup = startup
        self._locks: dict[str, asyncio.Lock] = {}
        # Called with a model's name after each load of it (failed or not), its unload by
        # request and its removal from the repository: the owner routes it by its config in
        # force (ModelEntry.in_force), or by none when it is no longer asked for.
        self.on_model_changed: Callable[[str], None] | None = None
        # Called with (model, version) once a version is gone from the worker (unloaded, or its
        # model removed from the repository): the owner drops what it keeps about it (metrics).
        self.on_version_unloaded: Callable[[str, int], None] | None = None
        # Called with the model once poll mode found it gone from the repository.
        self.on_model_removed: Callable[[str], None] | None = None
        self.batching_enabled = True
        self.worker_threads = 2  # (Settings.worker_threads: a version's calls at once by default)
        self.overrides = Overrides()  # models uploaded with load parameters
        # Several fronts: model control is the pod's. `control` records what this front did
        # (server.control_sync) before the model's lock is let go, so that a replay of an older
        # action that waited for the lock sees it is not the latest and skips (`replay`), and
        # the RPC answers once every front did it. Overrides go to the pod's directory, where
        # every front (and so the worker, which then loads them once) finds them under one
        # path. The action's token is part of its loads' revision: the fronts' loads of one
        # RepositoryModelLoad are the same to the worker, which loads each version once.
        self.control: ControlLog | None = None
        # Poll mode: each model's version fingerprints at the last scan, with the scan time
        # each was first seen (`seen_since`), and the clock the scan time comes from (wall
        # clock, as file mtimes are).
        self._scanned: dict[str, Seen] = {}
        self.wall_clock: Callable[[], float] = time.time
        # Each model's config fields last said to be ignored (`_say_ignored`).
        self._ignored_said: dict[str, tuple[str, ...]] = {}
        link.on_restart = self.reload_all
        link.on_lost = self.mark_worker_lost

    # ------------------------------------------------------------------ start-up

    async def load_repository(self) -> None:
        scanned = await asyncio.to_thread(scan_repository, self.repository)
        wanted = self._startup_set([s.name for s in scanned])
        for s in scanned:
            if s.name in wanted:
                self.table.models[s.name] = _entry(s)
                _say_refused(s)
                _say_missing(s)
            else:
                entry = ModelEntry(s.name, s.spec, NOT_LOADED, requested=False)
                self.table.models[s.name] = entry
                self._announce(s.name)

        async def load(entry: ModelEntry) -> None:
            await self._load_pending(entry)
            self._announce(entry.name)  # each model as soon as it is loaded (its routing table)

        await asyncio.gather(
            *(load(self.table.models[n]) for n in wanted if n in self.table.models)
        )
        missing = wanted - {s.name for s in scanned}
        for name in sorted(missing):
            log.error("--load-model %s: no such model in %s", name, self.repository)

    def _announce(self, name: str) -> None:
        if self.on_model_changed is not None:
            self.on_model_changed(name)

    def _startup_set(self, names: list[str]) -> set[str]:
        listed = listed_models(self.startup)
        if self.mode != "explicit" or listed == ["*"]:
            return set(names)
        return set(listed)

    # ------------------------------------------------------------------ model control

    def _require_control(self, rpc: str) -> None:
        if self.mode == "none":
            raise Unsupported(f"{rpc} needs --model-control-mode explicit (or poll)")

    async def load(
        self, name: str, config_json: str | None = None, files: Mapping[str, bytes] | None = None
    ) -> None:
        """Load or reload `name` (Triton's RepositoryModelLoad); raises LoadFailed."""
        self._require_control("RepositoryModelLoad")
        _check_name(name)
        token = secrets.token_hex(8)  # a new revision: the same files load again
        failed: LoadFailed | None = None
        async with self._lock(name):
            spec = _override_spec(name, config_json)
            root = self.repository
            if files:
                if spec is None:
                    raise LoadFailed(
                        f"failed to load '{name}': file parameters need a 'config' parameter too"
                    )
                root = await asyncio.to_thread(self.overrides.write, name, files)
            publish = self.control is not None
            try:
                await self._load_from(name, spec, root, token)
            except _Untouched as exc:
                # Nothing changed here: nothing for the other fronts to replay (a record
                # for every mistyped name stayed in the pod's directory for ever, and each
                # other front logged the client's mistake at ERROR).
                failed, publish = exc, False
            except LoadFailed as exc:
                # It may have changed what this front serves (versions no longer selected
                # are unloaded, some loaded): the other fronts do the same, and fail alike.
                failed = exc
            finally:
                # (the root of a failed load is kept only for the other fronts to replay)
                self._prune_overrides(name, keep=root if publish else None)
            written = None
            if publish:
                reason = "" if failed is None else failed.message
                written = self._publish(name, "load", config_json, root, token, reason)
        await self._settled(name, "load", token, written)
        if failed is not None:
            raise failed

    async def unload(self, name: str) -> None:
        self._require_control("RepositoryModelUnload")
        token = secrets.token_hex(8)
        async with self._lock(name):
            entry = self.table.models.get(name)
            if entry is None:
                raise NotFound(f"Request for unknown model: '{name}' is not found")
            await self._unload_model(entry)
            self._prune_overrides(name)
            written = self._publish(name, "unload", None, self.repository, token)
        # A front that starts loads models of the repository only: the unload of any other
        # name leaves it as every front starts, so once every front has done it its record
        # has nothing more to tell and goes (a record per name ever uploaded stayed for ever).
        retire = not (self.repository / name).is_dir()
        await self._settled(name, "unload", token, written, retire)

    def _publish(
        self, name: str, action: str, config_json: str | None, root: Path, token: str,
        failed: str = "",
    ) -> Identity | None:  # fmt: skip
        if self.control is None:
            return None
        return self.control.publish(name, action, config_json, root, token, failed)

    async def _settled(
        self, name: str, action: str, token: str, written: Identity | None, retire: bool = False
    ) -> None:
        if self.control is not None and written is not None:
            await self.control.settled(name, action, token, written, retire)

    async def replay(
        self,
        name: str,
        action: str,
        config_json: str | None,
        root: Path,
        token: str,
        latest: Callable[[], bool] = lambda: True,
    ) -> None:
        """Another front's RepositoryModelLoad or RepositoryModelUnload, applied here unless
        `latest()` says, once the model's lock is taken, that a newer action replaced it (this
        front's own, which held the lock meanwhile: the newer one is what stays)."""
        async with self._lock(name):
            if not latest():
                return
            if action == "load":
                try:
                    await self._load_from(name, _override_spec(name, config_json), root, token)
                finally:
                    self._prune_overrides(name)
                return
            entry = self.table.models.get(name)
            if entry is not None:
                await self._unload_model(entry)
                self._prune_overrides(name)

    def _prune_overrides(self, name: str, keep: Path | None = None) -> None:
        """Remove this front's uploaded copies of `name` that no version is served from
        (Overrides.prune)."""
        entry = self.table.models.get(name)
        live = (ModelState.READY, ModelState.LOADING)
        in_use = [] if entry is None else [
            ve.path for ve in entry.versions.values() if ve.state in live and ve.path
        ]  # fmt: skip
        self.overrides.prune(name, in_use, keep)

    async def _load_from(self, name: str, spec: ModelSpec | None, root: Path, token: str) -> None:
        scanned = await asyncio.to_thread(scan_model, root, name, spec)
        try:
            if scanned.spec is None or (scanned.reason and not scanned.versions):
                entry = self.table.models.get(name)
                if entry is not None and (root / name).is_dir():
                    # Asked for, so its failure counts (readiness) until an unload; what it
                    # loaded before, if anything, serves on. (A name that is not in the
                    # repository is only the request's error.)
                    entry.reason, entry.requested = scanned.reason, True
                    failed: type[LoadFailed] = LoadFailed
                else:
                    failed = _Untouched
                raise failed(
                    f"failed to load '{name}', failed to poll from model repository: "
                    f"{scanned.reason}"
                )
            await self._apply(scanned, token=token)
        finally:
            self._announce(name)

    async def poll_forever(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(next_poll_in(self.wall_clock(), period_s))
            try:
                await self.poll_once()
            except Exception:
                log.exception("repository poll failed")

    async def poll_once(self) -> None:
        """Load new models, versions and changed version files; unload what disappeared."""
        now_ns = int(self.wall_clock() * 1e9)
        scanned = {s.name: s for s in await asyncio.to_thread(scan_repository, self.repository)}
        previous = self._scanned
        self._scanned = {n: seen_since(s, now_ns, previous.get(n, {})) for n, s in scanned.items()}
        for name, s in scanned.items():
            entry = self.table.models.get(name)
            if config_unsettled(s, now_ns, self._scanned[name]):
                continue  # its config is being written: read whole at a later poll
            if s.spec is None:  # a config that no longer parses: what is loaded goes on serving
                self._broken_config(name, entry, s.reason)
                continue
            work = poll_work(entry, s, unsettled(s, now_ns, self._scanned[name]))
            if work is None:
                if entry is not None:
                    entry.reason = s.reason  # (a config that parses again, unchanged)
                continue
            async with self._lock(name):
                try:
                    await self._apply(s, work)
                except LoadFailed as exc:
                    log.error("%s", exc.message)
                self._announce(name)
        for name in set(self.table.models) - set(scanned):
            async with self._lock(name):
                entry = self.table.models[name]
                await self._unload_ready(entry)
                del self.table.models[name]
                for ve in entry.versions.values():  # failed versions too: the model is gone
                    self._forget(ve)
                if self.on_model_removed is not None:
                    self.on_model_removed(name)
                self._announce(name)

    def _broken_config(self, name: str, entry: ModelEntry | None, reason: str) -> None:
        if entry is None:
            self.table.models[name] = ModelEntry(name, None, reason)
        elif entry.reason == reason:
            return  # said once, not at every poll
        else:
            entry.reason = reason
        log.error("%s", reason)

    async def _apply(
        self, s: ScannedModel, only: frozenset[int] | None = None, token: str = ""
    ) -> None:
        """Make the loaded versions of a model those of `s`: load (or reload) the selected
        versions (of them, those in `only` when given; the others are left as they are), then
        drain and unload the ones no longer selected. `token`: a RepositoryModelLoad's, which
        reloads what the worker has loaded even from the same files and config."""
        _say_missing(s)
        entry = self.table.models.get(s.name)
        if entry is None:
            entry = self.table.models[s.name] = ModelEntry(s.name, s.spec)
        entry.spec, entry.reason, entry.requested = s.spec, s.reason, True
        assert s.spec is not None
        jobs = []
        for v, path in s.versions.items():
            if only is not None and v not in only:
                continue
            ve = entry.versions.get(v)
            if ve is None or ve.state is not ModelState.READY:
                ve = entry.versions[v] = VersionEntry(s.name, v, ModelState.LOADING, path=str(path))
            ve.files = s.files.get(v, ())
            jobs.append(self._load_version(s.spec, ve, str(path), revision(ve.files, token)))
        for v, why in s.version_errors.items():
            old = entry.versions.get(v)
            if old is not None and old.state is ModelState.READY:
                old.reason = why  # (its model file went, say): it serves on, as in Triton
                continue
            entry.versions[v] = VersionEntry(s.name, v, ModelState.UNAVAILABLE, why)
        failures = [r for r in await asyncio.gather(*jobs) if r]
        # The versions no longer selected go only once every selected one serves: a new
        # version that failed to load, or is still being copied in (poll mode leaves it for a
        # later poll), must not leave the model with nothing READY (a hot swap with the
        # default `latest` policy is exactly that: 2 replaces 1). Triton unloads the previous
        # versions only when the whole load succeeded, too.
        complete = (
            not failures
            and not s.version_errors
            and all(
                (ve := entry.versions.get(v)) is not None and ve.state is ModelState.READY
                for v in s.versions
            )
        )
        unselected = [
            ve
            for v, ve in entry.versions.items()
            if v not in s.versions and v not in s.version_errors
        ]
        stale = [ve for ve in unselected if ve.state is ModelState.READY]
        # A failed version no longer selected (its directory removed, a new policy) is no
        # longer part of the model: listed on, it would keep the server unready for good.
        for ve in unselected:
            if ve.state is ModelState.UNAVAILABLE:
                del entry.versions[ve.version]
                self._forget(ve)
        # (set before the unloads below: a poll meanwhile must not take them for a change)
        entry.held = None if complete else held_back(entry, s)
        if complete or entry.in_force is None:
            entry.in_force = s.spec
        if complete:
            await asyncio.gather(*(self._unload_version(ve) for ve in stale))
        elif stale:
            log.warning(
                "%s: keeping version(s) %s until every selected version serves",
                s.name,
                ", ".join(str(ve.version) for ve in stale),
            )
        if s.reason:  # (poll mode: its last version directory went, or it came with none)
            raise LoadFailed(f"failed to load '{s.name}': {s.reason}")
        if failures or s.version_errors:
            reasons = failures + list(s.version_errors.values())
            if set(reasons) <= {RESTARTING, RESTARTED}:
                raise LoadInterrupted(f"failed to load '{s.name}': {reasons[0]}; retry")
            raise LoadFailed(f"failed to load '{s.name}': {'; '.join(reasons)}")

    # ------------------------------------------------------------------ worker restarts

    async def reload_all(self) -> None:
        """After a worker restart: every version that was READY or LOADING loads again; those
        that were loading when a worker died go last, one at a time, so that a version whose
        load kills the worker is found out alone (`_load_version`) and the others serve."""
        for e in self.table.models.values():
            for ve in e.versions.values():
                if ve.state is ModelState.READY:
                    ve.state, ve.reason = ModelState.LOADING, "worker restarted; reloading"
        entries = list(self.table.models.values())
        await asyncio.gather(
            *(self._load_version(ve.spec or e.spec, ve, ve.path)
              for e in entries for ve in _loading(e) if not ve.load_crashes)
        )  # fmt: skip
        for e in entries:
            for ve in _loading(e):
                if ve.load_crashes:
                    await self._load_version(ve.spec or e.spec, ve, ve.path)

    def mark_worker_lost(self) -> None:
        for e in self.table.models.values():
            for ve in e.versions.values():
                if ve.state is ModelState.READY:
                    ve.state, ve.reason = ModelState.LOADING, "worker restarting"

    # ------------------------------------------------------------------ internals

    def _batching(self, spec: ModelSpec) -> Batching | None:
        db = spec.dynamic_batching
        if db is None or not self.batching_enabled or spec.max_batch_size < 1:
            return None
        return Batching(
            db.max_queue_delay_us, db.preferred_batch_sizes, db.max_queue_size, db.instances
        )

    def instances(self, spec: ModelSpec) -> int:
        """How many calls (batches, with dynamic batching) of a version of `spec` the worker
        runs at once: its instance count, as ModelConfig reports it."""
        welcome = self.link.welcome
        if spec.max_batch_size > 0 and welcome is not None and welcome.device.startswith("cuda"):
            return 1  # served from CUDA graphs, by one thread (runtime.engine.graph_model)
        batching = self._batching(spec)
        if batching is not None:
            return batching.instances
        return spec.instances or self.worker_threads

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    async def _load_pending(self, entry: ModelEntry) -> None:
        await asyncio.gather(
            *(self._load_version(ve.spec or entry.spec, ve, ve.path) for ve in _loading(entry))
        )

    async def _load_version(
        self, spec: ModelSpec | None, ve: VersionEntry, path: str, rev: str = ""
    ) -> str:
        """Load one version; returns "" on success or the reason it failed. A READY version
        stays READY (serving the old instance) until the worker has the new one. `rev`: the
        LoadModel's revision (`revision`); "" (start-up, worker restart) takes the instance
        the worker has, of any revision, if another front loaded it from the same path and
        config."""
        assert spec is not None
        self._say_ignored(spec)
        try:
            client = self.link.require()
        except WorkerGone:
            return RESTARTING
        try:
            msg = LoadModel(
                client.next_request_id(),
                spec.name,
                ve.version,
                path,
                spec.max_batch_size,
                _declared(spec),
                self.intra_op_threads,
                rev,
                self._batching(spec),
                _golden(path),
                reshapes=tuple(
                    (t.name, t.reshape)
                    for t in (*spec.inputs, *spec.outputs)
                    if t.reshape is not None
                ),
                instances=spec.instances,
            )
            done = await client.load(msg)
        except WorkerGone:
            return self._died_loading(spec.name, ve)
        ve.load_crashes = 0
        if done.code == Code.OK and done.signature is not None:
            ve.signature, ve.spec, ve.path, ve.load_ns = done.signature, spec, path, done.load_ns
            ve.device_memory = done.device_memory
            ve.state, ve.reason = ModelState.READY, done.message  # e.g. "without CUDA graphs"
            if done.reused:
                log.info("%s version %d: already loaded in the worker", spec.name, ve.version)
            else:
                log.info(
                    "loaded %s version %d in %.1f ms", spec.name, ve.version, done.load_ns / 1e6
                )
            return ""
        reason = f"version {ve.version}: {done.message}"
        if ve.state is not ModelState.READY:
            ve.state, ve.reason = ModelState.UNAVAILABLE, done.message
        else:  # said in RepositoryIndex until a load succeeds
            ve.reason = f"reload failed, serving the instance loaded before: {done.message}"
        log.error("model %s %s", spec.name, reason)
        return reason

    def _say_ignored(self, spec: ModelSpec) -> None:
        """A warning naming the config fields microtune accepts but does not act on (a config
        moved over from Triton), once per model and config, not once per version or reload."""
        if self._ignored_said.get(spec.name, ()) != spec.ignored and spec.ignored:
            log.warning(
                "model %s: config fields accepted but ignored by microtune: %s",
                spec.name,
                ", ".join(spec.ignored),
            )
        self._ignored_said[spec.name] = spec.ignored

    def _died_loading(self, name: str, ve: VersionEntry) -> str:
        """The worker died while it loaded `ve` (and maybe others). The second time, `ve` was
        loading alone (reload_all) or is the one that keeps doing it: leave it UNAVAILABLE."""
        ve.load_crashes += 1
        if ve.load_crashes < GIVE_UP_AFTER_CRASHES:
            return RESTARTED
        reason = (
            "the runtime worker died twice while loading this version (a crash in onnxruntime "
            "or CUDA); not loaded again until a load request or a change in the repository"
        )
        ve.state, ve.reason = ModelState.UNAVAILABLE, reason
        log.error("model %s version %d: %s", name, ve.version, reason)
        return f"version {ve.version}: {reason}"

    async def _unload_model(self, entry: ModelEntry) -> None:
        """RepositoryModelUnload, this front's or another's (replayed)."""
        await self._unload_ready(entry)
        for ve in entry.versions.values():  # (failed ones too: the model is not wanted now)
            ve.unloaded = True
        # Nothing of it serves: its next load is as its first (its config takes force even if
        # a version fails, and its table gates its routing while its versions load).
        entry.reason, entry.requested, entry.in_force = "unloaded", False, None
        self._announce(entry.name)

    async def _unload_ready(self, entry: ModelEntry) -> None:
        """Drain and unload every READY version of a model, concurrently."""
        await asyncio.gather(
            *(
                self._unload_version(ve)
                for ve in entry.versions.values()
                if ve.state is ModelState.READY
            )
        )

    async def _unload_version(self, ve: VersionEntry) -> None:
        ve.state, ve.reason = ModelState.UNLOADING, "draining"
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while ve.inflight > 0 and time.monotonic() < deadline:  # noqa: ASYNC110 - a counter
            await asyncio.sleep(0.005)
        with contextlib.suppress(WorkerGone):
            await self.link.require().unload(ve.model, ve.version)
        ve.state, ve.reason, ve.signature = ModelState.UNAVAILABLE, "unloaded", None
        self._forget(ve)
        log.info("unloaded %s version %d", ve.model, ve.version)

    def _forget(self, ve: VersionEntry) -> None:
        ve.unloaded = True
        if self.on_version_unloaded is not None:
            self.on_version_unloaded(ve.model, ve.version)

    def close(self) -> None:
        self.overrides.close()


_NAME_MAX = 255  # bytes in a file name (NAME_MAX on Linux)


class _Untouched(LoadFailed):
    """A load refused before it changed anything on this front (a name not in the repository,
    a model not loaded whose config does not parse)."""


def _check_name(name: str) -> None:
    """A model is a directory of the repository: its name is joined to paths (the repository's,
    an upload's private root), so one that could lead out of them ("../x", "/etc") is refused
    before anything reads or writes a file (Triton's CVE-2023-31036 was this)."""
    if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
        raise InvalidInput(
            f"'{name[:128]}' is not a model name: a model is a directory of the repository, "
            "named without '/', '\\' or a leading '.'"
        )
    if len(name.encode()) > _NAME_MAX:  # (the file system refuses it: ENAMETOOLONG)
        raise InvalidInput(
            f"'{name[:128]}...' is not a model name: a model is a directory of the repository, "
            f"and a directory's name has at most {_NAME_MAX} bytes"
        )


def _override_spec(name: str, config_json: str | None) -> ModelSpec | None:
    if config_json is None:
        return None
    try:
        return parse_config_json(config_json, name)
    except ConfigError as exc:
        raise LoadFailed(
            f"failed to load '{name}', failed to poll from model "
            f"repository: invalid config override: {exc}"
        ) from None


def _loading(entry: ModelEntry) -> list[VersionEntry]:
    """The model's versions waiting to be loaded (with a config to load them by)."""
    return [
        ve
        for ve in entry.versions.values()
        if ve.state is ModelState.LOADING and (ve.spec or entry.spec) is not None
    ]


def _say_refused(s: ScannedModel) -> None:
    """Why a model, or some of its versions, cannot load (a config refused, no version
    directory, one without its model file), at ERROR as a failed load is. Said once at start-up:
    the entry keeps the reason, so poll mode speaks again only when it changes (_broken_config,
    _apply). Otherwise the only trace of a model that keeps a strict server unready for good
    is RepositoryIndex, which an operator reading the pod's log rarely has at hand."""
    if s.reason:  # (these name the model)
        log.error("%s", s.reason)
    for v in sorted(s.version_errors):
        log.error("model %s %s", s.name, s.version_errors[v])


def _say_missing(s: ScannedModel) -> None:
    """A version the `specific` policy names without a directory is skipped, as in Triton, and
    said at ERROR in Triton's words: a load that answers OK would otherwise hide it."""
    for v in s.missing:
        log.error(
            "version %d is specified for model '%s', but the version directory is not present",
            v,
            s.name,
        )


def _entry(s: ScannedModel) -> ModelEntry:
    entry = ModelEntry(s.name, s.spec, s.reason, in_force=s.spec)
    for v, path in s.versions.items():
        entry.versions[v] = VersionEntry(
            s.name, v, ModelState.LOADING, path=str(path), spec=s.spec, files=s.files.get(v, ())
        )
    for v, why in s.version_errors.items():
        entry.versions[v] = VersionEntry(s.name, v, ModelState.UNAVAILABLE, why)
    return entry


def _golden(model_path: str) -> str:
    """The version's golden request/response pair (golden.json beside its model file), if any:
    the worker must reproduce it before the version takes traffic."""
    golden = Path(model_path).with_name(GOLDEN_FILE)
    return str(golden) if golden.is_file() else ""


def _declared(spec: ModelSpec) -> ModelSignature:
    return ModelSignature(
        tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.inputs),
        tuple(TensorInfo(t.name, t.datatype, t.dims) for t in spec.outputs),
    )
