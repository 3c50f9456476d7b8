"""server/ratelimit.py: per-key token buckets, driven with explicit clocks."""

from __future__ import annotations

import pytest

from server.ratelimit import RateLimiter

T0 = 1000.0


def drain(limiter: RateLimiter, key: str, now: float) -> int:
    """Take the whole burst; return the wait of the first refused take."""
    for _ in range(limiter.burst):
        assert limiter.take(key, now) == 0
    return limiter.take(key, now)


@pytest.mark.parametrize(("rate", "burst"), [(10.0, 5), (100.0, 200), (0.5, 1), (3.0, 2)])
def test_burst_is_allowed_then_refused(rate: float, burst: int) -> None:
    limiter = RateLimiter(rate=rate, burst=burst)
    wait = drain(limiter, "alice", T0)
    assert wait > 0
    # One token refills in 1/rate seconds.
    assert wait == pytest.approx(1000 / rate, abs=1)


def test_refused_takes_keep_being_refused_and_report_what_is_left() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    assert drain(limiter, "k", T0) == 100
    assert limiter.take("k", T0 + 0.04) == pytest.approx(60, abs=1)
    assert limiter.take("k", T0 + 0.09) == pytest.approx(10, abs=1)


def test_refills_at_rate() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    drain(limiter, "k", T0)
    # 0.25 s at 10/s: two tokens, not three.
    now = T0 + 0.25
    assert limiter.take("k", now) == 0
    assert limiter.take("k", now) == 0
    assert limiter.take("k", now) > 0


def test_refill_is_capped_at_burst() -> None:
    limiter = RateLimiter(rate=10.0, burst=4)
    drain(limiter, "k", T0)
    assert drain(limiter, "k", T0 + 3600) > 0  # drain asserts exactly `burst` were allowed


def test_waiting_the_reported_time_is_nearly_enough() -> None:
    limiter = RateLimiter(rate=4.0, burst=1)
    wait = drain(limiter, "k", 0.0)
    assert wait == 250
    assert limiter.take("k", 0.249) > 0
    assert limiter.take("k", 0.251) == 0


def test_waiting_exactly_retry_after_ms_is_enough() -> None:
    limiter = RateLimiter(rate=100.0, burst=1)
    wait = drain(limiter, "k", 0.1)
    assert wait == 10
    assert limiter.take("k", 0.1 + wait / 1000) == 0


def test_keys_are_independent() -> None:
    limiter = RateLimiter(rate=1.0, burst=2)
    assert drain(limiter, "alice", T0) > 0
    assert drain(limiter, "bob", T0) > 0
    assert limiter.take("carol", T0) == 0
    assert limiter.take("alice", T0) > 0


def test_sweep_drops_only_refilled_buckets() -> None:
    limiter = RateLimiter(rate=10.0, burst=5)
    drain(limiter, "empty", T0)  # needs 0.5 s to refill
    limiter.take("one-taken", T0)  # needs 0.1 s
    limiter.take("later", T0 + 0.3)  # needs 0.1 s from 0.3
    limiter.sweep(T0 + 0.2)
    assert set(limiter._buckets) == {"empty", "later"}
    # The kept, still-empty bucket still limits.
    assert limiter.take("empty", T0 + 0.2) == 0
    assert limiter.take("empty", T0 + 0.2) == 0
    assert limiter.take("empty", T0 + 0.2) > 0
    limiter.sweep(T0 + 100)
    assert limiter._buckets == {}


def test_sweep_after_forgetting_a_key_grants_a_fresh_burst() -> None:
    limiter = RateLimiter(rate=10.0, burst=3)
    drain(limiter, "k", T0)
    limiter.sweep(T0 + 1)
    assert drain(limiter, "k", T0 + 1) > 0


def test_memory_is_bounded_by_max_keys() -> None:
    limiter = RateLimiter(rate=1.0, burst=2, max_keys=3)
    for key in ("a", "b", "c", "d", "e"):
        assert limiter.take(key, T0) == 0
    assert len(limiter._buckets) <= 3
