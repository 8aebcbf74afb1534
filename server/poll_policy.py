"""Poll mode's decisions, as pure functions of what a scan found, the model table and the clock
(injected): when the next poll runs, which versions may still be being written, what a poll must
(re)load, and the revision a load carries. ModelManager.poll_once acts on them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from server.models import ModelEntry
from server.repository import ScannedModel
from server.types import Fingerprint, ModelState

__all__ = [
    "CONFIG",
    "SETTLE_S",
    "Seen",
    "config_unsettled",
    "held_back",
    "next_poll_in",
    "poll_work",
    "revision",
    "seen_since",
    "unsettled",
]

# A version whose files changed this recently before a scan may be half-written (a copy in
# place): it waits until scans have found its files unchanged for this long (`unsettled`). So
# does a model whose config file changed (`config_unsettled`).
SETTLE_S = 1.0
_SETTLE_NS = int(SETTLE_S * 1e9)

# The key of a model's config file in `Seen`, beside its version numbers.
CONFIG = "config"

# Per version (and CONFIG): its files at the last scan, and the scan time (ns) they were first
# seen so.
Seen = Mapping[int | str, tuple[Fingerprint, int]]


def next_poll_in(now: float, period_s: float) -> float:
    """Seconds from `now` (wall clock) to the next repository poll: at the multiples of the
    period since the epoch, not `period_s` after this front started. So the fronts of a pod
    (and the pods of a deployment, to their clocks' skew) scan at the same instants: their
    loads of one change reach the worker together, which loads it once and answers them all
    as it finishes, and every front swaps within milliseconds of the others, instead of
    serving the old version for up to a period longer than another."""
    return period_s - now % period_s


def _watched(s: ScannedModel) -> dict[int | str, Fingerprint]:
    """What may be half-written in `s`: its selected versions' files, and its config file."""
    watched: dict[int | str, Fingerprint] = dict(s.files)
    if s.config_files:
        watched[CONFIG] = s.config_files
    return watched


def seen_since(
    s: ScannedModel, now_ns: int, previous: Seen
) -> dict[int | str, tuple[Fingerprint, int]]:
    """`s`'s versions (and CONFIG) with the scan time their files were first seen as they are
    now: kept from `previous` (the last scan's table) when they are unchanged, else `now_ns`.
    A time after `now_ns` (the wall clock stepped back) starts again at `now_ns`."""
    table: dict[int | str, tuple[Fingerprint, int]] = {}
    for key, files in _watched(s).items():
        before = previous.get(key)
        if before is not None and before[0] == files and before[1] <= now_ns:
            table[key] = before
        else:
            table[key] = (files, now_ns)
    return table


def unsettled(s: ScannedModel, now_ns: int, seen: Seen) -> frozenset[int]:
    """The versions of `s` whose files may still be being written: one changed in the last
    SETTLE_S before the scan (`now_ns`, wall clock), whose files the scans (`seen`, this
    scan's `seen_since`) have not found unchanged for SETTLE_S yet. A copy in place (`cp`
    over model.onnx, a sync tool) moves the mtime as it writes: such a version waits instead
    of loading a half-written file (or twice). A writer that pauses for less than SETTLE_S
    (a slow disk, a busy machine) between two short poll periods is still waited for. Files
    unchanged for SETTLE_S of scans count as settled whatever their mtimes say (a clock
    ahead of this one, on a network file system)."""
    return frozenset(v for v, files in s.files.items() if _settling(files, v, now_ns, seen))


def config_unsettled(s: ScannedModel, now_ns: int, seen: Seen) -> bool:
    """Whether `s`'s config file may still be being written, as `unsettled` tells of a
    version's files (an editor saving config.pbtxt, `cp`): the whole model then waits. A
    config cut short may parse, as another config: an empty one has the default policy and
    settings, and the versions it did not select were unloaded until the write ended."""
    return _settling(s.config_files, CONFIG, now_ns, seen)


def _settling(files: Fingerprint, key: int | str, now_ns: int, seen: Seen) -> bool:
    young = now_ns - _SETTLE_NS
    return (
        max((mtime for _, _, mtime in files), default=0) > young
        and now_ns - seen.get(key, (files, now_ns))[1] < _SETTLE_NS
    )


def poll_work(
    entry: ModelEntry | None, s: ScannedModel, waiting: frozenset[int] = frozenset()
) -> frozenset[int] | None:
    """What a repository poll must do for the model scanned as `s` (with a config): None when
    nothing changed, else the versions to (re)load (every selected one when the config
    changed; maybe none, when only a loaded version was removed). `waiting`: versions whose
    files are not settled yet (`unsettled`), left for a later poll (with a config change, the
    whole change waits).

    A version is as it should be when it was last tried with the files it has now and is
    READY (or loading), or failed: a load that failed, or killed the worker twice, is tried
    again once its files or the config change, not at every poll (each try of the latter
    takes every model down)."""
    if entry is None:
        new = frozenset(s.versions) - waiting
        return new if new or not s.versions else None  # (a model still being copied in)
    if entry.spec != s.spec:
        # The whole change waits while a version's files are still being written: the new
        # config must not load a half-copied file.
        return None if waiting else frozenset(s.versions)
    stale = (
        frozenset(
            v
            for v in s.versions
            if (ve := entry.versions.get(v)) is None
            or ve.files != s.files.get(v, ())
            or ve.unloaded  # unloaded by RepositoryModelUnload: the poll loads it again
            or ve.state is ModelState.UNLOADING
        )
        - waiting
    )
    removed = any(
        ve.state is ModelState.READY
        # (a failed one goes too, unless it is still there and still failing: left in the
        # table, it would keep the server unready)
        or (ve.state is ModelState.UNAVAILABLE and v not in s.version_errors)
        for v, ve in entry.versions.items()
        if v not in s.versions
    )
    if removed and not stale and entry.held is not None and entry.held == held_back(entry, s):
        return None  # kept serving while a selected version fails: said once, not every poll
    return stale if stale or removed else None


def held_back(entry: ModelEntry, s: ScannedModel) -> object:
    """What a load of `s` that left versions serving (those READY that the scan no longer
    selects, kept while a selected version does not serve, as Triton keeps them) left as it
    was: those versions, the selected ones' states and the scan's version errors. While it is
    the same, another load would do and say the same."""
    return (
        frozenset(
            v
            for v, ve in entry.versions.items()
            if v not in s.versions and ve.state is ModelState.READY
        ),
        tuple(
            sorted((v, ve.state, ve.files) for v, ve in entry.versions.items() if v in s.versions)
        ),
        tuple(sorted(s.version_errors.items())),
    )


def revision(files: Fingerprint, token: str = "") -> str:
    """A LoadModel's revision: the version files' fingerprint (the same in every front that
    scanned the same files), plus a RepositoryModelLoad's token."""
    digest = hashlib.blake2b(repr(files).encode(), digest_size=8).hexdigest()
    return f"{digest}/{token}" if token else digest
