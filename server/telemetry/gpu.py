"""GPU gauges from NVML (nvidia-ml-py, `import pynvml`), sampled off the request path.

`GpuProbe` is the seam: `NvmlProbe` reads NVML, tests use a fake `pynvml` module or a fake
probe. `GpuSampler` polls a probe every few seconds from a daemon thread and publishes the
snapshot through a collector on the Metrics registry, as `microtune_gpu_*` gauges labelled `gpu`
(index) and `uuid`, in base units (ratio 0..1, bytes, watts, degrees Celsius). Names are our own,
not DCGM's, so a pod scraped next to dcgm-exporter does not double count.

A value a board does not report (`NVMLError_NotSupported`, or any other NVMLError for that call)
is absent from the exposition, never 0. Without NVML (no driver, no GPU, or nvidia-ml-py not
installed) the sampler logs one line and exports nothing. NVML never creates a CUDA context, so
the front may use it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Callable, Iterable
from contextlib import suppress
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol, TypeVar

from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

__all__ = ["GpuProbe", "GpuSample", "GpuSampler", "NvmlProbe", "NvmlUnavailable"]

log = logging.getLogger("microtune.telemetry")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class GpuSample:
    """One GPU at one instant; None = the board does not report that value."""

    index: int
    uuid: str
    utilization: float | None = None  # 0..1: share of the sample period a kernel was running
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_watts: float | None = None
    temperature_celsius: float | None = None


class GpuProbe(Protocol):
    def devices(self) -> list[GpuSample]: ...

    def close(self) -> None: ...


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (library missing, no driver, no GPU)."""


class NvmlProbe:
    """GpuProbe over pynvml. The constructor initialises NVML or raises NvmlUnavailable."""

    def __init__(self, nvml: ModuleType | None = None) -> None:
        if nvml is None:
            try:
                nvml = importlib.import_module("pynvml")
            except ImportError as exc:
                raise NvmlUnavailable("nvidia-ml-py is not installed") from exc
        self._nvml: Any = nvml  # pynvml has no type hints
        try:
            self._nvml.nvmlInit()
        except self._nvml.NVMLError as exc:  # LibraryNotFound, DriverNotLoaded, NoPermission...
            raise NvmlUnavailable(f"NVML did not initialise: {exc}") from exc
        self._uuids: dict[int, str] = {}
        self._unreadable: set[int] = set()  # boards whose handle NVML refused (logged once)

    def _call(self, fn: Callable[..., T], *args: object) -> T | None:
        try:
            return fn(*args)
        except self._nvml.NVMLError_NotSupported:
            return None  # this board does not report it: absent, and nothing to log
        except self._nvml.NVMLError as exc:
            log.debug("NVML %s failed: %s", getattr(fn, "__name__", fn), exc)
            return None

    def devices(self) -> list[GpuSample]:
        nv = self._nvml
        out: list[GpuSample] = []
        for i in range(nv.nvmlDeviceGetCount()):
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
            except nv.NVMLError as exc:
                # One board lost (NVMLError_GpuIsLost, fallen off the bus) must not freeze the
                # others' gauges: it drops out of the sample, the rest are read as usual.
                if i not in self._unreadable:
                    log.warning("GPU %d cannot be read (%s); its gauges are dropped", i, exc)
                    self._unreadable.add(i)
                continue
            self._unreadable.discard(i)
            uuid = self._uuids.get(i)
            if uuid is None:
                raw = self._call(nv.nvmlDeviceGetUUID, h)
                uuid = raw.decode() if isinstance(raw, bytes) else str(raw or f"gpu-{i}")
                self._uuids[i] = uuid
            util = self._call(nv.nvmlDeviceGetUtilizationRates, h)
            mem = self._call(nv.nvmlDeviceGetMemoryInfo, h)
            mw = self._call(nv.nvmlDeviceGetPowerUsage, h)
            temp = self._call(nv.nvmlDeviceGetTemperature, h, nv.NVML_TEMPERATURE_GPU)
            out.append(
                GpuSample(
                    index=i,
                    uuid=uuid,
                    utilization=None if util is None else util.gpu / 100.0,  # NVML: percent
                    memory_used_bytes=None if mem is None else int(mem.used),
                    memory_total_bytes=None if mem is None else int(mem.total),
                    power_watts=None if mw is None else mw / 1000.0,  # NVML: milliwatts
                    temperature_celsius=None if temp is None else float(temp),
                )
            )
        return out

    def close(self) -> None:
        with suppress(self._nvml.NVMLError):
            self._nvml.nvmlShutdown()


_FIELDS = (
    ("utilization", "microtune_gpu_utilization_ratio", "Share of time a kernel ran, 0..1."),
    ("memory_used_bytes", "microtune_gpu_memory_used_bytes", "GPU memory in use."),
    ("memory_total_bytes", "microtune_gpu_memory_total_bytes", "GPU memory in total."),
    ("power_watts", "microtune_gpu_power_watts", "GPU power draw."),
    ("temperature_celsius", "microtune_gpu_temperature_celsius", "GPU core temperature."),
)


class _GpuCollector(Collector):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.samples: tuple[GpuSample, ...] = ()

    def publish(self, samples: Iterable[GpuSample]) -> None:
        snapshot = tuple(samples)
        with self._lock:
            self.samples = snapshot

    def describe(self) -> Iterable[Metric]:
        # Lets the registry refuse a second sampler on it (duplicate names) at register time.
        return [GaugeMetricFamily(name, doc) for _, name, doc in _FIELDS]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            samples = self.samples
        for attr, name, doc in _FIELDS:
            fam = GaugeMetricFamily(name, doc, labels=["gpu", "uuid"])
            for g in samples:
                value = getattr(g, attr)
                if value is not None:
                    fam.add_metric([str(g.index), g.uuid], float(value))
            if fam.samples:  # no GPU reports it: no family at all, not an empty HELP/TYPE
                yield fam


class GpuSampler:
    """Polls a GpuProbe every `interval_s` seconds in a daemon thread into `registry`."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        interval_s: float = 5.0,
        probe_factory: Callable[[], GpuProbe] = NvmlProbe,
    ) -> None:
        self._collector = _GpuCollector()
        registry.register(self._collector)
        self._interval = interval_s
        self._factory = probe_factory
        self._probe: GpuProbe | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    @property
    def samples(self) -> tuple[GpuSample, ...]:
        return self._collector.samples

    def open(self) -> bool:
        """Initialise the probe; False (after one log line) when NVML is not usable here."""
        try:
            self._probe = self._factory()
        except NvmlUnavailable as exc:
            log.info("GPU metrics off: %s", exc)
            return False
        return True

    def sample_once(self) -> None:
        """Take one sample now (the thread's loop body; tests call it directly)."""
        assert self._probe is not None, "open() first"
        try:
            self._collector.publish(self._probe.devices())
            self._failing = False
        except Exception:  # a driver hiccup must not kill the sampler; log once per streak
            if not self._failing:
                log.warning("GPU sampling failed; keeping the last values", exc_info=True)
            self._failing = True

    def start(self) -> None:
        """Sample in the background, opening the probe first unless open() did (NVML init
        can take a while)."""
        self._thread = threading.Thread(target=self._run, name="gpu-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        if self._probe is None and not self.open():  # (callers may have opened it)
            return
        while not self._stop.is_set():
            self.sample_once()
            self._stop.wait(self._interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._probe is not None:
            self._probe.close()
            self._probe = None
