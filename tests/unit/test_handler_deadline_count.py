"""A request whose deadline passes is counted as DEADLINE_EXCEEDED whichever timer fires first,
and any other cancellation as CANCELLED.

grpc cancels the handler when the call's deadline passes, racing the handler's own deadline
(which answers DEADLINE_EXCEEDED): when grpc's won, the request was counted nowhere in
`microtune_requests_total` (a cancellation was no request answered), though its client got
DEADLINE_EXCEEDED and ModelStatistics counted the failure. Other cancellations were not counted
either, among them deadlines that fired at the client well before the server's copy (which
starts when the call's headers are read) and reached the server as cancellations: under load,
ModelStatistics' `fail` exceeded the failures in `microtune_requests_total`. Every cancellation
is now a failure in both, CANCELLED when it comes before the deadline (as Triton's failure
counter counts cancellations)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from server.handler import InferenceHandler
from server.rpc.status import status_of
from server.types import InferRequest


class Recorder:
    """The handler's metrics interface, recording the statuses of answered requests."""

    def __init__(self) -> None:
        self.statuses: list[grpc.StatusCode] = []

    def observe_request(self, model: str, version: Any, reason: str, status: Any, s: float) -> None:
        self.statuses.append(status)


def handler() -> tuple[InferenceHandler, Recorder]:
    h = InferenceHandler.__new__(InferenceHandler)  # infer()'s accounting, over a cancelled call
    h.metrics = Recorder()  # type: ignore[assignment]
    h.status_of = status_of

    async def cancelled(*_args: object) -> object:
        raise asyncio.CancelledError

    h._infer = cancelled  # type: ignore[method-assign]
    return h, h.metrics  # type: ignore[return-value]


REQ = InferRequest("m", "", "", (), (), {})


@pytest.mark.parametrize(
    ("deadline_in_s", "counted"),
    [
        (-0.001, [grpc.StatusCode.DEADLINE_EXCEEDED]),
        (60.0, [grpc.StatusCode.CANCELLED]),
        (None, [grpc.StatusCode.CANCELLED]),
    ],
    ids=["deadline-passed", "client-cancelled", "no-deadline"],
)
def test_a_cancellation_counts_as_deadline_exceeded_at_the_deadline_else_cancelled(
    deadline_in_s: float | None, counted: list[grpc.StatusCode]
) -> None:
    h, recorder = handler()
    deadline = None if deadline_in_s is None else time.monotonic() + deadline_in_s
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(h.infer(REQ, deadline))
    assert recorder.statuses == counted
