"""The routing table's dict form: parse (with clear errors) and dump. May import:
routing.table, routing.errors.

A table comes from a model config's ``parameters`` (key ``routing``, the JSON text below), from
the routing file (``{"models": {"<model>": <table>, ...}}``) or from the admin RPC; all three
use this dict::

    {
      "weights": {"1": 9000, "2": 1000},   # version -> basis points; sum 10000, or {} / absent
      "labels": {"stable": 1, "canary": 2},# label -> version
      "default_label": null,               # label to fall back on; null = "stable"
      "allow_weight_override": false,      # honour the x-canary-weight request header
      "guard": {                           # optional canary guard (compares canary with stable)
        "window_s": 60, "min_samples": 100,
        "max_error_rate_delta": 0.05,      # canary error rate - stable's, as a fraction
        "max_p95_ratio": 1.5               # canary p95 latency / stable's
      },
      "shadow": {"version": 3, "sample_bp": 500}  # optional: mirror 5% of requests to v3
    }

Version numbers may be JSON numbers or digit strings (JSON object keys are strings) within
int64, as Triton's versions are; a digit string is written without leading zeros (``"01"`` and
``"1"`` would be one version under two keys, one silently dropped); weights and counts must be
integers. Every key is optional (guard keys default as above); an unknown key is an error, so a
typo never passes silently. Empty ``weights`` means no split: unpinned requests go to
``default_label``'s version, or to the highest ready version without one.

JSON text comes from clients and files, so anything in it is an error of the table
(``RoutingError``, INVALID_ARGUMENT), never an exception of the server: nesting deeper than
Python's recursion limit, integers beyond 64 bits (Python refuses more than 4300 digits with a
ValueError; a version key is converted here), a key given twice in one object (JSON would keep
the last silently). Values are shown clipped in messages (``reprlib``).
"""

from __future__ import annotations

import json
import reprlib
from collections.abc import Mapping

from server.routing.errors import RoutingError
from server.routing.table import GuardConfig, RoutingTable, RoutingTables, ShadowConfig

__all__ = [
    "parse_routing_file",
    "parse_routing_file_json",
    "parse_table",
    "parse_table_json",
    "table_to_dict",
]

_INT64_MAX = 2**63 - 1
_TABLE_KEYS = ("weights", "labels", "default_label", "allow_weight_override", "guard", "shadow")
_GUARD_KEYS = ("window_s", "min_samples", "max_error_rate_delta", "max_p95_ratio")


def parse_table(data: object) -> RoutingTable:
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
    return parse_table(_loads(text, "routing table"))


def parse_routing_file_json(text: str | bytes) -> RoutingTables:
    """``parse_routing_file`` over the file's bytes."""
    return parse_routing_file(_loads(text, "routing file"))


def parse_routing_file(data: object) -> RoutingTables:
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
        raise RoutingError(f"{where} must be an integer, got {_shown(value)}")
    return value


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RoutingError(f"{where} must be a number, got {_shown(value)}")
    return float(value)


def _version(value: object, where: str) -> int:
    given = value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        digits = value.lstrip("0")
        if digits and digits != value:
            raise RoutingError(
                f"{where}: version {_shown(value)} has a leading zero: write {_shown(digits)} "
                "(one version, one key)"
            )
        # (not int() of thousands of digits: Python refuses more than 4300 with a ValueError)
        value = int(value) if len(value) <= len(str(_INT64_MAX)) else _INT64_MAX + 1
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise RoutingError(f"{where}: version must be an integer > 0, got {_shown(value)}")
    if value > _INT64_MAX:
        raise RoutingError(f"{where}: version {_shown(given)} is out of range (int64)")
    return value


def _loads(text: str | bytes, what: str) -> object:
    try:
        return json.loads(text, parse_int=_json_int, object_pairs_hook=_json_object)
    except RecursionError:
        raise RoutingError(f"{what} is refused: its JSON is nested too deeply") from None
    except ValueError as exc:
        raise RoutingError(f"{what} is not valid JSON: {exc}") from None


def _json_int(digits: str) -> int:
    # Python's int() refuses more than 4300 digits with a ValueError whose message tells the
    # client about sys.set_int_max_str_digits; nothing in a table needs more than 64 bits.
    n = int(digits) if len(digits.lstrip("-")) <= len(str(_INT64_MAX)) else None
    if n is None or not -_INT64_MAX - 1 <= n <= _INT64_MAX:
        raise RoutingError(f"number {_shown(digits)} is out of range (int64)")
    return n


def _json_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj: dict[str, object] = {}
    for key, value in pairs:
        if key in obj:
            raise RoutingError(f"key {_shown(key)} is given twice in one JSON object")
        obj[key] = value
    return obj


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 40


def _shown(value: object) -> str:
    """A value for a message: clipped, so that a huge or deeply nested one stays readable."""
    return _repr.repr(value)
