"""When to try a failed send (or a transiently failed restoration) again: the retry policy's arithmetic.

The policy itself is data (`[retry]` in the configuration, as dcm4chee keeps it); this module
turns it into the next attempt's time.
"""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from dicom_node.config import RetryPolicy


def next_attempt_at(policy: RetryPolicy, attempt: int, first_seen: datetime, now: datetime) -> datetime | None:
    """When to try again after failed attempt number `attempt` (1, 2, …); None: give up.

    The delay grows geometrically up to max_delay_s, spread by ±jitter so that a PACS coming
    back is not hit by every waiting image at once; past max_age_h the failure is final.
    """
    delay = min(policy.initial_s * policy.multiplier ** max(attempt - 1, 0), policy.max_delay_s)
    delay *= 1 + policy.jitter * random.uniform(-1, 1)
    when = now + timedelta(seconds=delay)
    if when - first_seen > timedelta(hours=policy.max_age_h):
        return None
    return when
