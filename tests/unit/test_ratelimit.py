"""Token buckets of the partner limits (PROTOCOL.md §2.5)."""

from __future__ import annotations

from itmolink.node.ratelimit import TokenBucket


def test_a_bucket_takes_all_it_is_asked_for_or_nothing() -> None:
    bucket = TokenBucket(rate=10, burst=5, now=100.0)
    assert bucket.take(100.0, 3)
    assert not bucket.take(100.0, 3)  # 2 left: none taken
    assert bucket.take(100.0, 2)
    assert not bucket.take(100.0)
    assert bucket.take(100.25)  # 0.25 s at 10 a second: two back
    assert not bucket.take(1_000.0, 6)  # never more than the burst


def test_a_clock_that_steps_back_refills_from_its_new_reading() -> None:
    bucket = TokenBucket(rate=1_000, burst=2_000, now=10_000.0)
    assert bucket.take(10_000.0, 2_000)
    assert not bucket.take(6_400.0)  # an hour back: nothing refilled by the step itself
    assert bucket.take(6_401.0, 1_000)  # one second later by the new clock: 1,000 back
