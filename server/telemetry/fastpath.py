"""The per-request metric families, kept as plain counters and bucket lists.

prometheus_client's Counter and Histogram take a lock and walk every bucket on each update;
at thousands of requests a second on two cores that was ~10% of the front's CPU. The request
path runs on the event loop thread only, so here an update is a dict lookup, a `bisect` and
a few integer additions; the families are built when Prometheus scrapes (`collect`, on the
HTTP server's thread: copying a dict or list is atomic under the GIL, so a scrape sees a
consistent-enough snapshot, as with any Prometheus client). Names, types, labels and buckets
are exactly those documented in docs/observability.md.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["FastCounter", "FastHistogram", "HistogramSeries", "RequestPathCollector"]


class FastCounter:
    """One counter family: labels tuple -> value."""

    __slots__ = ("doc", "labels", "name", "values")

    def __init__(self, name: str, doc: str, labels: Sequence[str]) -> None:
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1.0) -> None:
        self.values[key] = self.values.get(key, 0.0) + amount

    def family(self) -> Metric:
        fam = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            fam.add_metric(list(key), value)
        return fam


class HistogramSeries:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # one per bound, then +Inf
        self.total = 0.0

    def add(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # first bound >= value: `le` semantics
        self.total += value

    def merge(self, counts: Sequence[int], total: float) -> None:
        """Add bucket counts (one per bound, then +Inf) and their sum, counted elsewhere."""
        mine = self.counts
        for i, n in enumerate(counts):
            if n:
                mine[i] += n
        self.total += total


class FastHistogram:
    """One histogram family with fixed bucket bounds: labels tuple -> bucket counts."""

    __slots__ = ("bounds", "doc", "labels", "name", "series")

    def __init__(self, name: str, doc: str, labels: Sequence[str], bounds: Sequence[float]):
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.bounds = tuple(bounds)
        self.series: dict[tuple[str, ...], HistogramSeries] = {}

    def observe(self, key: tuple[str, ...], value: float) -> None:
        self.series_for(key).add(value)

    def series_for(self, key: tuple[str, ...]) -> HistogramSeries:
        """The series of `key` (created empty if new): callers may keep it and `add` to it."""
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = HistogramSeries(self.bounds)
        return s

    def family(self) -> Metric:
        fam = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, s in list(self.series.items()):
            counts, total = list(s.counts), s.total
            buckets, running = [], 0
            for bound, n in zip((*self.bounds, float("inf")), counts, strict=True):
                running += n
                buckets.append((_le(bound), running))
            fam.add_metric(list(key), buckets, total)
        return fam


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class RequestPathCollector(Collector):
    """Exposes a set of FastCounter / FastHistogram families from one registry; `before` runs
    first at each collection (brings deferred counts in)."""

    def __init__(
        self,
        families: Iterable[FastCounter | FastHistogram],
        before: Callable[[], None] = lambda: None,
    ) -> None:
        self.families = tuple(families)
        self._before = before

    def collect(self) -> Iterable[Metric]:
        self._before()
        for f in self.families:
            yield f.family()
