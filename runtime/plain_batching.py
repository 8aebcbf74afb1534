"""A plain version's dynamic batching in the worker: its Batcher and batch threads (one per
instance, each running one batch at a time), the first of which reads the version's direct
channels (runtime.channels) between batches when there is one thread; and, for a version
reloaded without batching, the reading of the channels the fronts still send on until they
close them. Graph-served versions batch in runtime.engine.graph_model instead.

Allowed imports: runtime.channels, runtime.engine.{batcher,model}, runtime.ipc.protocol,
runtime.worker_connection.
"""

from __future__ import annotations

import functools
import logging
import threading
import time

from runtime.channels import Channel, Channels, Waker
from runtime.engine.batcher import Batcher, Pending
from runtime.engine.model import LoadedModel, execute_batch
from runtime.ipc.protocol import Code, Infer, InferDone, LoadModel
from runtime.worker_connection import Queued, queue_batched

__all__ = ["DRAIN_CHANNELS_S", "drain_channels", "run_alone", "start_batcher"]

log = logging.getLogger("microtune.worker")

# How long the channels of a version reloaded without batching are still read, at most: the
# fronts close them once they have their LoadDone (or, for another front of the pod, their
# own load of the same revision) and their calls there are answered.
DRAIN_CHANNELS_S = 60.0


def start_batcher(
    model: LoadedModel, msg: LoadModel, channels: Channels | None
) -> tuple[Batcher[Queued] | None, Waker | None]:
    """The version's batcher and its threads (none without dynamic batching); with
    `channels`, the first thread waits in a Waker and reads them (returned too)."""
    if msg.batching is None or msg.max_batch_size < 1:
        return None, None
    b = msg.batching
    batcher: Batcher[Queued] = Batcher(
        msg.max_batch_size,
        preferred=[p for p in b.preferred if 1 <= p <= msg.max_batch_size],
        max_queue_delay_ns=b.max_queue_delay_us * 1000,
        max_queue_size=b.max_queue_size,
        name=f"model '{msg.name}' version {msg.version}",
    )

    def run_batch(batch: list[Pending[Queued]]) -> None:
        try:
            calls = []
            for p in batch:
                conn, call, received = p.payload
                calls.append((call, conn.arena_buf(), received))
            dones = execute_batch(model, calls)
        except Exception as exc:
            # Every call must be answered, or its caller (and its arena lease) waits forever.
            log.exception("batch of %s version %d failed", msg.name, msg.version)
            dones = [
                InferDone(p.payload[1].call_id, Code.INTERNAL, type(exc).__name__) for p in batch
            ]
        for p, done in zip(batch, dones, strict=True):
            p.payload[0].send_quiet(done)

    def expire(p: Pending[Queued]) -> None:
        conn, call, _ = p.payload
        conn.send_quiet(InferDone(call.call_id, Code.DEADLINE, "deadline expired while queued"))

    def queue(call: Infer, chan: Channel, received_ns: int) -> None:
        """A call read from a channel: as `Connection._dispatch` queues one of the link."""
        alone = functools.partial(run_alone, call, chan, received_ns)
        if call.bound:  # bound in place (runtime.engine.bound): runs alone
            alone()
            return
        queue_batched(batcher, call, chan, received_ns, alone)

    waker = None if channels is None else Waker(channels, queue)

    def serve(idle: Waker | None) -> None:
        try:
            batcher.run(run_batch, expire, idle)
        finally:
            if idle is not None:
                idle.close()

    for i in range(max(1, b.instances)):  # each runs one batch at a time (instance_group)
        threading.Thread(
            target=serve,
            args=(waker if i == 0 else None,),
            daemon=True,
            name=f"batch-{msg.name}-{msg.version}-{i}",
        ).start()
    return batcher, waker


def run_alone(call: Infer, chan: Channel, received_ns: int) -> None:
    """A call read from a channel that runs by itself: its version no longer batches, it is
    bound in place, or the batcher it met is being replaced."""
    assert chan.front is not None  # calls are read only once the channel is attached
    chan.front.run_alone(call, received_ns, chan.answer)


def drain_channels(waker: Waker) -> None:
    """Read what the fronts still send on `waker`'s channels (their version was reloaded
    without batching) and run it alone, until each front has closed its end once its calls
    there were answered (or DRAIN_CHANNELS_S passed: a front that never heard of the
    reload); then close them."""
    channels = waker.channels
    assert channels is not None
    deadline = time.monotonic() + DRAIN_CHANNELS_S
    try:
        while channels.attached() and time.monotonic() < deadline:
            waker.wait(0.2)
    finally:
        channels.close()
        waker.close()
