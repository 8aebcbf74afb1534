"""--max-connection-age-s: the server ends a client's connection once it is that old (a GOAWAY,
after which calls in flight still finish), the client reconnects by itself, and no call is lost
across the change. This is what lets long-lived clients move to front processes and replicas
added since they connected."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
from harness import running_server
from routing_support import dense_request
from tritonclient.grpc import service_pb2_grpc


def test_old_connections_are_replaced_without_losing_a_call(
    model_repository: Path, tmp_path: Path
) -> None:
    args = ("--max-connection-age-s", "1", "--max-connection-age-grace-s", "5")
    with running_server(model_repository, tmp_path, args) as s, grpc.insecure_channel(s.url) as ch:
        lock = threading.Lock()
        states: list[grpc.ChannelConnectivity] = []

        def seen(state: grpc.ChannelConnectivity) -> None:
            with lock:
                states.append(state)

        ch.subscribe(seen, try_to_connect=True)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        calls = 0
        end = time.monotonic() + 4.5
        while time.monotonic() < end:
            # No retry, no wait_for_ready: a call lost to a closing connection fails here.
            assert stub.ModelInfer(dense_request(), timeout=10).model_name == "dense"
            calls += 1
        ch.unsubscribe(seen)
    with lock:
        connected = states.count(grpc.ChannelConnectivity.READY)
    # One connection per second (+-10 % jitter) over 4.5 s: the first and at least 3 more.
    assert connected >= 4, states
    assert calls > 100
