"""When to restart a process that died, and when to stop trying: a pure decision.

The supervisor restarts its worker and fronts, and a lone front its worker. Restarting at once
and for ever turns a process that cannot start (a corrupt model that kills the worker at load,
a CUDA device gone bad) into a loop that spawns a process twice a second, logs without end,
and leaves the pod running, alive to Kubernetes, and useless. So each death waits longer than
the last (exponential backoff), deaths older than the window are forgiven (a process that ran
for a while starts again fast), and too many deaths within the window make the server give up
and exit non-zero: Kubernetes (or systemd, or Docker's restart policy) then restarts the whole
container with its own backoff and shows the pod as crash-looping.

Same shape as Ray Serve's autoscaling policy: immutable state in, decision and new state out,
the clock passed in (tests/test_restarts.py drives it with plain numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["EXIT_GAVE_UP", "Decision", "RestartHistory", "RestartPolicy", "after_death"]

# The exit code of a server that gave up (sysexits' EX_SOFTWARE).
EXIT_GAVE_UP = 70


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    """The wait after a second death within the window (after a first one the restart is
    immediate: a one-off crash should cost as little availability as possible)."""
    max_delay_s: float = 30.0
    """The longest wait: the delay doubles with each further death within the window."""
    limit: int = 8
    """This many deaths within the window and the server gives up; 0 = never gives up."""
    window_s: float = 600.0
    """How long a death counts."""


@dataclass(frozen=True, slots=True)
class RestartHistory:
    """The instants (any monotonic clock) of the deaths still within the window."""

    deaths: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class Decision:
    give_up: bool
    delay_s: float
    """Wait this long, then restart (0 when giving up)."""
    recent: int
    """Deaths within the window, this one included."""


def after_death(
    policy: RestartPolicy, history: RestartHistory, now: float
) -> tuple[RestartHistory, Decision]:
    """A process died at `now`: the history that includes it, and what to do."""
    recent = (*(t for t in history.deaths if now - t < policy.window_s), now)
    if policy.limit and len(recent) >= policy.limit:
        return RestartHistory(recent), Decision(True, 0.0, len(recent))
    n = len(recent)
    delay = 0.0 if n == 1 else min(policy.max_delay_s, policy.first_delay_s * 2.0 ** min(n - 2, 64))
    return RestartHistory(recent), Decision(False, delay, len(recent))
