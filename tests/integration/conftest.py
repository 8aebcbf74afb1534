"""Integration fixtures: one model repository and one shared server per session.

The server runs as a subprocess (`python -m server serve`), never in-process: tritonclient and
microtune's generated stubs (server._proto) register the same protobuf names in the default
descriptor pool, so one process can import only one of them. These tests use tritonclient (sync
and aio) and, as the raw stub, tritonclient's generated `service_pb2_grpc` stub with its
`service_pb2` messages; nothing here imports server._proto.

For the same reason this directory cannot share a pytest process with tests that import
server._proto (tests/unit does). When a session collects tests outside this directory too
(`pytest`, `make test`), the modules here are not collected; test_in_subprocess.py runs them in
a child `pytest tests/integration` instead, and fails with its output if they fail. Run alone
(`pytest tests/integration ...`), they are collected as usual.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from harness import Server, build_repository, running_server

if TYPE_CHECKING:
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2_grpc

HERE = Path(__file__).resolve().parent
DELEGATE = "test_in_subprocess.py"


def shares_session(config: pytest.Config) -> bool:
    """True when this session also collects tests outside tests/integration."""
    base = config.invocation_params.dir
    for arg in config.args:
        path = (base / arg.split("::", 1)[0]).resolve()
        if not (path == HERE or HERE in path.parents):
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config) -> bool | None:
    if collection_path.parent != HERE or not collection_path.name.startswith("test_"):
        return None
    if shares_session(config):
        return collection_path.name != DELEGATE
    return collection_path.name == DELEGATE


@pytest.fixture(scope="session")
def model_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_repository(tmp_path_factory.mktemp("repo") / "models")


@pytest.fixture(scope="session")
def server(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server shared by every test that neither kills nor restarts it."""
    with running_server(model_repository, tmp_path_factory.mktemp("server")) as s:
        yield s


@pytest.fixture(scope="session")
def client(server: Server) -> Iterator[grpcclient.InferenceServerClient]:
    import tritonclient.grpc as grpcclient

    c = grpcclient.InferenceServerClient(server.url)
    yield c
    c.close()


@pytest.fixture(scope="session")
def channel(server: Server) -> Iterator[grpc.Channel]:
    ch = grpc.insecure_channel(server.url)
    yield ch
    ch.close()


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> service_pb2_grpc.GRPCInferenceServiceStub:
    """The raw stub: the reference proto's generated client, as tritonclient ships it."""
    from tritonclient.grpc import service_pb2_grpc

    return service_pb2_grpc.GRPCInferenceServiceStub(channel)
