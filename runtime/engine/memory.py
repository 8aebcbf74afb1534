"""Device memory attributed to a model version's load: what the device uses after the load minus
what it used before (`DeviceMemoryMeter`).

The readings come from a probe, a function returning the bytes of device memory in use now
(`runtime.ipc.pinning.device_memory_used` on a GPU: cudaMemGetInfo; onnxruntime's CUDA EP
allocates through its own arena, which no allocator we could ask would see). Both readings are
device-wide, so whatever else allocates or frees device memory between them lands in the
difference. Hence the rules:

- loads are measured one at a time (a lock): two overlapping loads would each count both;
- a release of device memory during the window (an unload, a replaced version closing, marked
  with `releasing()`) makes the figure unknowable: None, as when there is no probe (a CPU
  worker: nothing to attribute), when a reading fails, or when the device uses less after the
  load than before;
- what the meter cannot see, it counts: device memory that other processes, or requests of
  other versions, allocate during the window.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["DeviceMemoryMeter", "Measurement", "Probe", "attribute"]

log = logging.getLogger(__name__)

Probe = Callable[[], int]
"""Bytes of device memory in use now (device-wide); may raise when the device cannot say."""


@dataclass(slots=True)
class Measurement:
    """What `DeviceMemoryMeter.measure` attributes to its block, set when the block ends
    (None: not measured, or unknowable)."""

    nbytes: int | None = None


def attribute(before: int | None, after: int | None, undisturbed: bool) -> int | None:
    """The bytes a load took: `after - before`, or None when either reading is missing, a
    release overlapped the window (not `undisturbed`), or the device uses less than before
    (something else freed memory meanwhile)."""
    if before is None or after is None or not undisturbed or after < before:
        return None
    return after - before


class DeviceMemoryMeter:
    """Measures loads (`measure`) against the releases that may overlap them (`releasing`)."""

    def __init__(self, probe: Probe | None) -> None:
        self._probe = probe
        self._one_load = threading.Lock()  # held for a whole measured load
        self._state = threading.Lock()  # guards the two counters, never held for long
        self._releasing = 0  # releases under way
        self._release_events = 0  # releases begun plus releases ended
        self._probe_failed = False

    @property
    def enabled(self) -> bool:
        return self._probe is not None

    @contextmanager
    def measure(self) -> Iterator[Measurement]:
        """Attribute the device memory the block takes to its Measurement (see the module
        docstring). Without a probe the block runs unmeasured and not serialised. An exception
        from the block propagates and leaves the measurement at None."""
        result = Measurement()
        if self._probe is None:
            yield result
            return
        with self._one_load:
            quiet_before, events_before = self._snapshot()
            before = self._read()
            yield result
            after = self._read()
            _, events_after = self._snapshot()
        result.nbytes = attribute(before, after, quiet_before and events_before == events_after)

    @contextmanager
    def releasing(self) -> Iterator[None]:
        """Mark a block that frees device memory (an unload): a load measured across it gets
        None rather than a figure short of what it took. Never waits for a measured load."""
        with self._state:
            self._releasing += 1
            self._release_events += 1
        try:
            yield
        finally:
            with self._state:
                self._releasing -= 1
                self._release_events += 1

    def _snapshot(self) -> tuple[bool, int]:
        """(no release under way, release events so far)."""
        with self._state:
            return self._releasing == 0, self._release_events

    def _read(self) -> int | None:
        assert self._probe is not None
        try:
            return int(self._probe())
        except Exception as exc:  # a device that cannot say: no figure, and say so once
            if not self._probe_failed:
                log.warning("device memory of model loads is not attributed: %s", exc)
                self._probe_failed = True
            return None
