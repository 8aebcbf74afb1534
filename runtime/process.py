"""Starting and stopping the worker process from the front (spawn, never fork)."""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess

from runtime.settings import WorkerSettings

__all__ = ["WORKER_CANNOT_START", "WorkerProcess", "WorkerStartFailed"]

# The exit code of a worker that cannot start as configured (a CUDA device asked of an
# onnxruntime without the CUDA EP): sysexits' EX_CONFIG, as the server's own.
WORKER_CANNOT_START = 78


class WorkerStartFailed(RuntimeError):
    """The worker exited during its start-up, or did not listen in time."""


def _worker_main(settings_json: bytes, log_setup: Callable[[], object] | None = None) -> None:
    """The spawn target. It imports runtime.worker (and with it onnxruntime) in the child only:
    the front must never import onnxruntime or CUDA (tests/test_import_rules.py).

    `log_setup` (picklable: a module-level function or a functools.partial of one) configures
    the child's logging before the worker starts, so that its lines share the front's format on
    the same stderr; the worker's own fallback (text lines) then does nothing."""
    # The worker ends when its front tells it to (WorkerProcess.stop), never on a signal meant
    # for the server: a SIGTERM or SIGINT sent to the whole process group (systemd's default
    # KillMode, Ctrl-C in a terminal, `kill -- -PGID`) reached it with the front's, and it died
    # at once, failing every request the front was still draining.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_setup is not None:
        log_setup()
    try:
        worker = importlib.import_module("runtime.worker")
    except ModuleNotFoundError as exc:
        if exc.name not in _EXTRA_MODULES:
            raise
        # `pip install .` installs neither: they come with the cpu or gpu extra (one of two
        # onnxruntime packages). One line saying so, not a traceback the front calls "exit 1".
        logging.getLogger("microtune.worker").error(
            "cannot start: %s is not installed: install microtune with its cpu extra "
            "(pip install '.[cpu]'), or gpu on a CUDA machine ('.[gpu]')",
            exc.name,
        )
        raise SystemExit(WORKER_CANNOT_START) from None
    worker.run(settings_json)


# What the worker imports from the cpu / gpu extras (pyproject.toml).
_EXTRA_MODULES = ("onnxruntime", "onnx")


class WorkerProcess:
    def __init__(
        self, settings: WorkerSettings, log_setup: Callable[[], object] | None = None
    ) -> None:
        self.settings = settings
        self.log_setup = log_setup
        self._proc: BaseProcess | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.settings.socket_path)
        self._proc = ctx.Process(
            target=_worker_main,
            args=(self.settings.encode(), self.log_setup),
            name="microtune-worker",
            daemon=True,
        )
        self._proc.start()

    def wait_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.settings.socket_path):
            if not self.is_alive():
                raise WorkerStartFailed(
                    f"the runtime worker exited with code {self.exitcode} during start-up"
                    + (" (see its error above)" if self.exitcode == WORKER_CANNOT_START else "")
                )
            if time.monotonic() > deadline:
                raise WorkerStartFailed(
                    f"the runtime worker did not listen within {timeout} s "
                    "(--worker-start-timeout-s)"
                )
            time.sleep(0.01)

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    @property
    def exitcode(self) -> int | None:
        return self._proc.exitcode if self._proc else None

    def exit_code(self, within_s: float) -> int | None:
        """The exit code of a worker that is ending, waiting up to `within_s` for it (its
        socket closes before the kernel has reaped it: `exitcode` is still None then)."""
        if self._proc is None:
            return None
        self._proc.join(within_s)
        return self._proc.exitcode

    def kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()

    def stop(self, timeout: float = 5.0) -> None:
        """End the worker: the front has drained, and nothing is left to answer. A kill, as
        SIGTERM was (the worker has no handler to run; it ignores SIGTERM: `_worker_main`)."""
        if self._proc is None:
            return
        self._proc.kill()
        self._proc.join(timeout)
