"""server.restarts: the pure decision of when to restart a dead process and when to give up."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from server.restarts import RestartHistory, RestartPolicy, after_death

POLICY = RestartPolicy(first_delay_s=0.5, max_delay_s=4.0, limit=5, window_s=60.0)


def deaths_at(policy: RestartPolicy, *instants: float) -> list[tuple[bool, float, int]]:
    history, out = RestartHistory(), []
    for t in instants:
        history, d = after_death(policy, history, t)
        out.append((d.give_up, d.delay_s, d.recent))
    return out


def test_first_death_restarts_at_once_then_the_wait_doubles_up_to_its_cap() -> None:
    got = deaths_at(RestartPolicy(first_delay_s=0.5, max_delay_s=1.5, limit=0), 0, 1, 2, 3, 4)
    assert [delay for _, delay, _ in got] == [0.0, 0.5, 1.0, 1.5, 1.5]


def test_the_limit_th_death_within_the_window_gives_up() -> None:
    got = deaths_at(POLICY, 0, 1, 2, 3, 4)
    assert [give_up for give_up, _, _ in got] == [False, False, False, False, True]
    assert got[-1] == (True, 0.0, 5)


def test_deaths_older_than_the_window_are_forgiven() -> None:
    # Four quick deaths, then a long run: the next death restarts at once, as a first one.
    got = deaths_at(POLICY, 0, 1, 2, 3, 100)
    assert got[-1] == (False, 0.0, 1)
    # Two of them still within the window: the third death's wait.
    got = deaths_at(POLICY, 0, 1, 2, 3, 61.5)
    assert got[-1] == (False, 1.0, 3)


def test_limit_zero_never_gives_up() -> None:
    got = deaths_at(RestartPolicy(limit=0, max_delay_s=2.0), *range(2000))
    assert not any(give_up for give_up, _, _ in got)
    assert got[-1][1] == 2.0


@given(st.lists(st.floats(0, 1e4, allow_nan=False), max_size=40).map(sorted))
def test_decisions_follow_the_deaths_within_the_window(instants: list[float]) -> None:
    history = RestartHistory()
    for i, t in enumerate(instants):
        history, d = after_death(POLICY, history, t)
        within = sum(1 for u in instants[: i + 1] if t - u < POLICY.window_s)
        assert d.recent == within == len(history.deaths)
        assert d.give_up == (within >= POLICY.limit)
        assert 0.0 <= d.delay_s <= POLICY.max_delay_s
        if not d.give_up:
            assert (d.delay_s == 0.0) == (within == 1)
