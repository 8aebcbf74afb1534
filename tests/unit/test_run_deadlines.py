"""runtime.engine.run_deadlines.RunWatch: the runs still going at their deadline are told to
terminate, those done first are not, whatever order the deadlines come in; finished runs do not
pile up behind one far deadline."""

from __future__ import annotations

import time

from runtime.engine.run_deadlines import RunWatch


def test_only_runs_still_going_at_their_deadline_are_terminated() -> None:
    watch = RunWatch()
    now = time.monotonic_ns()
    far_key, far = watch.start(now + 60 * 10**9)  # the watcher sleeps toward this one first
    late_key, late = watch.start(now + 50 * 10**6)  # an earlier one wakes it
    done_key, done = watch.start(now + 50 * 10**6)
    watch.done(done_key)
    deadline = time.monotonic() + 5
    while not late.terminate and time.monotonic() < deadline:
        time.sleep(0.01)
    assert late.terminate
    assert not done.terminate and not far.terminate
    watch.done(far_key)
    watch.done(late_key)


def test_finished_runs_do_not_pile_up_behind_a_far_deadline() -> None:
    watch = RunWatch()
    now = time.monotonic_ns()
    watch.start(now + 3600 * 10**9)
    for _ in range(10_000):
        key, _options = watch.start(now + 1800 * 10**9)
        watch.done(key)
    assert len(watch._heap) < 200
