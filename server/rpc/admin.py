"""`microtune.admin.v1.RoutingAdmin`: read and change a model's routing table over gRPC.
Thin like the inference servicer: decode, one router call, encode; @rpc_errors on each RPC."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import grpc

from server._proto.microtune import admin_pb2 as apb
from server._proto.microtune import admin_pb2_grpc as apb_grpc
from server.errors import InvalidInput
from server.router import Router, RoutingView
from server.rpc.status import rpc_errors

__all__ = ["RoutingAdminServicer"]

Ctx = grpc.aio.ServicerContext


def _status(v: RoutingView) -> apb.RoutingStatus:
    t = v.shadow
    mean = t.latency_s / t.requests if t.requests else 0.0
    return apb.RoutingStatus(
        model=v.model,
        source=v.source,
        table_json="" if v.table is None else json.dumps(v.table, sort_keys=True),
        ready_versions=list(v.ready_versions),
        guard_rollbacks=v.rollbacks,
        last_rollback_reason=v.last_rollback,
        shadow=apb.ShadowStats(
            requests=t.requests,
            errors=t.errors,
            mismatches=t.mismatches,
            max_abs_diff=t.max_abs_diff,
            mean_latency_s=mean,
        ),
        file_error=v.file_error,
    )


def _model(name: str) -> str:
    if not name:
        raise InvalidInput("model is required")
    return name


class RoutingAdminServicer(apb_grpc.RoutingAdminServicer):
    def __init__(
        self, router: Router, settle: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.router = router
        # Several fronts: until every front routes the model by the new table
        # (server.admin_sync.AdminSync.settled), so the client's next call sees it on any.
        self.settle = settle

    @rpc_errors
    async def GetRouting(self, request: apb.GetRoutingRequest, context: Ctx) -> apb.RoutingStatus:
        return _status(self.router.view(_model(request.model)))

    @rpc_errors
    async def SetRouting(self, request: apb.SetRoutingRequest, context: Ctx) -> apb.RoutingStatus:
        self.router.set_admin(_model(request.model), request.table_json)
        if self.settle is not None:
            await self.settle(request.model)
        return _status(self.router.view(request.model))

    @rpc_errors
    async def ClearRouting(
        self, request: apb.ClearRoutingRequest, context: Ctx
    ) -> apb.RoutingStatus:
        self.router.clear_admin(_model(request.model))
        if self.settle is not None:
            await self.settle(request.model)
        return _status(self.router.view(request.model))
