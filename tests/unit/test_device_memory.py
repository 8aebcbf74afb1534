"""Device memory attributed to model loads (runtime.engine.memory) with an injected probe, and
the worker reporting it in LoadDone: a figure on a device, None (no metric series) on the CPU."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime.engine.memory import DeviceMemoryMeter, attribute
from runtime.ipc.protocol import Code, LoadDone, LoadModel, ModelSignature, UnloadModel
from runtime.settings import WorkerSettings
from runtime.worker import Worker
from server.settings import DEMO_REPOSITORY

MiB = 1 << 20


class Device:
    """A fake device: `used` bytes in use, read by the meter through `probe`."""

    def __init__(self, used: int = 500 * MiB) -> None:
        self.used = used
        self.reads = 0

    def probe(self) -> int:
        self.reads += 1
        return self.used


def test_attribute() -> None:
    assert attribute(100, 164, True) == 64
    assert attribute(100, 100, True) == 0
    assert attribute(100, 90, True) is None  # something else freed memory meanwhile
    assert attribute(100, 164, False) is None  # a release overlapped the window
    assert attribute(None, 164, True) is None
    assert attribute(100, None, True) is None


def test_a_load_is_attributed_what_the_device_gained() -> None:
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    with meter.measure() as used:
        dev.used += 48 * MiB
    assert used.nbytes == 48 * MiB
    assert dev.reads == 2


def test_without_a_probe_nothing_is_measured() -> None:
    meter = DeviceMemoryMeter(None)
    assert not meter.enabled
    with meter.measure() as outer, meter.measure() as inner:  # not serialised: no lock to wait on
        pass
    assert outer.nbytes is None and inner.nbytes is None


def test_loads_are_measured_one_at_a_time() -> None:
    """A second load waits for the first one's window: each is attributed only its own bytes."""
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    first_inside = threading.Event()
    release_first = threading.Event()
    results: dict[str, int | None] = {}

    def first() -> None:
        with meter.measure() as used:
            dev.used += 100 * MiB
            first_inside.set()
            assert release_first.wait(10)
        results["first"] = used.nbytes

    def second() -> None:
        with meter.measure() as used:
            dev.used += 7 * MiB
        results["second"] = used.nbytes

    t1 = threading.Thread(target=first)
    t1.start()
    assert first_inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    t2.join(0.2)
    assert t2.is_alive(), "the second load measured while the first was in its window"
    release_first.set()
    t1.join(10)
    t2.join(10)
    assert results == {"first": 100 * MiB, "second": 7 * MiB}


def test_a_release_during_the_window_makes_the_load_unknowable() -> None:
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    with meter.measure() as used:
        dev.used += 64 * MiB
        with meter.releasing():  # an unload frees 80 MiB meanwhile: +64 would read as -16
            dev.used -= 80 * MiB
    assert used.nbytes is None
    # A release that began before the window and ends inside it, or spans it, too.
    for ends_inside in (True, False):
        release = meter.releasing()
        release.__enter__()
        with meter.measure() as used:
            dev.used += MiB
            if ends_inside:
                release.__exit__(None, None, None)
        if not ends_inside:
            release.__exit__(None, None, None)
        assert used.nbytes is None
    # A release outside any window changes nothing for the next load.
    with meter.releasing():
        dev.used -= MiB
    with meter.measure() as used:
        dev.used += 3 * MiB
    assert used.nbytes == 3 * MiB


def test_a_release_never_waits_for_a_measured_load() -> None:
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    done = threading.Event()

    def unload() -> None:
        with meter.releasing():
            pass
        done.set()

    with meter.measure():
        threading.Thread(target=unload).start()
        assert done.wait(5), "releasing() blocked behind the measured load"


def test_less_memory_after_than_before_is_unknowable() -> None:
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    with meter.measure() as used:
        dev.used -= 10 * MiB  # another process freed memory: nothing to attribute
    assert used.nbytes is None


def test_a_failing_probe_gives_none_and_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise RuntimeError("no device")

    meter = DeviceMemoryMeter(broken)
    with caplog.at_level(logging.WARNING, "runtime.engine.memory"):
        for _ in range(3):
            with meter.measure() as used:
                pass
            assert used.nbytes is None
    assert [r.getMessage() for r in caplog.records] == [
        "device memory of model loads is not attributed: no device"
    ]


def test_a_failed_load_leaves_no_figure_and_frees_the_meter() -> None:
    dev = Device()
    meter = DeviceMemoryMeter(dev.probe)
    with pytest.raises(ValueError), meter.measure() as used:
        raise ValueError("bad model")
    assert used.nbytes is None
    with meter.measure() as used:  # the lock was released
        dev.used += MiB
    assert used.nbytes == MiB


# ----------------------------------------------------------------------------- the worker


def _load(name: str, version: int = 1, max_batch: int = 8, rid: int = 1) -> LoadModel:
    path = DEMO_REPOSITORY / name / str(version) / "model.onnx"
    return LoadModel(rid, name, version, str(path), max_batch, ModelSignature((), ()))


@pytest.fixture
def cpu_worker(tmp_path: Path) -> Iterator[Worker]:
    w = Worker(WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu"))
    yield w
    w.close_lanes()


def test_a_cpu_worker_attributes_no_device_memory(cpu_worker: Worker) -> None:
    assert not cpu_worker.memory.enabled
    done = cpu_worker.load(_load("dense"))
    assert done.code == Code.OK
    assert done.device_memory is None  # absent, never a fake 0


@pytest.mark.parametrize("graphs", [False, True], ids=["session", "graph-model"])
def test_the_worker_reports_what_the_load_took(tmp_path: Path, graphs: bool) -> None:
    """The figure the meter attributes travels in LoadDone, and a second front loading the same
    version (no new load) gets the same figure. `graphs`: the CUDA-graph serving path, run on
    the CPU EP (cpu_graphs)."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", cpu_graphs=graphs)
    worker = Worker(settings)
    try:
        dev = Device()
        calls = 0

        def probe() -> int:
            # The second reading of each load (after it) sees 32 MiB more.
            nonlocal calls
            calls += 1
            if calls % 2 == 0:
                dev.used += 32 * MiB
            return dev.used

        worker.memory = DeviceMemoryMeter(probe)
        done = worker.load(_load("dense"))
        assert (done.code, done.device_memory) == (Code.OK, 32 * MiB), done.message
        again = worker.load(_load("dense", rid=2))  # another front: the first load serves it
        assert again.device_memory == 32 * MiB and calls == 2
        worker.unload(UnloadModel(3, "dense", 1))
    finally:
        worker.close_lanes()


@pytest.mark.parametrize("graphs", [False, True], ids=["session", "graph-model"])
def test_a_load_of_the_same_revision_is_served_by_the_loaded_instance(
    tmp_path: Path, graphs: bool
) -> None:
    """Fronts asking for one revision get one load; a new revision (changed files, another
    RepositoryModelLoad) loads a new instance; "" (a front starting) takes what is loaded."""
    settings = WorkerSettings(socket_path=str(tmp_path / "w.sock"), device="cpu", cpu_graphs=graphs)
    worker = Worker(settings)
    try:
        path = str(DEMO_REPOSITORY / "dense" / "1" / "model.onnx")

        def load(rid: int, revision: str) -> LoadDone:
            msg = LoadModel(rid, "dense", 1, path, 8, ModelSignature((), ()), revision=revision)
            done = worker.load(msg)
            assert done.code == Code.OK, done.message
            return done

        assert [load(1, "fp1").reused, load(2, "fp1").reused] == [False, True]
        assert [load(3, "fp1/t1").reused, load(4, "fp1/t1").reused] == [False, True]
        assert load(5, "").reused
        assert not load(6, "fp2").reused
        worker.unload(UnloadModel(7, "dense", 1))
    finally:
        worker.close_lanes()


def test_load_done_carries_device_memory_only_when_known() -> None:
    from runtime.ipc.protocol import decode_worker, encode

    sig = ModelSignature((), ())
    with_figure = LoadDone(1, Code.OK, signature=sig, load_ns=5, device_memory=12 * MiB)
    assert decode_worker(encode(with_figure)[4:]) == with_figure
    cpu = LoadDone(1, Code.OK, signature=sig, load_ns=5)
    assert decode_worker(encode(cpu)[4:]).device_memory is None  # type: ignore[union-attr]
    assert len(encode(cpu)) < len(encode(with_figure))  # omitted on the wire when unknown
