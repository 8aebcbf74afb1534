"""Routing's errors, each a subclass of the domain tree in server/errors.py, so the one status
table in server/rpc/status.py maps them with no new entries. May import: server.errors.
"""

from __future__ import annotations

from server.errors import InvalidInput, NotFound, NotReady

__all__ = ["InvalidRoutingHeader", "RoutingError", "UnknownLabel", "VersionNotReady"]


class RoutingError(InvalidInput):
    """A routing table (config, routing file or admin RPC) is malformed or names versions that
    are not loaded. The table being replaced keeps serving; the message says what to fix."""


class UnknownLabel(NotFound):
    """``x-model-version`` named a label the model's routing table does not have."""


class VersionNotReady(NotReady):
    """The version a request pinned (or its label points at) is not ready; retry later."""


class InvalidRoutingHeader(InvalidInput):
    """A routing header is malformed or not allowed for the model (``x-canary-weight``)."""
