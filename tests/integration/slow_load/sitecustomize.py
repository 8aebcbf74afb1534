"""Test-only fault injection (tests/integration/test_stop_during_start.py): put this directory
on PYTHONPATH, and the runtime worker (spawn passes the environment on) takes
SLOW_LOAD_TEST_S seconds to load any model named "slow" (only the versions listed in
SLOW_LOAD_TEST_VERSIONS, "1,3", when set), as a large model or its CUDA graph captures would.
Nothing else changes; other processes import nothing of it."""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from typing import Any


class _SlowLoads(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "runtime.worker":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.loader is not None
        exec_module = spec.loader.exec_module

        def patched(module: Any) -> None:
            exec_module(module)
            load = module.Worker.load

            versions = os.environ.get("SLOW_LOAD_TEST_VERSIONS", "")

            def slow_load(self: Any, msg: Any, holder: Any = None) -> Any:
                if msg.name == "slow" and (not versions or str(msg.version) in versions.split(",")):
                    time.sleep(float(os.environ.get("SLOW_LOAD_TEST_S", "30")))
                return load(self, msg, holder)

            module.Worker.load = slow_load

        spec.loader.exec_module = patched  # type: ignore[method-assign]
        return spec


sys.meta_path.insert(0, _SlowLoads())
