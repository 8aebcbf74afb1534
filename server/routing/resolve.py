"""Per-request version resolution: which version serves a request, and why. Pure; randomness is
injected. May import: routing.table, routing.split, routing.errors, server.errors,
server.versions.

Precedence:
1. ``model_version`` in the request -> that version, reason ``pinned``.
2. metadata ``x-model-version``: digits -> that version (``pinned``); otherwise a label -> its
   version (``label``). An unknown label is UnknownLabel (NOT_FOUND).
3. no routing table -> the highest ready version, ``stable``.
4. the weighted split (the table's weights, or ``x-canary-weight``'s override when the table
   allows it) at the routing key's point, or at a random point when there is no key; a table
   without weights serves its default label. Reason ``canary`` when the version served is the
   ``canary`` label's, else ``stable``.

A pinned or labelled version that is not ready is VersionNotReady (UNAVAILABLE): the client
asked for it. When the split lands on a version that is not ready, the request falls back,
deterministically, to the table's fallback label (``default_label``, else ``stable``) if that
version is ready, else to the highest ready version (which may be the canary: serving beats
failing while a version restarts). ``x-canary-weight`` is read only by step 4.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from server.errors import NotFound
from server.routing.errors import InvalidRoutingHeader, UnknownLabel, VersionNotReady
from server.routing.split import (
    RandomSource,
    override_canary,
    pick_weighted,
    random_point,
    route_key_point,
)
from server.routing.table import BP_TOTAL, RoutingTable
from server.versions import parse_version

__all__ = [
    "HEADER_CANARY_WEIGHT",
    "HEADER_MODEL_VERSION",
    "HEADER_ROUTING_KEY",
    "Route",
    "RouteReason",
    "parse_canary_weight",
    "resolve",
]

HEADER_MODEL_VERSION = "x-model-version"
HEADER_ROUTING_KEY = "x-routing-key"
HEADER_CANARY_WEIGHT = "x-canary-weight"

RouteReason = Literal["pinned", "label", "canary", "stable"]

_BP_RE = re.compile(r"\s*(\d{1,5})\s*")
_PERCENT_RE = re.compile(r"\s*(\d{1,3})(?:\.(\d{1,2}))?\s*%\s*")


@dataclass(frozen=True, slots=True)
class Route:
    version: int
    reason: RouteReason


def resolve(
    *,
    request_version: str,
    header_version: str | None,
    routing_key: str | None,
    table: RoutingTable | None,
    ready_versions: frozenset[int],
    rng: RandomSource,
    canary_weight_header: str | None = None,
    model: str = "",
    known_versions: frozenset[int] | None = None,
) -> Route:
    """The version to serve (see the module docstring). ``model`` only names the model in error
    messages; ``known_versions`` (all versions the model has, in any state), when given, turns
    a pinned version the model does not have into NotFound instead of VersionNotReady.
    ``rng`` is drawn from only when the split runs without a routing key."""
    who = f"model '{model}'" if model else "the model"
    if request_version:
        version = parse_version(request_version)
        return Route(_check_pinned(version, ready_versions, known_versions, who), "pinned")
    wanted = (header_version or "").strip()
    if wanted.isascii() and wanted.isdigit():
        version = parse_version(wanted)
        return Route(_check_pinned(version, ready_versions, known_versions, who), "pinned")
    if wanted:
        return Route(_by_label(wanted, table, ready_versions, who), "label")
    if table is None:
        if canary_weight_header:
            raise InvalidRoutingHeader(
                f"{who} has no routing table, so {HEADER_CANARY_WEIGHT} is not allowed"
            )
        return Route(_highest_ready(ready_versions, who), "stable")
    weights = table.weights
    if canary_weight_header:
        if not table.allow_weight_override:
            raise InvalidRoutingHeader(
                f"{who} does not allow {HEADER_CANARY_WEIGHT} (allow_weight_override is off)"
            )
        try:
            weights = override_canary(
                weights, table.labels, parse_canary_weight(canary_weight_header)
            )
        except ValueError as exc:
            raise InvalidRoutingHeader(f"{HEADER_CANARY_WEIGHT}: {exc}") from None
    if weights:
        point = route_key_point(routing_key) if routing_key else random_point(rng)
        version = pick_weighted(weights, point)
        if version not in ready_versions:
            version = _fallback(table, ready_versions, who)
    else:
        version = _fallback(table, ready_versions, who)
    return Route(version, "canary" if version == table.canary_version else "stable")


def parse_canary_weight(value: str) -> int:
    """``x-canary-weight`` in basis points: ``"1000"`` (bp, 0..10000) or ``"10%"``/``"12.5%"``."""
    if m := _BP_RE.fullmatch(value):
        bp = int(m.group(1))
    elif m := _PERCENT_RE.fullmatch(value):
        bp = int(m.group(1)) * 100 + int((m.group(2) or "0").ljust(2, "0"))
    else:
        bp = -1
    if not 0 <= bp <= BP_TOTAL:
        raise InvalidRoutingHeader(
            f"{HEADER_CANARY_WEIGHT} must be basis points within [0, 10000] or a percentage "
            f"such as '12.5%', got '{value}'"
        )
    return bp


def _check_pinned(
    version: int, ready: frozenset[int], known: frozenset[int] | None, who: str
) -> int:
    if version in ready:
        return version
    if known is not None and version not in known:
        have = ", ".join(str(v) for v in sorted(known)) or "none"
        raise NotFound(f"{who} has no version {version} (versions: {have})")
    raise VersionNotReady(f"{who} version {version} is not ready")


def _by_label(label: str, table: RoutingTable | None, ready: frozenset[int], who: str) -> int:
    version = None if table is None else table.labels.get(label)
    if version is None:
        have = ", ".join(table.labels) if table is not None and table.labels else "none"
        raise UnknownLabel(f"{who} has no label '{label}' (labels: {have})")
    if version not in ready:
        raise VersionNotReady(f"{who} label '{label}' points at version {version}, not ready")
    return version


def _fallback(table: RoutingTable, ready: frozenset[int], who: str) -> int:
    version = table.labels.get(table.fallback_label)
    if version is not None and version in ready:
        return version
    return _highest_ready(ready, who)


def _highest_ready(ready: frozenset[int], who: str) -> int:
    if not ready:
        raise VersionNotReady(f"{who} has no ready version")
    return max(ready)
