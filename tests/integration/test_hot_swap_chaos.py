"""Issue 3's hot-swap acceptance: under closed-loop load (8 concurrent tritonclient.aio clients on
`dense` for 60 s), a control task loads, swaps, relabels and unloads dense versions 20 times,
attempts a version whose model file is corrupt once, and makes the canary guard fire once from
an injected failing version. Zero client-visible errors other than the failing canary's, and no
request served by a version that was not ready.

Each control cycle, from versions (stable s, canary c) to (c, n), with n a new directory:
  1. RepositoryModelLoad with a `config` override selecting versions [s, c, n] (version_policy
     specific): n loads, warms up and becomes READY; s and c are reloaded in place (swapped: the
     old instance serves until the new one is ready);
  2. SetRouting: stable = c, canary = n, weights c/n (relabel; n is routable from here on);
  3. RepositoryModelLoad selecting [c, n]: s drains (requests already routed to it finish on it)
     and is unloaded.
"No request served by a version that was not ready" is checked against the control task's
ledger: a version is routable only after its load returned (it was READY) and the table naming
it was sent, and it stops being routable before it is unloaded. So a response from version v
must have arrived after the SetRouting that first named v was sent (a request that started a
moment before may be routed after the swap: the table is read when the request arrives), and
must have started before the unload of v returned. The corrupt version and the failing canary
must never answer successfully.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import tritonclient.grpc.aio as aioclient
from harness import DEMO, Server, running_server
from routing_support import (
    admin_stub,
    apb,
    copy_dense,
    dense_config_json,
    dense_input,
    write_corrupt_version,
    write_failing_version,
)
from tritonclient.utils import InferenceServerException

LOAD_S = 60.0  # closed-loop load
CLIENTS = 8
CYCLES = 20  # load + swap, relabel, unload
CORRUPT_BEFORE_CYCLE = 6
FAILING_AFTER_CYCLE = 12
GUARD = {"window_s": 5, "min_samples": 20, "max_error_rate_delta": 0.05}
CANARY_BP = (1000, 2000, 500)  # the healthy canaries' weights, in turn
FAILING_CANARY_BP = 3000
CLIENT_TIMEOUT_S = 10.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@dataclass
class Ledger:
    """What the control task did, in this process's time.monotonic()."""

    routable_from: dict[int, float] = field(default_factory=dict)  # SetRouting naming v sent
    unloaded_at: dict[int, float] = field(default_factory=dict)  # unload of v returned
    cycles: int = 0
    corrupt: int | None = None
    corrupt_error: str = ""
    failing: int | None = None
    rollback_seen_at: float = math.inf  # GetRouting first showed the rollback
    rollback_status: apb.RoutingStatus | None = None
    rollback_index_reason: str = ""
    done_at: float = math.inf


@dataclass(frozen=True, slots=True)
class Outcome:
    start: float
    end: float
    version: int | None  # None: an error
    error: tuple[str, str] | None = None  # (status, message)


@pytest.fixture(params=["sessions", "cpu-graphs"])
def chaos_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path]]:
    """Twice: plain sessions, and the GPU worker's path on the CPU EP (`--cpu-graphs`: each
    version served from its graph set on its own thread, its calls on its direct channel,
    which every reload in place hands to the new instance)."""
    repo = tmp_path / "models"
    model = copy_dense(repo)  # versions 1 and 2 of the demo dense model
    args = ("--model-control-mode", "explicit", "--load-model", "dense")
    if request.param == "cpu-graphs":
        args += ("--cpu-graphs", "true")
    with running_server(repo, tmp_path / "server", args) as s:
        yield s, model


def table(stable: int, canary: int | None, canary_bp: int, guard: bool = False) -> str:
    if canary is None:
        return json.dumps({"weights": {str(stable): 10_000}, "labels": {"stable": stable}})
    t: dict[str, object] = {
        "weights": {str(stable): 10_000 - canary_bp, str(canary): canary_bp},
        "labels": {"stable": stable, "canary": canary},
    }
    if guard:
        t["guard"] = GUARD
    return json.dumps(t)


async def ready_versions(c: aioclient.InferenceServerClient) -> dict[int, tuple[str, str]]:
    index = await c.get_model_repository_index()
    return {int(m.version): (m.state, m.reason) for m in index.models if m.name == "dense"}


async def control(server: Server, model: Path, ledger: Ledger, deadline: float) -> None:
    c = aioclient.InferenceServerClient(server.url)
    channel = grpc.aio.insecure_channel(server.url)
    admin = admin_stub(channel)

    async def set_table(text: str) -> apb.RoutingStatus:
        return await admin.SetRouting(apb.SetRoutingRequest(model="dense", table_json=text))

    async def load(versions: list[int]) -> None:
        await c.load_model("dense", config=dense_config_json("dense", versions), client_timeout=60)

    async def retire(keep: list[int], gone: list[int]) -> None:
        await load(keep)
        now = time.monotonic()
        for v in gone:
            ledger.unloaded_at[v] = now
        ready = {v for v, (state, _) in (await ready_versions(c)).items() if state == "READY"}
        assert ready == set(keep), (ready, keep)

    serving = [1, 2]  # [stable, canary]; the table was set before the clients started
    next_version = 3
    steps_left = CYCLES + 2

    async def pause() -> None:
        left = max(deadline - time.monotonic(), 0.0)
        await asyncio.sleep(max(left / max(steps_left, 1) / 3, 0.02))

    try:
        for cycle in range(1, CYCLES + 1):
            if cycle == CORRUPT_BEFORE_CYCLE:
                # A version whose model.onnx is garbage: the load fails with the reason, the
                # versions already serving are untouched (and keep serving).
                bad = ledger.corrupt = next_version
                next_version += 1
                write_corrupt_version(model, bad)
                with pytest.raises(InferenceServerException) as ei:
                    await load([*serving, bad])
                ledger.corrupt_error = ei.value.message() or ""
                state = (await ready_versions(c))[bad]
                assert state[0] == "UNAVAILABLE" and "onnxruntime cannot load" in state[1], state
                steps_left -= 1
                await pause()

            # 1. load the new version (and swap the serving ones in place)
            new = next_version
            next_version += 1
            (model / str(new)).mkdir()
            shutil.copyfile(
                DEMO / "dense" / str(1 + new % 2) / "model.onnx", model / str(new) / "model.onnx"
            )
            await load([*serving, new])
            await pause()
            # 2. relabel: the last version becomes stable, the new one the canary
            stable = serving[-1]
            ledger.routable_from[new] = time.monotonic()
            await set_table(table(stable, new, CANARY_BP[cycle % len(CANARY_BP)]))
            await pause()
            # 3. unload what is no longer in the table (drained first)
            await retire([stable, new], [v for v in serving if v != stable])
            serving = [stable, new]
            ledger.cycles = cycle
            steps_left -= 1
            await pause()

            if cycle == FAILING_AFTER_CYCLE:
                # A canary that fails at run time: the guard rolls it back to weight 0.
                f = ledger.failing = next_version
                next_version += 1
                write_failing_version(model, f)
                await load([*serving, f])  # loads: warm-up runs zeros, which it survives
                stable = serving[-1]
                ledger.routable_from[f] = time.monotonic()
                await set_table(table(stable, f, FAILING_CANARY_BP, guard=True))
                give_up = time.monotonic() + 20
                while True:
                    status = await admin.GetRouting(apb.GetRoutingRequest(model="dense"))
                    if status.guard_rollbacks:
                        ledger.rollback_seen_at = time.monotonic()
                        ledger.rollback_status = status
                        break
                    assert time.monotonic() < give_up, "the canary guard did not fire"
                    await asyncio.sleep(0.05)
                ledger.rollback_index_reason = (await ready_versions(c))[f][1]
                await set_table(table(stable, None, 0))
                await retire([stable], [v for v in [*serving, f] if v != stable])
                serving = [stable]
                steps_left -= 1
                await pause()
        ledger.done_at = time.monotonic()
    finally:
        await c.close()
        await channel.close()


async def client(url: str, cid: int, stop: asyncio.Event, out: list[Outcome]) -> None:
    c = aioclient.InferenceServerClient(url)
    inp = aioclient.InferInput("INPUT0", [1, 256], "FP32")
    inp.set_data_from_numpy(dense_input(100 + cid))
    i = 0
    try:
        while not stop.is_set():
            i += 1
            headers = {"x-routing-key": f"client{cid}-{i}"}
            t0 = time.monotonic()
            try:
                r = await c.infer("dense", [inp], headers=headers, client_timeout=CLIENT_TIMEOUT_S)
            except InferenceServerException as exc:
                err = (exc.status() or "", exc.message() or "")
                out.append(Outcome(t0, time.monotonic(), None, err))
                continue
            out.append(Outcome(t0, time.monotonic(), int(r.get_response().model_version)))
    finally:
        await c.close()


async def run_chaos(server: Server, model: Path) -> tuple[Ledger, list[list[Outcome]], float]:
    async with grpc.aio.insecure_channel(server.url) as ch:
        await admin_stub(ch).SetRouting(
            apb.SetRoutingRequest(model="dense", table_json=table(1, 2, CANARY_BP[0]))
        )
    ledger = Ledger(routable_from={1: -math.inf, 2: -math.inf})
    start = time.monotonic()
    stop = asyncio.Event()
    outcomes: list[list[Outcome]] = [[] for _ in range(CLIENTS)]
    clients = [
        asyncio.create_task(client(server.url, i, stop, outcomes[i])) for i in range(CLIENTS)
    ]
    try:
        await control(server, model, ledger, deadline=start + LOAD_S - 5)
        await asyncio.sleep(max(start + LOAD_S - time.monotonic(), 0.0))
    finally:
        stop.set()
        await asyncio.gather(*clients)
    return ledger, outcomes, time.monotonic() - start


def test_hot_swap_under_load(chaos_server: tuple[Server, Path]) -> None:
    server, model = chaos_server
    ledger, per_client, elapsed = asyncio.run(
        asyncio.wait_for(run_chaos(server, model), LOAD_S + 60)
    )
    outcomes = [o for cl in per_client for o in cl]

    # The control task did everything, under load.
    assert ledger.cycles == CYCLES
    assert ledger.done_at <= min(o.end for o in (cl[-1] for cl in per_client))
    assert elapsed < LOAD_S + 20, elapsed
    assert all(len(cl) > 100 for cl in per_client), [len(cl) for cl in per_client]

    # The corrupt version: the load failed with the reason.
    assert ledger.corrupt is not None
    assert ledger.corrupt_error.startswith(
        f"failed to load 'dense': version {ledger.corrupt}: onnxruntime cannot load "
    ), ledger.corrupt_error

    # The guard fired once, set the canary's weight to 0 and said so in the index.
    f, status = ledger.failing, ledger.rollback_status
    assert f is not None and status is not None
    assert status.guard_rollbacks == 1
    weights = json.loads(status.table_json)["weights"]
    assert weights[str(f)] == 0 and sum(weights.values()) == 10_000, weights
    assert status.last_rollback_reason.startswith(f"canary version {f} error rate 100.00% ")
    assert ledger.rollback_index_reason == (
        f"canary rolled back by the guard: {status.last_rollback_reason}"
    )

    # Client-visible errors: only requests routed to the failing canary, before the rollback.
    errors = [o for o in outcomes if o.error is not None]
    unexpected = [
        o
        for o in errors
        if o.error is None
        or o.error[0] != "StatusCode.INTERNAL"
        or not o.error[1].startswith(f"model 'dense' version {f} failed: ")
        or o.start >= ledger.rollback_seen_at
    ]
    assert not unexpected, f"{len(unexpected)} unexpected errors, e.g. {unexpected[:5]}"
    assert len(errors) >= GUARD["min_samples"], len(errors)

    # Every response came from a version that was ready and routable at the time.
    wrong = []
    for o in outcomes:
        if o.version is None:
            continue
        v = o.version
        routable = ledger.routable_from.get(v)
        if (
            routable is None
            or o.end < routable
            or o.start > ledger.unloaded_at.get(v, math.inf)
            or v in (f, ledger.corrupt)
        ):
            wrong.append((o, routable, ledger.unloaded_at.get(v)))
    assert not wrong, f"{len(wrong)} responses from versions not ready, e.g. {wrong[:5]}"
    served = {o.version for o in outcomes if o.version is not None}
    assert len(served) >= CYCLES, sorted(v for v in served if v is not None)

    # The guard fired exactly once in all, and nothing failed inside the server.
    log = server.log()
    assert log.count("canary guard rolled back") == 1
    assert "Traceback" not in log and "internal error" not in log
    ok = len(outcomes) - len(errors)
    print(
        f"{ok} ok and {len(errors)} expected errors in {elapsed:.1f}s "
        f"({ok / elapsed:.0f}/s); {len(served)} versions served"
    )
