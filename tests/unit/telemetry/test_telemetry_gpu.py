"""GPU gauges against a fake `pynvml` module (2 GPUs, one call NotSupported), as gpustat tests.

The fake is put into sys.modules, so `NvmlProbe` imports it exactly as it would nvidia-ml-py.
Values must come out in base units (ratio, bytes, watts, Celsius) and labelled gpu/uuid.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.telemetry.gpu import GpuSample, GpuSampler, NvmlProbe, NvmlUnavailable

GiB = 1 << 30


class _Util(NamedTuple):
    gpu: int  # percent
    memory: int


class _Mem(NamedTuple):
    total: int
    free: int
    used: int


@dataclass
class _Board:
    uuid: str | bytes  # older pynvml returned bytes
    util: int  # percent
    mem: _Mem
    power_mw: int | None  # None: NVMLError_NotSupported
    temp: int


def fake_pynvml(*, init_error: str | None = None) -> Any:
    """A pynvml stand-in: GPU 0 reports everything, GPU 1 has no power sensor."""
    nv: Any = types.ModuleType("pynvml")

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    class NVMLError_LibraryNotFound(NVMLError):
        pass

    class NVMLError_GpuIsLost(NVMLError):
        pass

    nv.NVMLError = NVMLError
    nv.NVMLError_NotSupported = NVMLError_NotSupported
    nv.NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    nv.NVMLError_GpuIsLost = NVMLError_GpuIsLost
    nv.NVML_TEMPERATURE_GPU = 0
    nv.calls = []
    gpus = [
        _Board(b"GPU-0000aaaa", 87, _Mem(80 * GiB, 60 * GiB, 20 * GiB), 312_500, 64),
        _Board("GPU-1111bbbb", 0, _Mem(16 * GiB, 15 * GiB, 1 * GiB), None, 41),
    ]

    def init() -> None:
        nv.calls.append("init")
        if init_error == "library":
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")

    def power(h: int) -> int:
        mw = gpus[h].power_mw
        if mw is None:
            raise NVMLError_NotSupported("Not Supported")
        return mw

    def temperature(h: int, sensor: int) -> int:
        assert sensor == 0
        return gpus[h].temp

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlDeviceGetCount = lambda: len(gpus)
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetUUID = lambda h: gpus[h].uuid
    nv.nvmlDeviceGetUtilizationRates = lambda h: _Util(gpus[h].util, 0)
    nv.nvmlDeviceGetMemoryInfo = lambda h: gpus[h].mem
    nv.nvmlDeviceGetPowerUsage = power
    nv.nvmlDeviceGetTemperature = temperature
    nv.gpus = gpus
    return nv


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    module = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    yield module


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, s.labels["gpu"], s.labels["uuid"]): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_probe_reads_two_gpus_in_base_units(nvml: Any) -> None:
    probe = NvmlProbe()
    a, b = probe.devices()
    assert a == GpuSample(0, "GPU-0000aaaa", 0.87, 20 * GiB, 80 * GiB, 312.5, 64.0)
    assert b == GpuSample(1, "GPU-1111bbbb", 0.0, 1 * GiB, 16 * GiB, None, 41.0)
    probe.close()
    assert nvml.calls == ["init", "shutdown"]


def test_sampler_exports_values_units_and_labels(
    nvml: Any, check_metrics: Callable[[bytes], None]
) -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry, interval_s=60.0)
    assert sampler.open()
    sampler.sample_once()
    s = _samples(registry)
    g0, g1 = ("0", "GPU-0000aaaa"), ("1", "GPU-1111bbbb")
    assert s[("microtune_gpu_utilization_ratio", *g0)] == pytest.approx(0.87)
    assert s[("microtune_gpu_utilization_ratio", *g1)] == 0.0
    assert s[("microtune_gpu_memory_used_bytes", *g0)] == 20 * GiB
    assert s[("microtune_gpu_memory_total_bytes", *g1)] == 16 * GiB
    assert s[("microtune_gpu_power_watts", *g0)] == 312.5
    assert s[("microtune_gpu_temperature_celsius", *g1)] == 41.0
    # NotSupported on GPU 1: the series is absent, not 0, and nothing crashed
    assert ("microtune_gpu_power_watts", *g1) not in s
    check_metrics(generate_latest(registry))
    sampler.stop()


def test_one_sampler_per_registry(nvml: Any) -> None:
    registry = CollectorRegistry()
    GpuSampler(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GpuSampler(registry)


def test_values_follow_the_board(nvml: Any) -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry)
    assert sampler.open()
    sampler.sample_once()
    nvml.gpus[0].temp = 70
    sampler.sample_once()
    assert _samples(registry)[("microtune_gpu_temperature_celsius", "0", "GPU-0000aaaa")] == 70


def test_background_thread_samples_and_stops(nvml: Any) -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry, interval_s=0.01)
    sampler.start()
    sample_both_boards_then_stop(sampler)
    assert nvml.calls[-1] == "shutdown"


def sample_both_boards_then_stop(sampler: GpuSampler) -> None:
    """Wait (up to 5 s) for the sampler's thread to publish both fake boards, then stop it."""
    try:
        for _ in range(500):
            if len(sampler.samples) == 2:
                break
            time.sleep(0.01)
        assert len(sampler.samples) == 2
    finally:
        sampler.stop()


def test_open_then_start_initialises_nvml_once(nvml: Any) -> None:
    """What the front and the supervisor do (open to know whether to start): start() used to
    open a second probe, so NVML was initialised twice and shut down once."""
    sampler = GpuSampler(CollectorRegistry(), interval_s=0.01)
    assert sampler.open()
    sampler.start()
    sample_both_boards_then_stop(sampler)
    assert (nvml.calls.count("init"), nvml.calls.count("shutdown")) == (1, 1)


def test_without_nvml_one_line_and_nothing_exported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(init_error="library"))
    registry = CollectorRegistry()
    sampler = GpuSampler(registry, interval_s=0.01)
    with caplog.at_level(logging.INFO, logger="microtune.telemetry"):
        sampler.start()
        sampler.stop()
    lines = [r for r in caplog.records if r.name == "microtune.telemetry"]
    assert len(lines) == 1 and "GPU metrics off" in lines[0].getMessage()
    assert "Library Not Found" in lines[0].getMessage()
    assert b"microtune_gpu" not in generate_latest(registry)


def test_without_nvidia_ml_py_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(NvmlUnavailable, match="not installed"):
        NvmlProbe()


def test_real_pynvml_without_gpu_is_unavailable() -> None:
    """On this machine (no GPU) the real library raises NVMLError_LibraryNotFound at init."""
    pynvml: Any = pytest.importorskip("pynvml")
    try:
        probe = NvmlProbe(pynvml)
    except NvmlUnavailable as exc:
        assert isinstance(exc.__cause__, pynvml.NVMLError)
        return
    try:  # a machine with a driver: the real probe must read something sane
        for g in probe.devices():
            assert g.uuid and (g.memory_total_bytes is None or g.memory_total_bytes > 0)
    finally:
        probe.close()


def test_a_failing_board_keeps_the_last_values_and_logs_once(
    nvml: Any, caplog: pytest.LogCaptureFixture
) -> None:
    registry = CollectorRegistry()
    sampler = GpuSampler(registry)
    assert sampler.open()
    sampler.sample_once()

    def lost() -> int:
        raise nvml.NVMLError_GpuIsLost("GPU is lost")

    nvml.nvmlDeviceGetCount = lost
    with caplog.at_level(logging.WARNING, logger="microtune.telemetry"):
        sampler.sample_once()
        sampler.sample_once()
    assert len([r for r in caplog.records if "GPU sampling failed" in r.getMessage()]) == 1
    assert len(sampler.samples) == 2


def test_one_lost_board_leaves_the_others_gauges_live(
    nvml: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """GPU 1 falls off the bus: GPU 0 is still sampled (before, the whole sample failed and
    every board's gauges froze at their last values, the lost one's included)."""
    registry = CollectorRegistry()
    sampler = GpuSampler(registry)
    assert sampler.open()
    sampler.sample_once()

    def handle(i: int) -> int:
        if i == 1:
            raise nvml.NVMLError_GpuIsLost("GPU is lost")
        return i

    nvml.nvmlDeviceGetHandleByIndex = handle
    nvml.gpus[0].util = 5
    with caplog.at_level(logging.WARNING, logger="microtune.telemetry"):
        sampler.sample_once()
        sampler.sample_once()
    samples = _samples(registry)
    assert samples[("microtune_gpu_utilization_ratio", "0", "GPU-0000aaaa")] == 0.05
    assert not [key for key in samples if key[1] == "1"]  # the lost board's series are gone
    assert len([r for r in caplog.records if "GPU 1 cannot be read" in r.getMessage()]) == 1
