"""Routing: which version of a model serves a request. Pure functions over immutable snapshots;
time and randomness injected. May import: server.errors, numpy (shadow output diffs).

    table    RoutingTable / RoutingTables snapshots and their validation
    parse    the dict form (model config parameter, routing file, admin RPC)
    split    routing key -> point on [0, 10000) -> version; canary weight arithmetic
    resolve  request version / x-model-version / split -> Route(version, reason)
    guard    sliding-window canary guard -> Decision(rollback, reason)
    shadow   shadow sampling and output comparison
"""

from __future__ import annotations

from server.routing.errors import (
    InvalidRoutingHeader,
    RoutingError,
    UnknownLabel,
    VersionNotReady,
)
from server.routing.guard import (
    Decision,
    GuardState,
    WindowStats,
    evaluate,
    observe,
    window_stats,
)
from server.routing.parse import (
    parse_routing_file,
    parse_routing_file_json,
    parse_table,
    parse_table_json,
    table_to_dict,
)
from server.routing.resolve import (
    HEADER_CANARY_WEIGHT,
    HEADER_MODEL_VERSION,
    HEADER_ROUTING_KEY,
    Route,
    RouteReason,
    parse_canary_weight,
    resolve,
)
from server.routing.shadow import ShadowDiff, compare_outputs, should_shadow
from server.routing.split import (
    RandomSource,
    Span,
    layout,
    override_canary,
    pick_weighted,
    random_point,
    route_key_point,
    with_canary_weight,
)
from server.routing.table import (
    BP_TOTAL,
    CANARY,
    STABLE,
    GuardConfig,
    RoutingTable,
    RoutingTables,
    ShadowConfig,
    validate,
)

__all__ = [
    "BP_TOTAL",
    "CANARY",
    "HEADER_CANARY_WEIGHT",
    "HEADER_MODEL_VERSION",
    "HEADER_ROUTING_KEY",
    "STABLE",
    "Decision",
    "GuardConfig",
    "GuardState",
    "InvalidRoutingHeader",
    "RandomSource",
    "Route",
    "RouteReason",
    "RoutingError",
    "RoutingTable",
    "RoutingTables",
    "ShadowConfig",
    "ShadowDiff",
    "Span",
    "UnknownLabel",
    "VersionNotReady",
    "WindowStats",
    "compare_outputs",
    "evaluate",
    "layout",
    "observe",
    "override_canary",
    "parse_canary_weight",
    "parse_routing_file",
    "parse_routing_file_json",
    "parse_table",
    "parse_table_json",
    "pick_weighted",
    "random_point",
    "resolve",
    "route_key_point",
    "should_shadow",
    "table_to_dict",
    "validate",
    "window_stats",
    "with_canary_weight",
]
