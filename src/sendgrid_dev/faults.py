"""Failures the dev server can be told to inject, so a client's retry logic meets them on purpose.

Every "every N" fault counts over all mail-send requests the server has received (starting at 1),
so a test that sends a fixed sequence always sees the faults at the same positions.
"""

import math
import threading
import time
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from sendgrid_dev.errors import DevServerError

# Cycled through in order by the 5xx fault: the statuses a client meets from SendGrid itself
# (500) and from the load balancers in front of it (502, 503).
SERVER_ERROR_STATUSES = (500, 502, 503)
# The longest a request waits for others under ``hold_until_in_flight``.
HOLD_SECONDS = 10.0


@dataclass(frozen=True)
class Faults:
    """Which failures to inject; the zero value of every field means "off"."""

    status_429_every: int = 0
    status_5xx_every: int = 0
    delay_seconds: float = 0.0
    drop_after_accept_every: int = 0
    max_requests_per_second: float = 0.0
    retry_after_seconds: int = 1
    # Answer no mail-send request until this many are being answered at once (each waits at
    # most HOLD_SECONDS); once that many have been, none waits. Shows a client's concurrency
    # at the server, whatever the timing.
    hold_until_in_flight: int = 0

    def __post_init__(self) -> None:
        for field in fields(self):
            value: object = getattr(self, field.name)
            wanted: tuple[type, ...] = (int,) if field.type is int else (int, float)
            if isinstance(value, bool) or not isinstance(value, wanted):
                kind = "a whole number" if field.type is int else "a number"
                raise DevServerError(f"fault setting {field.name} must be {kind}, got {value!r}")
            assert isinstance(value, int | float)
            if value < 0 or not math.isfinite(value):
                raise DevServerError(f"fault setting {field.name} must be >= 0, got {value!r}")

    def with_changes(self, changes: object) -> "Faults":
        """A copy with the settings in a ``PUT /_dev/faults`` body applied; unknown names are an
        error so a typo cannot silently leave a fault off."""
        if not isinstance(changes, dict):
            raise DevServerError("fault settings must be a JSON object")
        known = {field.name for field in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise DevServerError(f"unknown fault settings: {', '.join(unknown)}")
        return Faults(**{**asdict(self), **changes})

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class InjectedFault(Enum):
    RATE_LIMITED = "rate_limited"
    STATUS_429 = "status_429"
    STATUS_5XX = "status_5xx"


def scheduled_fault(sequence: int, faults: Faults) -> InjectedFault | None:
    """The "every N" fault due for the ``sequence``-th mail-send request; 429 wins a tie."""
    if faults.status_429_every and sequence % faults.status_429_every == 0:
        return InjectedFault.STATUS_429
    if faults.status_5xx_every and sequence % faults.status_5xx_every == 0:
        return InjectedFault.STATUS_5XX
    return None


def drop_due(sequence: int, faults: Faults) -> bool:
    return bool(faults.drop_after_accept_every) and sequence % faults.drop_after_accept_every == 0


class RateCeiling:
    """A token bucket: bursts up to one second's worth, then ``rate`` requests per second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._capacity = max(1.0, rate)
        self._tokens = self._capacity
        self._updated = time.monotonic()
        self._lock = threading.Lock()

    def admit(self) -> int | None:
        """None if the request fits under the ceiling, else whole seconds until it would."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return None
            return max(1, math.ceil((1.0 - self._tokens) / self.rate))
