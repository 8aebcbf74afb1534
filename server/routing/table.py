"""The routing table of one model: an immutable, validated snapshot, and its plain-dict form.
May import: server.routing.errors.

A table comes from a model config's ``parameters`` (key ``routing``, the JSON text below), from
the routing file (``{"models": {"<model>": <table>, ...}}``) or from the admin RPC; all three
use this dict::

    {
      "weights": {"1": 9000, "2": 1000},   # version -> basis points; sum 10000, or {} / absent
      "labels": {"stable": 1, "canary": 2},# label -> version; a letter first, then [A-Za-z0-9_.-]
      "default_label": null,               # label to fall back on; null = "stable"
      "allow_weight_override": false,      # honour the x-canary-weight request header
      "guard": {                           # optional canary guard (compares canary with stable)
        "window_s": 60, "min_samples": 100,
        "max_error_rate_delta": 0.05,      # canary error rate - stable's, as a fraction
        "max_p95_ratio": 1.5               # canary p95 latency / stable's
      },
      "shadow": {"version": 3, "sample_bp": 500}  # optional: mirror 5% of requests to v3
    }

Version numbers may be JSON numbers or digit strings (JSON object keys are strings). Every key
but ``weights`` is optional. Empty ``weights`` means no split: unpinned requests go to
``default_label``'s version, or to the highest ready version when there is no default label.

Rules that hold for any table (checked when it is built, so every ``RoutingTable`` in memory is
well-formed): weights are integers >= 0 summing to 10000 (or empty); versions are > 0; label
names are valid; ``default_label`` is a label; a guard needs labels ``stable`` and ``canary``;
a shadow's ``sample_bp`` is within [0, 10000]. ``validate`` adds the rules that depend on what
is loaded: every version named in weights, labels or shadow must be loaded. Both raise
``RoutingError`` listing every problem found, so one round trip fixes a table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.routing.errors import RoutingError

__all__ = [
    "BP_TOTAL",
    "CANARY",
    "STABLE",
    "GuardConfig",
    "RoutingTable",
    "RoutingTables",
    "ShadowConfig",
    "parse_routing_file",
    "parse_table",
    "parse_table_json",
    "table_to_dict",
    "validate",
    "with_canary_weight",
]

BP_TOTAL = 10_000  # basis points in a whole: weights sum to this
STABLE = "stable"
CANARY = "canary"
# A letter first, so a label can never be mistaken for a version number in x-model-version.
_LABEL_RE = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,62}")
_TABLE_KEYS = ("weights", "labels", "default_label", "allow_weight_override", "guard", "shadow")
_EMPTY: Mapping[int, int] = MappingProxyType({})
_NO_LABELS: Mapping[str, int] = MappingProxyType({})


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
        if not self.max_p95_ratio >= 1.0:  # also rejects NaN
            problems.append(f"guard.max_p95_ratio must be >= 1.0, got {self.max_p95_ratio}")
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

    weights: Mapping[int, int] = _EMPTY
    labels: Mapping[str, int] = _NO_LABELS
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
        problems.append(
            f"shadow version {table.shadow.version} is not loaded (loaded: {have})"
        )
    _raise(problems)


def with_canary_weight(table: RoutingTable, canary_bp: int) -> RoutingTable:
    """The table with the canary's weight set to ``canary_bp``, stable absorbing the difference
    and other versions untouched (the guard's rollback is ``with_canary_weight(t, 0)``)."""
    stable, canary = table.stable_version, table.canary_version
    if stable is None or canary is None:
        raise RoutingError("setting the canary weight needs labels 'stable' and 'canary'")
    if not 0 <= canary_bp <= BP_TOTAL:
        raise RoutingError(f"canary weight must be within [0, 10000] bp, got {canary_bp}")
    if canary == stable:
        return table
    weights = dict(table.weights) or {stable: BP_TOTAL}
    shift = canary_bp - weights.get(canary, 0)
    weights[canary] = canary_bp
    weights[stable] = weights.get(stable, 0) - shift
    if weights[stable] < 0:
        raise RoutingError(
            f"canary weight {canary_bp} bp leaves stable (version {stable}) a negative weight; "
            "other versions hold the rest"
        )
    return RoutingTable(
        weights,
        table.labels,
        table.default_label,
        table.allow_weight_override,
        table.guard,
        table.shadow,
    )


def parse_table(data: Mapping[str, object]) -> RoutingTable:
    """Build a table from its dict form (see the module docstring); RoutingError if malformed."""
    if not isinstance(data, Mapping):
        raise RoutingError(f"a routing table must be an object, got {type(data).__name__}")
    unknown = sorted(str(k) for k in data if k not in _TABLE_KEYS)
    if unknown:
        raise RoutingError(
            f"unknown key(s) {', '.join(unknown)} in routing table "
            f"(expected: {', '.join(_TABLE_KEYS)})"
        )
    weights = {
        _version(k, "weights"): _int(v, f"weights[{k}]")
        for k, v in _obj(data.get("weights"), "weights").items()
    }
    labels = {
        str(k): _version(v, f"labels[{k}]") for k, v in _obj(data.get("labels"), "labels").items()
    }
    default_label = data.get("default_label")
    if default_label is not None and not isinstance(default_label, str):
        raise RoutingError("default_label must be a string or null")
    allow = data.get("allow_weight_override", False)
    if not isinstance(allow, bool):
        raise RoutingError("allow_weight_override must be true or false")
    guard = shadow = None
    if data.get("guard") is not None:
        g = _obj(data["guard"], "guard", _GUARD_KEYS)
        d = GuardConfig()
        guard = GuardConfig(
            window_s=_int(g.get("window_s", d.window_s), "guard.window_s"),
            min_samples=_int(g.get("min_samples", d.min_samples), "guard.min_samples"),
            max_error_rate_delta=_number(
                g.get("max_error_rate_delta", d.max_error_rate_delta), "guard.max_error_rate_delta"
            ),
            max_p95_ratio=_number(g.get("max_p95_ratio", d.max_p95_ratio), "guard.max_p95_ratio"),
        )
    if data.get("shadow") is not None:
        s = _obj(data["shadow"], "shadow", ("version", "sample_bp"))
        if "version" not in s or "sample_bp" not in s:
            raise RoutingError("shadow needs 'version' and 'sample_bp'")
        shadow = ShadowConfig(
            _version(s["version"], "shadow.version"), _int(s["sample_bp"], "shadow.sample_bp")
        )
    return RoutingTable(weights, labels, default_label, allow, guard, shadow)


def parse_table_json(text: str | bytes) -> RoutingTable:
    """``parse_table`` over JSON text (a config parameter's value, an admin RPC's payload)."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RoutingError(f"routing table is not valid JSON: {exc}") from None
    return parse_table(data)


def parse_routing_file(data: Mapping[str, object]) -> RoutingTables:
    """The routing file's dict form, ``{"models": {"<model>": <table>, ...}}``."""
    if not isinstance(data, Mapping) or set(data) - {"models"}:
        raise RoutingError('a routing file must be an object with one key, "models"')
    tables: dict[str, RoutingTable] = {}
    for model, raw in _obj(data.get("models"), "models").items():
        try:
            tables[str(model)] = parse_table(_obj(raw, f"models[{model}]"))
        except RoutingError as exc:
            raise RoutingError(f"model '{model}': {exc.message}") from None
    return RoutingTables(tables)


def table_to_dict(table: RoutingTable) -> dict[str, object]:
    """The dict form (JSON-ready); ``parse_table(table_to_dict(t)) == t``."""
    g, s = table.guard, table.shadow
    return {
        "weights": {str(v): w for v, w in table.weights.items()},
        "labels": dict(table.labels),
        "default_label": table.default_label,
        "allow_weight_override": table.allow_weight_override,
        "guard": None
        if g is None
        else {
            "window_s": g.window_s,
            "min_samples": g.min_samples,
            "max_error_rate_delta": g.max_error_rate_delta,
            "max_p95_ratio": g.max_p95_ratio,
        },
        "shadow": None if s is None else {"version": s.version, "sample_bp": s.sample_bp},
    }


_GUARD_KEYS = ("window_s", "min_samples", "max_error_rate_delta", "max_p95_ratio")


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


def _obj(value: object, where: str, keys: tuple[str, ...] | None = None) -> Mapping[str, object]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RoutingError(f"{where} must be an object, got {type(value).__name__}")
    if keys is not None and (unknown := sorted(str(k) for k in value if k not in keys)):
        raise RoutingError(f"unknown key(s) {', '.join(unknown)} in {where}")
    return {str(k): v for k, v in value.items()}


def _int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RoutingError(f"{where} must be an integer, got {value!r}")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoutingError(f"{where} must be a number, got {value!r}")
    return float(value)


def _version(value: object, where: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RoutingError(f"{where}: version must be an integer > 0, got {value!r}")
    return value
