"""The retry policy is data in the configuration; the forwarder's module does its arithmetic."""

from datetime import UTC, datetime, timedelta

from dicom_node.config import RetryPolicy
from dicom_node.forward.retry import next_attempt_at


def test_retry_policy_grows_geometrically_and_gives_up_after_max_age():
    policy = RetryPolicy(initial_s=10, multiplier=3, jitter=0, max_delay_s=100, max_age_h=1)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    delays = [(next_attempt_at(policy, n, start, start) - start).total_seconds() for n in (1, 2, 3, 4)]
    assert delays == [10, 30, 90, 100]
    assert next_attempt_at(policy, 1, start, start + timedelta(minutes=59, seconds=55)) is None
    jittery = RetryPolicy(initial_s=100, jitter=0.2)
    spread = {(next_attempt_at(jittery, 1, start, start) - start).total_seconds() for _ in range(50)}
    assert len(spread) > 1 and all(80 <= d <= 120 for d in spread)
