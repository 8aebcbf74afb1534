"""The autoscaling signal: `microtune_saturation_ratio{model}`, per model, per front process.

Definition (what an HPA targets):

    saturation(model) = EWMA_tau(inferences in flight for the model) / capacity(model)

- *inferences in flight*: each request admitted by the front and not yet answered counts its
  batch size (a batch-8 request fills eight rows of a batch, a batch-1 request one);
- *EWMA_tau*: the exact continuous-time exponential average of that step function, time constant
  `tau` (10 s by default), evaluated at scrape time. A scrape every 15 s that read the
  instantaneous count would alias bursts; the average does not, and it costs one `exp` per
  request start and end;
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

__all__ = ["SATURATION_METRIC", "Saturation", "capacity_for"]

SATURATION_METRIC = "microtune_saturation_ratio"


def capacity_for(max_batch_sizes: Iterable[int], executions_per_version: int = 2) -> int:
    """Capacity of one model in inferences: sum of max(1, max_batch_size) x executions."""
    return sum(max(1, b) for b in max_batch_sizes) * executions_per_version


class _Ewma:
    """Exact continuous-time EWMA of a step function (one model's in-flight inferences)."""

    __slots__ = ("current", "stamp", "tau", "value")

    def __init__(self, tau: float, now: float) -> None:
        self.tau = tau
        self.current = 0.0  # the step function's present value
        self.value = 0.0  # its average up to `stamp`
        self.stamp = now

    def advance(self, now: float) -> float:
        # Between events the function is constant, so the average relaxes toward it exactly.
        dt = now - self.stamp
        if dt > 0.0:
            self.value = self.current + (self.value - self.current) * math.exp(-dt / self.tau)
            self.stamp = now
        return self.value


class Saturation(Collector):
    """Per-model in-flight EWMA and capacity; a collector yielding the saturation gauge."""

    def __init__(self, tau_s: float, clock: Callable[[], float]) -> None:
        if tau_s <= 0:
            raise ValueError("the saturation time constant must be positive")
        self._tau = tau_s
        self._clock = clock
        # The request path (event loop) and the scrape thread both touch the averages.
        self._lock = threading.Lock()
        self._load: dict[str, _Ewma] = {}
        self._capacity: dict[str, int] = {}

    def step(self, model: str, delta: int) -> None:
        """The model's in-flight inference count changes by `delta` now."""
        now = self._clock()
        with self._lock:
            ewma = self._load.get(model)
            if ewma is None:
                ewma = self._load[model] = _Ewma(self._tau, now)
            # _Ewma.advance, inlined: this runs twice per request.
            dt = now - ewma.stamp
            if dt > 0.0:
                cur = ewma.current
                ewma.value = cur + (ewma.value - cur) * math.exp(-dt / ewma.tau)
                ewma.stamp = now
            ewma.current += delta

    def set_capacity(self, model: str, inferences: int) -> None:
        with self._lock:
            self._capacity[model] = inferences

    def value(self, model: str) -> float:
        now = self._clock()
        with self._lock:
            return self._value(model, now)

    def _value(self, model: str, now: float) -> float:
        ewma = self._load.get(model)
        load = ewma.advance(now) if ewma is not None else 0.0
        # capacity 0 (nothing READY) would divide by zero; report the load itself, which is
        # at least as alarming as any ratio and keeps the series finite for the HPA.
        return load / max(self._capacity.get(model, 0), 1)

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(SATURATION_METRIC, "")]

    def collect(self) -> Iterable[Metric]:
        fam = GaugeMetricFamily(
            SATURATION_METRIC,
            "EWMA of in-flight inferences over the model's pod capacity (1 = full).",
            labels=["model"],
        )
        now = self._clock()
        with self._lock:
            for model in sorted(self._load.keys() | self._capacity.keys()):
                fam.add_metric([model], self._value(model, now))
        yield fam
