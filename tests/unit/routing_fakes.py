"""What the router tests inject: a clock they move by hand, and a canary guard rule."""

from __future__ import annotations

GUARD = {"window_s": 5, "min_samples": 20, "max_error_rate_delta": 0.05}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
