"""One scrape for the whole pod when several front processes share the gRPC port.

Design (no prometheus_client multiprocess mode, whose mmap files outlive crashed processes and
cannot express "max" for gauges): every front serves its own `Metrics` registry on a loopback
port (`Metrics.start_http_server(0, "127.0.0.1")`, reporting the bound port to the supervisor).
The process that owns the public metrics port runs `PodMetrics`: on each scrape it fetches every
front's exposition (in parallel, with a timeout), adds its own registry if it is a front too,
and answers the merge. Nothing runs between scrapes, values are as fresh as the scrape, and a
front needs no extra protocol.

Merge rules (`merge_families`), per sample (same name and labels):
- counters, histograms (buckets, _count, _sum), summaries' _count/_sum: summed;
- gauges: summed, except the pod-scoped families (`metrics.POD_SCOPED`: model state, load time,
  device memory, routing weights, GPU gauges), which every front reports identically about the
  shared worker/GPUs and which are merged by max (a sum would multiply them by N); with the
  default set, summed gauges are in-flight, pending, saturation (linear, see saturation.py),
  shared-memory slots and pinned bytes, which are per front;
- `_created` series are dropped (meaningless once processes are summed; Prometheus ignores
  them by default), as are summary quantiles (quantiles cannot be merged; we export none).

Counters stay monotonic when a front restarts or stops: a front is identified by a key (e.g.
"<index>:<pid>") and when its key disappears, or its counters go backwards, its last cumulative
values are kept as a retired base that is added to every later merge. When a front does not
answer in time its last exposition is used, so one slow front does not make the pod's totals
drop (which Prometheus would read as a counter reset).
"""

from __future__ import annotations

import http.client
import logging
import threading
import urllib.request
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from server.telemetry.http import MetricsHttpServer, start_http_server
from server.telemetry.metrics import POD_SCOPED

__all__ = ["PodMetrics", "merge_exposition", "merge_families", "parse_exposition"]

log = logging.getLogger("microtune.telemetry")

_CUMULATIVE = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
_SampleKey = tuple[str, tuple[tuple[str, str], ...]]


def parse_exposition(text: bytes | str) -> list[Metric]:
    """Parse Prometheus text format 0.0.4 into metric families."""
    return list(text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text))


def merge_families(
    groups: Sequence[Iterable[Metric]], max_families: Collection[str] = POD_SCOPED
) -> list[Metric]:
    """Merge the families of several processes (see the module docstring for the rules).

    Raises ValueError when one family name has two different types: all fronts run the same
    code, so that is a bug to surface, not to paper over.
    """
    groups = [list(g) for g in groups]
    cumulative = {f.name for g in groups for f in g if f.type in _CUMULATIVE}
    out: dict[str, Metric] = {}
    values: dict[str, dict[_SampleKey, tuple[str, dict[str, str], float]]] = {}
    for group in groups:
        for fam in group:
            if fam.name.endswith("_created") and fam.name[: -len("_created")] in cumulative:
                continue  # text format writes a counter's _created as a separate gauge family
            merged = out.get(fam.name)
            if merged is None:
                merged = out[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            elif merged.type != fam.type:
                raise ValueError(f"{fam.name} is a {merged.type} and a {fam.type}")
            take_max = fam.type not in _CUMULATIVE and (
                fam.type != "gauge" or fam.name in max_families
            )
            acc = values[fam.name]
            for s in fam.samples:
                if s.name == fam.name + "_created" or (
                    fam.type == "summary" and "quantile" in s.labels
                ):
                    continue
                key = (s.name, tuple(sorted(s.labels.items())))
                prev = acc.get(key)
                if prev is None:
                    acc[key] = (s.name, dict(s.labels), s.value)
                else:
                    value = max(prev[2], s.value) if take_max else prev[2] + s.value
                    acc[key] = (prev[0], prev[1], value)
    for name, fam in out.items():
        for sample_name, labels, value in values[name].values():
            fam.add_sample(sample_name, labels, value)
    return list(out.values())


def merge_exposition(
    texts: Sequence[bytes | str], max_families: Collection[str] = POD_SCOPED
) -> bytes:
    """Merge several text expositions into one (text format 0.0.4)."""
    merged = merge_families([parse_exposition(t) for t in texts], max_families)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(merged))
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def _cumulative_only(families: Iterable[Metric]) -> list[Metric]:
    return [f for f in families if f.type in _CUMULATIVE]


def _went_backwards(old: Iterable[Metric], new: Iterable[Metric]) -> bool:
    before = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in _cumulative_only(old)
        for s in f.samples
    }
    return any(
        s.value < before.get((s.name, tuple(sorted(s.labels.items()))), 0.0)
        for f in _cumulative_only(new)
        for s in f.samples
    )


class PodMetrics(Collector):
    """Collector answering the pod's merged metrics (run it where the public port is).

    `sources()` returns {front key: metrics URL} for the fronts alive now; a key must change when
    the process behind it changes (e.g. "<index>:<pid>"). `local` is this process's own registry
    when it serves requests too.
    """

    def __init__(
        self,
        sources: Callable[[], Mapping[str, str]],
        *,
        local: CollectorRegistry | None = None,
        timeout_s: float = 2.0,
        max_families: Collection[str] = POD_SCOPED,
    ) -> None:
        self._sources = sources
        self._local = local
        self._timeout = timeout_s
        self._max = max_families
        self._lock = threading.Lock()  # two concurrent scrapes would both retire a front
        self._last: dict[str, list[Metric]] = {}
        self._retired: list[Metric] = []
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="metrics-fetch")
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def _fetch(self, url: str) -> list[Metric] | None:
        # Ask for text 0.0.4 explicitly: without it a front could answer OpenMetrics.
        req = urllib.request.Request(url, headers={"Accept": "text/plain; version=0.0.4"})
        try:
            with urllib.request.urlopen(req, timeout=self._timeout) as resp:
                return parse_exposition(resp.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            log.warning("metrics of front %s unavailable (%s); using its last values", url, exc)
            return None

    def _retire(self, families: list[Metric]) -> None:
        self._retired = merge_families([self._retired, _cumulative_only(families)], self._max)

    def collect(self) -> Iterable[Metric]:
        sources = dict(self._sources())
        fetched = dict(zip(sources, self._pool.map(self._fetch, sources.values()), strict=True))
        with self._lock:
            for key in [k for k in self._last if k not in sources]:
                self._retire(self._last.pop(key))
            for key, families in fetched.items():
                if families is None:
                    continue  # keep the last values of a front that did not answer
                last = self._last.get(key)
                if last is not None and _went_backwards(last, families):
                    self._retire(last)  # the process behind the key restarted
                self._last[key] = families
            groups = [self._retired, *(self._last[k] for k in sources if k in self._last)]
            if self._local is not None:
                groups.append(list(self._local.collect()))
            return merge_families(groups, self._max)

    def start_http_server(self, port: int, host: str = "0.0.0.0") -> MetricsHttpServer:
        """Serve the pod's metrics at http://host:port/metrics."""
        return start_http_server(self.registry, port, host)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
