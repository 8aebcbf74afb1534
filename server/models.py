"""The front's table of models and versions: state, reason, signature and statistics.

Mutated only on the event loop by the lifecycle (server.lifecycle); read by the handler.
Resolution turns a (model, version string) into a READY version or a domain error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from runtime.ipc.protocol import ModelSignature
from server.errors import NotFound, NotReady
from server.stats import VersionStats
from server.types import Fingerprint, ModelIndexEntry, ModelSpec, ModelState
from server.versions import parse_version

__all__ = ["NOT_LOADED", "ModelEntry", "ModelTable", "VersionEntry"]

# Why a model of the repository the server was not asked to load does not serve.
NOT_LOADED = "not loaded"

_READY = ModelState.READY  # read per request: an Enum member via its class costs ~1k instructions


@dataclass(slots=True)
class VersionEntry:
    model: str
    version: int
    state: ModelState
    reason: str = ""
    signature: ModelSignature | None = None
    spec: ModelSpec | None = None  # the config this version was loaded with
    path: str = ""
    inflight: int = 0  # requests routed here and not finished: unload drains them first
    load_ns: int = 0
    device_memory: int | None = None  # bytes its load took on the GPU (None: CPU, unknown)
    stats: VersionStats = field(default_factory=VersionStats)
    # Freed in the worker by an unload (not a failed load): listed as UNAVAILABLE, but its
    # metric series are gone (Metrics.forget_version). A new load makes a new entry.
    unloaded: bool = False
    # Worker deaths while this version was loading (a crash in onnxruntime or CUDA kills the
    # worker, not just the load): 1 makes it a suspect, loaded alone after a restart; 2 with
    # it loading alone, and it is left UNAVAILABLE instead of taking the worker down again.
    load_crashes: int = 0
    # The version directory's files at its last load attempt (server.repository.fingerprint):
    # poll mode loads it again only once they differ.
    files: Fingerprint = ()


@dataclass(slots=True)
class ModelEntry:
    name: str
    spec: ModelSpec | None  # the config of its last load, whether that succeeded or not
    reason: str = ""  # model-level failure (bad config, no versions)
    versions: dict[int, VersionEntry] = field(default_factory=dict)
    # The config in force, whose routing table applies: that of its last load that succeeded
    # whole (or of its first). A load that fails leaves the versions serving as they were,
    # and their config with it; each version's own (VersionEntry.spec) is what ModelConfig
    # reports and requests are checked against.
    in_force: ModelSpec | None = None
    # Whether the server is meant to serve it: false for a model of the repository that
    # explicit mode did not load at start-up, and for one unloaded by request, until a load.
    # Readiness (--strict-readiness) counts only the failures of requested models.
    requested: bool = True
    # Set by a load that left versions the scan no longer selects serving, because a selected
    # one does not (server.poll_policy.held_back): the next polls leave them be until the
    # scan or the table changes, instead of trying (and logging) again at every period.
    held: object = None

    def ready_versions(self) -> list[int]:
        return sorted(v for v, e in self.versions.items() if e.state is _READY)

    def highest_ready(self) -> int | None:
        """The highest ready version (None: none is ready), without sorting them all."""
        return max((v for v, e in self.versions.items() if e.state is _READY), default=None)


class ModelTable:
    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}

    def get(self, name: str) -> ModelEntry:
        entry = self.models.get(name)
        if entry is None:
            # Wording as Triton's: tritonclient's examples look for "Request for unknown model".
            raise NotFound(f"Request for unknown model: '{name}' is not found")
        return entry

    def resolve(self, name: str, version: str) -> VersionEntry:
        """The READY version to serve, or NotFound / NotReady / InvalidInput."""
        entry = self.get(name)
        if version:
            v = parse_version(version)
            ve = entry.versions.get(v)
            if ve is None:
                have = ", ".join(str(x) for x in sorted(entry.versions)) or "none"
                raise NotFound(f"model '{name}' has no version {v} (versions: {have})")
            if ve.state is not ModelState.READY:
                raise NotReady(_not_ready(name, ve))
            return ve
        ready = entry.ready_versions()
        if ready:
            return entry.versions[ready[-1]]
        raise NotReady(self.why_unavailable(name))

    def why_unavailable(self, name: str) -> str:
        """Why model `name` has no READY version: config error, loading, load failures."""
        entry = self.get(name)
        if entry.reason:
            return f"model '{name}' is not available: {entry.reason}"
        if any(e.state is ModelState.LOADING for e in entry.versions.values()):
            return f"model '{name}' is loading"
        reasons = "; ".join(_not_ready(name, e) for e in entry.versions.values())
        return reasons or f"model '{name}' has no ready version"

    def is_ready(self, name: str, version: str) -> bool:
        """Whether `version` ("": any) of `name` serves; a version string that is not one is
        InvalidInput, as in Triton."""
        try:
            self.resolve(name, version)
        except (NotFound, NotReady):
            return False
        return True

    def index(
        self, ready_only: bool, on_disk: frozenset[str] | None = None
    ) -> list[ModelIndexEntry]:
        """`on_disk`: the repository's models now, when the table may lag it (explicit and
        none modes): those not in the table are listed as never loaded, and a model gone from
        the disk is no longer listed unless it was loaded and serves on."""
        out: list[ModelIndexEntry] = []
        for name in sorted(self.models.keys() | (on_disk or ())):
            entry = self.models.get(name)
            gone = on_disk is not None and name not in on_disk
            if gone and entry is not None and not entry.requested:
                continue  # gone from the disk, and not served
            if entry is None or (entry.reason == NOT_LOADED and not entry.versions):
                # Never loaded: its name only, without a state or a reason, as Triton lists a
                # model it knows of and never loaded (clients tell it from a failed one so).
                if not ready_only:
                    out.append(ModelIndexEntry(name, "", "", ""))
                continue
            if entry.reason and not entry.versions:
                if not ready_only:
                    out.append(
                        ModelIndexEntry(name, "", ModelState.UNAVAILABLE.value, entry.reason)
                    )
                continue
            for v in sorted(entry.versions):
                ve = entry.versions[v]
                if ready_only and ve.state is not ModelState.READY:
                    continue
                # (a model-level reason, say a config that stopped parsing in poll mode, is
                # said on versions that go on serving the config they were loaded with, and
                # first: the version's own reason, an earlier failed reload say, hid it)
                reason = "; ".join(dict.fromkeys(r for r in (entry.reason, ve.reason) if r))
                out.append(ModelIndexEntry(name, str(v), ve.state.value, reason))
        return out

    def failed(self) -> bool:
        """Whether a model the server should serve is not available: its config does not parse
        or names no version, or a version of it failed to load (--strict-readiness). Models
        not loaded at start-up (explicit mode) and those unloaded by request do not count."""
        return any(_failed(entry) for entry in self.models.values())

    def failed_models(self) -> list[str]:
        """The models that make `failed()` true, by name."""
        return sorted(name for name, entry in self.models.items() if _failed(entry))

    def loading(self) -> bool:
        return any(
            ve.state is ModelState.LOADING
            for e in self.models.values()
            for ve in e.versions.values()
        )


def _failed(entry: ModelEntry) -> bool:
    if not entry.requested:
        return False
    # A model-level failure counts unless versions loaded before serve on (or load): one
    # asked for again after an unload keeps its old config and its unloaded versions' entries.
    if entry.reason and not any(
        ve.state is _READY or ve.state is ModelState.LOADING for ve in entry.versions.values()
    ):
        return True
    return any(
        ve.state is ModelState.UNAVAILABLE and not ve.unloaded for ve in entry.versions.values()
    )


def _not_ready(name: str, ve: VersionEntry) -> str:
    if ve.state is ModelState.LOADING:
        return f"model '{name}' version {ve.version} is loading"
    why = f": {ve.reason}" if ve.reason else ""
    return f"model '{name}' version {ve.version} is {ve.state.value.lower()}{why}"
