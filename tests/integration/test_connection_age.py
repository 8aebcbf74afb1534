"""--max-connection-age-s: the server ends a client's connection once it is that old (a GOAWAY,
after which calls in flight still finish), the client reconnects by itself, and no call is lost
across the change. This is what lets long-lived clients move to front processes and replicas
added since they connected."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
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


def test_a_stream_outlives_the_connection_age(model_repository: Path, tmp_path: Path) -> None:
    """No grace limit (the default): a ModelStreamInfer stream open when its connection reaches
    the age goes on until the client ends it; nothing sent on it is lost."""
    sent = 0
    answers: queue.Queue[bool] = queue.Queue()

    def requests() -> Iterator[object]:
        nonlocal sent
        end = time.monotonic() + 3.5
        while time.monotonic() < end:
            yield dense_request()
            sent += 1
            answers.get(timeout=10)  # one in flight at a time: the stream stays busy

    args = ("--max-connection-age-s", "1")
    with running_server(model_repository, tmp_path, args) as s, grpc.insecure_channel(s.url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        got = 0
        for r in stub.ModelStreamInfer(requests(), timeout=30):
            assert r.error_message == "" and r.infer_response.model_name == "dense"
            got += 1
            answers.put(True)
    assert got == sent > 50
