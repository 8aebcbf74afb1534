"""The routing table of one model: an immutable, validated snapshot; the model -> table
container. May import: server.routing.errors. The dict form (config, file, admin RPC) is in
routing/parse.py.

Rules that hold for any table (checked when it is built, so every ``RoutingTable`` in memory is
well-formed): weights are integers >= 0 summing to 10000 (or empty: no split); versions are > 0;
label names are a letter, then letters, digits, ``_``, ``.`` or ``-``; ``default_label`` is a
label; a guard needs labels ``stable`` and ``canary``; a shadow's ``sample_bp`` is within
[0, 10000]. ``validate`` adds the rules that depend on what is loaded: every version named in
weights, labels or shadow must be loaded. Both raise ``RoutingError`` listing every problem
found, so one round trip fixes a table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from server.routing.errors import RoutingError

__all__ = [
    "BP_TOTAL",
    "CANARY",
    "STABLE",
    "GuardConfig",
    "RoutingTable",
    "RoutingTables",
    "ShadowConfig",
    "validate",
]

BP_TOTAL = 10_000  # basis points in a whole: weights sum to this
STABLE = "stable"
CANARY = "canary"
# A letter first, so a label can never be mistaken for a version number in x-model-version.
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")


@dataclass(frozen=True, slots=True)
class GuardConfig:
    """Canary guard rule: roll the canary back when, over the last ``window_s`` seconds and with
    at least ``min_samples`` on each side, its error rate exceeds stable's by more than
    ``max_error_rate_delta`` or its p95 latency exceeds stable's times ``max_p95_ratio``."""

    window_s: int = 60
    min_samples: int = 100
    max_error_rate_delta: float = 0.05
    max_p95_ratio: float = 1.5

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.window_s <= 86_400:
            problems.append(f"guard.window_s must be within [1, 86400] s, got {self.window_s}")
        if self.min_samples < 1:
            problems.append(f"guard.min_samples must be >= 1, got {self.min_samples}")
        if not 0.0 <= self.max_error_rate_delta <= 1.0:
            problems.append(
                "guard.max_error_rate_delta must be a fraction within [0, 1], "
                f"got {self.max_error_rate_delta}"
            )
        # Finite: a table is shown as JSON (GetRouting), where Infinity and NaN are not valid
        # (jq, Go and JavaScript clients refuse them); and an infinite ratio is no rule.
        if not (math.isfinite(self.max_p95_ratio) and self.max_p95_ratio >= 1.0):
            problems.append(
                f"guard.max_p95_ratio must be a finite number >= 1.0, got {self.max_p95_ratio}"
            )
        _raise(problems)


@dataclass(frozen=True, slots=True)
class ShadowConfig:
    """Mirror ``sample_bp`` basis points of requests to ``version``, off the response path."""

    version: int
    sample_bp: int

    def __post_init__(self) -> None:
        problems = []
        if self.version <= 0:
            problems.append(f"shadow.version must be an integer > 0, got {self.version}")
        if not 0 <= self.sample_bp <= BP_TOTAL:
            problems.append(f"shadow.sample_bp must be within [0, 10000], got {self.sample_bp}")
        _raise(problems)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """One model's routing snapshot. Immutable: the mappings are read-only copies, so a table
    can be shared by every request in flight while a new one is swapped in beside it."""

    weights: Mapping[int, int] = field(default_factory=dict)
    labels: Mapping[str, int] = field(default_factory=dict)
    default_label: str | None = None
    allow_weight_override: bool = False
    guard: GuardConfig | None = None
    shadow: ShadowConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", MappingProxyType(dict(sorted(self.weights.items()))))
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(self.labels.items()))))
        _raise(_structure_problems(self))

    @property
    def stable_version(self) -> int | None:
        return self.labels.get(STABLE)

    @property
    def canary_version(self) -> int | None:
        return self.labels.get(CANARY)

    @property
    def fallback_label(self) -> str:
        """The label served when the split lands on a version that is not ready."""
        return self.default_label if self.default_label is not None else STABLE


class RoutingTables(Mapping[str, RoutingTable]):
    """Immutable model name -> RoutingTable; ``with_table``/``without`` return new containers,
    so the server swaps one reference to publish a change atomically."""

    __slots__ = ("_tables",)

    def __init__(self, tables: Mapping[str, RoutingTable] | None = None) -> None:
        self._tables: Mapping[str, RoutingTable] = MappingProxyType(dict(tables or {}))

    def __getitem__(self, model: str) -> RoutingTable:
        return self._tables[model]

    # Read per request, mostly for models without a table: Mapping's mixins would go through
    # __getitem__ and a caught KeyError (~4k instructions a call).
    def get(self, model: str, default: Any = None) -> Any:
        return self._tables.get(model, default)

    def __contains__(self, model: object) -> bool:
        return model in self._tables

    def __iter__(self) -> Iterator[str]:
        return iter(self._tables)

    def __len__(self) -> int:
        return len(self._tables)

    def __repr__(self) -> str:
        return f"RoutingTables({dict(self._tables)!r})"

    def with_table(self, model: str, table: RoutingTable) -> RoutingTables:
        return RoutingTables({**self._tables, model: table})

    def without(self, model: str) -> RoutingTables:
        return RoutingTables({k: v for k, v in self._tables.items() if k != model})


def validate(table: RoutingTable, loaded_versions: frozenset[int]) -> None:
    """Raise RoutingError unless every version the table names is loaded."""
    have = ", ".join(str(v) for v in sorted(loaded_versions)) or "none"
    problems = [
        f"weights name version {v}, which is not loaded (loaded: {have})"
        for v in table.weights
        if v not in loaded_versions
    ]
    problems += [
        f"label '{name}' points at version {v}, which is not loaded (loaded: {have})"
        for name, v in table.labels.items()
        if v not in loaded_versions
    ]
    if table.shadow is not None and table.shadow.version not in loaded_versions:
        problems.append(f"shadow version {table.shadow.version} is not loaded (loaded: {have})")
    _raise(problems)


def _structure_problems(t: RoutingTable) -> list[str]:
    problems: list[str] = []
    for v, w in t.weights.items():
        if v <= 0:
            problems.append(f"weights: version must be an integer > 0, got {v}")
        if w < 0:
            problems.append(f"weights: version {v} has a negative weight ({w})")
    total = sum(t.weights.values())
    if t.weights and total != BP_TOTAL:
        shown = ", ".join(f"{v}: {w}" for v, w in t.weights.items())
        problems.append(f"weights must sum to 10000 basis points, got {total} ({shown})")
    for name, v in t.labels.items():
        if not _LABEL_RE.fullmatch(name):
            problems.append(
                f"label name '{name}' is invalid: use a letter, then letters, digits, "
                "'_', '.' or '-' (63 characters at most)"
            )
        if v <= 0:
            problems.append(f"label '{name}': version must be an integer > 0, got {v}")
    if t.default_label is not None and t.default_label not in t.labels:
        have = ", ".join(t.labels) or "none"
        problems.append(f"default_label '{t.default_label}' is not a label (labels: {have})")
    if t.guard is not None and (STABLE not in t.labels or CANARY not in t.labels):
        problems.append("guard needs labels 'stable' and 'canary' (it compares the two)")
    return problems


def _raise(problems: list[str]) -> None:
    if problems:
        raise RoutingError("invalid routing table: " + "; ".join(problems))
