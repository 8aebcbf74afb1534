"""The public surface of server.routing, pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import server.routing as routing

EXPECTED = {
    # table / parse
    "BP_TOTAL", "CANARY", "STABLE", "GuardConfig", "RoutingTable", "RoutingTables",
    "ShadowConfig", "validate", "parse_routing_file", "parse_routing_file_json", "parse_table",
    "parse_table_json", "table_to_dict",
    # split
    "RandomSource", "Span", "layout", "override_canary", "pick_weighted", "random_point",
    "route_key_point", "with_canary_weight",
    # resolve
    "HEADER_CANARY_WEIGHT", "HEADER_MODEL_VERSION", "HEADER_ROUTING_KEY", "Route",
    "RouteReason", "parse_canary_weight", "resolve",
    # guard
    "Decision", "GuardState", "WindowStats", "evaluate", "observe", "window_stats",
    # shadow
    "ShadowDiff", "compare_outputs", "should_shadow",
    # errors
    "InvalidRoutingHeader", "RoutingError", "UnknownLabel", "VersionNotReady",
}  # fmt: skip


def test_public_surface() -> None:
    assert set(routing.__all__) == EXPECTED
    assert len(routing.__all__) == len(EXPECTED)
    for name in routing.__all__:
        assert hasattr(routing, name), name
