"""The sticky weighted split: a routing key hashed to a point on [0, 10000), the versions laid on
that line by weight, and the weight arithmetic for the canary. Pure. May import: routing.table,
routing.errors.

Layout: versions in ascending order, each taking ``[S(k-1), S(k))`` where ``S(k)`` is the sum of
the weights of the versions up to and including ``k``; a zero weight takes an empty range. The
layout depends on the weights alone (labels may move without reshuffling keys), so a key lands
on the same version for as long as the weights stand.

Monotonicity: when weight moves from one version ``j`` to another ``k`` (a canary raised from
10% to 20% at stable's expense, or the guard's rollback), ``k``'s range only grows and ``j``'s
only shrinks: if ``j < k``, ``S(k-1)`` falls and ``S(k)`` stands; if ``j > k``, ``S(k-1)`` stands
and ``S(k)`` rises. So keys move only out of ``j`` and into ``k``; the ranges of versions
strictly between them slide by the amount moved (same size, some keys swapped), and every other
version keeps exactly its keys. tests/unit/routing checks this on every point of the line.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.routing.errors import RoutingError
from server.routing.table import BP_TOTAL, CANARY, STABLE, RoutingTable

__all__ = [
    "RandomSource",
    "Span",
    "layout",
    "override_canary",
    "pick_weighted",
    "random_point",
    "route_key_point",
    "with_canary_weight",
]

RandomSource = Callable[[], float] | random.Random  # uniform on [0, 1): rng.random or a Random


@dataclass(frozen=True, slots=True)
class Span:
    """``version`` serves the points ``lo <= p < hi``."""

    version: int
    lo: int
    hi: int


def route_key_point(key: str, *, salt: str = "") -> int:
    """A stable point in [0, 10000) for ``key``: BLAKE2b (64-bit digest), never Python's salted
    ``hash()``, so every process and restart agrees. ``salt`` (<= 16 bytes, BLAKE2b's
    personalisation) gives an independent point for another decision, e.g. shadow sampling."""
    digest = hashlib.blake2b(
        key.encode("utf-8", "surrogatepass"), digest_size=8, person=salt.encode("utf-8")
    ).digest()
    # Multiply-shift maps the 64-bit value onto [0, 10000) with negligible bias.
    return (int.from_bytes(digest, "big") * BP_TOTAL) >> 64


def random_point(rng: RandomSource) -> int:
    """A uniform point in [0, 10000) drawn from ``rng`` (requests without a routing key)."""
    u = rng.random() if isinstance(rng, random.Random) else rng()
    return min(max(int(u * BP_TOTAL), 0), BP_TOTAL - 1)


def layout(weights: Mapping[int, int]) -> tuple[Span, ...]:
    """The ranges of the line, versions ascending (for display, e.g. by the admin RPC)."""
    spans, lo = [], 0
    for version in sorted(weights):
        spans.append(Span(version, lo, lo + weights[version]))
        lo += weights[version]
    return tuple(spans)


def pick_weighted(weights: Mapping[int, int], point: int) -> int:
    """The version whose range holds ``point``. ``weights`` must be a validated split (integers
    >= 0 summing to 10000) and ``0 <= point < 10000``; anything else is a ValueError."""
    if not 0 <= point < BP_TOTAL:
        raise ValueError(f"point {point} is outside [0, {BP_TOTAL})")
    if sum(weights.values()) != BP_TOTAL:
        raise ValueError(f"weights {dict(weights)} do not sum to {BP_TOTAL}")
    upper = 0
    for version in sorted(weights):
        upper += weights[version]
        if point < upper:
            return version
    raise AssertionError("unreachable: the ranges cover [0, 10000)")  # pragma: no cover


def override_canary(
    weights: Mapping[int, int], labels: Mapping[str, int], canary_bp: int
) -> Mapping[int, int]:
    """The split with the ``canary`` label's version at ``canary_bp`` and the ``stable`` label's
    version absorbing the difference; other versions keep their weights (with two versions this
    is simply canary N, stable 10000 - N). Empty ``weights`` count as all on stable. A single
    transfer between two versions, so monotone (see the module docstring). ValueError when a
    label is missing or ``canary_bp`` is more than stable and canary hold together."""
    stable, canary = labels.get(STABLE), labels.get(CANARY)
    if stable is None or canary is None:
        raise ValueError("a canary weight needs labels 'stable' and 'canary'")
    if not 0 <= canary_bp <= BP_TOTAL:
        raise ValueError(f"a canary weight must be within [0, 10000] bp, got {canary_bp}")
    out = dict(weights) or {stable: BP_TOTAL}
    if canary != stable:
        room = out.get(stable, 0) + out.get(canary, 0)
        if canary_bp > room:
            raise ValueError(
                f"a canary weight of {canary_bp} bp is more than the {room} bp that stable "
                f"(version {stable}) and canary (version {canary}) hold together"
            )
        out[canary] = canary_bp
        out[stable] = room - canary_bp
    return MappingProxyType(dict(sorted(out.items())))


def with_canary_weight(table: RoutingTable, canary_bp: int) -> RoutingTable:
    """``table`` with its split replaced by ``override_canary(...)``: the admin RPC's "set
    canary weight" and the guard's rollback (``with_canary_weight(table, 0)``). RoutingError
    when the table cannot express it."""
    try:
        weights = override_canary(table.weights, table.labels, canary_bp)
    except ValueError as exc:
        raise RoutingError(str(exc)) from None
    return RoutingTable(
        weights,
        table.labels,
        table.default_label,
        table.allow_weight_override,
        table.guard,
        table.shadow,
    )
