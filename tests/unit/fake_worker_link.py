"""What server.lifecycle.ModelManager uses of a WorkerLink, in memory, for its unit tests: the
link and its client folded into one object. Subclasses say what a load does."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from runtime.ipc.protocol import LoadDone, LoadModel, ModelSignature, TensorInfo

# The signature every fake load answers with (the models' configs declare X and Y, FP32 [4]).
SIGNATURE = ModelSignature((TensorInfo("X", "FP32", (4,)),), (TensorInfo("Y", "FP32", (4,)),))


class FakeWorkerLink:
    def __init__(self) -> None:
        self.on_restart: Callable[[], Awaitable[None]] | None = None
        self.on_lost: Callable[[], None] | None = None
        self._ids = 0

    def require(self) -> FakeWorkerLink:
        return self

    def next_request_id(self) -> int:
        self._ids += 1
        return self._ids

    async def load(self, msg: LoadModel) -> LoadDone:
        raise NotImplementedError

    async def unload(self, name: str, version: int) -> None:
        pass
