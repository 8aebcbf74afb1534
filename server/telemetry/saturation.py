"""The autoscaling signal: `microtune_saturation_ratio{model}`, per model, per front process.

Definition (what an HPA targets):

    saturation(model) = EWMA_tau(inferences in flight for the model) / capacity(model)

- *inferences in flight*: each request admitted by the front and not yet answered counts its
  batch size (a batch-8 request fills eight rows of a batch, a batch-1 request one);
- *EWMA_tau*: the continuous-time exponential average of that step function, time constant
  `tau` (10 s by default), evaluated at scrape time. A scrape every 15 s that read the
  instantaneous count would alias bursts; the average does not. It is exact except inside
  cells of 10 ms that hold several changes, where the count is taken at its time average over
  the cell: the error stays below (cell / 2 tau) = 0.05 % of the peak count even for traffic
  locked in phase with the cells, and averages out for real traffic. That costs a few
  additions per request start and end instead of an `exp` and a lock;
- *capacity*: what `set_capacity` was given, by convention `capacity_for(max_batch_sizes)` = sum
  over the model's READY versions of max(1, max_batch_size) x 2 (one batch executing while the
  next one forms). 1.0 = the model holds as much work as the worker can execute without queueing.

Why in-flight work rather than queue wait: below saturation, latency is flat, so by Little's law
in-flight work grows in proportion to the request rate; the HPA's rule `replicas x value / target`
then lands on the right replica count in one step. Queue wait stays near zero until saturation
and then explodes, which drives a proportional controller into oscillation.

Several fronts: the ratio is linear in the in-flight count and every front divides by the same
pod capacity, so summing the fronts' values (what `aggregate.merge_exposition` does with gauges)
gives the pod's value. The pod's signal is the most saturated model:
`max by (namespace, pod) (microtune_saturation_ratio)`, with a target such as 0.7
(`AverageValue: 700m`) to leave headroom while new pods load.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["SATURATION_METRIC", "Load", "Saturation", "capacity_for"]

SATURATION_METRIC = "microtune_saturation_ratio"
CELL_S = 0.01  # see the module docstring: inside a cell, changes count by their time average


def capacity_for(max_batch_sizes: Iterable[int], executions_per_version: int = 2) -> int:
    """Capacity of one model in inferences: sum of max(1, max_batch_size) x executions."""
    return sum(max(1, b) for b in max_batch_sizes) * executions_per_version


class Load:
    """One model's work in flight in this front: requests (the in-flight gauge) and inferences,
    with the EWMA of the inferences. `enter`/`leave` run on the event loop for every request.

    The scrape thread reads while the loop writes, without a lock: every write below is a run of
    attribute stores and arithmetic with no call inside, which CPython's GIL never splits (a
    thread switch waits for a call or a loop jump), and `_average` reads its fields the same way.
    """

    __slots__ = (
        "_area",
        "_cell_end",
        "_cell_start",
        "_clock",
        "_stamp",
        "_tau",
        "_value",
        "inferences",
        "requests",
    )

    def __init__(self, tau: float, clock: Callable[[], float]) -> None:
        now = clock()
        self._tau, self._clock = tau, clock
        self.requests = 0
        self.inferences = 0  # the step function
        self._value = 0.0  # its average up to _cell_start
        self._cell_start, self._cell_end = now, now + CELL_S
        self._area = 0.0  # its integral from _cell_start to _stamp
        self._stamp = now

    def enter(self, inferences: int) -> None:
        now = self._clock()
        if now >= self._cell_end:
            self._fold(now)
        self._area += self.inferences * (now - self._stamp)
        self._stamp = now
        self.inferences += inferences
        self.requests += 1

    def leave(self, inferences: int) -> None:
        # enter's mirror, written out: a shared helper would add a Python call per event.
        now = self._clock()
        if now >= self._cell_end:
            self._fold(now)
        self._area += self.inferences * (now - self._stamp)
        self._stamp = now
        self.inferences -= inferences
        self.requests -= 1

    def _fold(self, now: float) -> None:
        value = self._average(now)
        self._value, self._cell_start, self._cell_end = value, now, now + CELL_S
        self._area, self._stamp = 0.0, now

    def _average(self, now: float) -> float:
        """The EWMA at `now` (>= the last change), from one consistent read of the state."""
        value, start, end, area, stamp, level = (
            self._value, self._cell_start, self._cell_end, self._area, self._stamp,
            self.inferences,
        )  # fmt: skip
        tau = self._tau
        # The cell so far (or to its end): the count at its time average over it...
        close = min(now, end)
        width = close - start
        if width > 0.0:
            mean = (area + level * (close - stamp)) / width
            value = mean + (value - mean) * math.exp(-width / tau)
        # ...then, past the cell, the constant count up to now: exactly.
        if now > end:
            value = level + (value - level) * math.exp(-(now - end) / tau)
        return value


class Saturation(Collector):
    """Per-model `Load`s and capacities; a collector yielding the saturation gauge."""

    def __init__(self, tau_s: float, clock: Callable[[], float]) -> None:
        if tau_s <= 0:
            raise ValueError("the saturation time constant must be positive")
        self._tau = tau_s
        self._clock = clock
        self._lock = threading.Lock()  # capacities and the set of loads (not the loads' state)
        self._loads: dict[str, Load] = {}
        self._capacity: dict[str, int] = {}

    def load(self, model: str) -> Load:
        """The model's load (created at first use)."""
        got = self._loads.get(model)
        if got is None:
            with self._lock:
                got = self._loads.setdefault(model, Load(self._tau, self._clock))
        return got

    def forget(self, model: str) -> None:
        """A model gone from the repository: its load and capacity go (and its series)."""
        with self._lock:
            self._loads.pop(model, None)
            self._capacity.pop(model, None)

    def set_capacity(self, model: str, inferences: int) -> None:
        with self._lock:
            self._capacity[model] = inferences

    def value(self, model: str) -> float:
        load = self._loads.get(model)
        average = load._average(self._clock()) if load is not None else 0.0
        # capacity 0 (nothing READY) would divide by zero; report the load itself, which is
        # at least as alarming as any ratio and keeps the series finite for the HPA.
        return average / max(self._capacity.get(model, 0), 1)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(SATURATION_METRIC, "")]

    def loads(self) -> list[tuple[str, Load]]:
        with self._lock:
            return list(self._loads.items())

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(
            SATURATION_METRIC,
            "EWMA of in-flight inferences over the model's pod capacity (1 = full).",
            labels=["model"],
        )
        with self._lock:
            models = sorted(self._capacity)  # declared models only: they have a capacity
        for model in models:
            fam.add_metric([model], self.value(model))
        yield fam
