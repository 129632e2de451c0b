"""How fast a run sends: the campaign's rate as one budget for the whole run, and the backoff
between attempts at one batch."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from mailroom.delivery.outbox import Outbox


class RateLimiter:
    """A token bucket over requests and recipients per second (``None`` = unlimited)."""

    def __init__(
        self,
        requests_per_second: float | None,
        recipients_per_second: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.rates = (requests_per_second, recipients_per_second)
        self._clock, self._sleep = clock, sleep
        self._next = [clock(), clock()]
        self._lock = threading.Lock()

    def acquire(self, recipients: int) -> None:
        with self._lock:
            now = self._clock()
            wait = 0.0
            for i, (rate, cost) in enumerate(zip(self.rates, (1, recipients), strict=True)):
                if rate is None:
                    continue
                start = max(now, self._next[i])
                self._next[i] = start + cost / rate
                wait = max(wait, start - now)
        if wait > 0:
            self._sleep(wait)


class SharedRateLimiter:
    """The campaign's rate for the whole run, whatever the number of shards or workers.

    Every request takes the run's next slot from the outbox (one atomic update), so concurrent
    shards on different hosts together stay at or under the configured rate.
    """

    def __init__(
        self,
        outbox: Outbox,
        run_key: str,
        requests_per_second: float | None,
        recipients_per_second: float | None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.outbox, self.run_key = outbox, run_key
        self.rates = (requests_per_second, recipients_per_second)
        self._clock, self._sleep = clock, sleep

    def acquire(self, recipients: int) -> None:
        if not any(self.rates):
            return
        wait = self.outbox.reserve_send_slot(
            self.run_key, *self.rates, recipients=recipients, now=self._clock()
        )
        if wait > 0:
            self._sleep(wait)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_delay)
        backoff = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(backoff / 2, backoff)
