"""A circuit breaker guarding the Redis connection.

closed -> (N failures in a row) -> open -> (reset_s elapsed) -> half_open -> one trial call:
success closes it, failure opens it again. While it is open nothing is sent to Redis: limits use
per-process counters and the response cache is bypassed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]
# numeric encoding for a gauge (monitoring reads `state_value`)
STATE_VALUES: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


class CircuitBreaker:
    """Counts consecutive failures; not thread-safe (one event loop owns it)."""

    def __init__(
        self, failure_threshold: int, reset_s: float, name: str = "redis", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failure_threshold = failure_threshold
        self.reset_s = reset_s
        self.name = name
        self._clock = clock
        self._state: BreakerState = "closed"
        self._num_failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.num_opened_total = 0
        self._listeners: list[Callable[[BreakerState, BreakerState], None]] = []

    # --- observation -------------------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker whose reset time has passed reads as half_open."""
        if self._state == "open" and self._clock() - self._opened_at >= self.reset_s:
            return "half_open"
        return self._state

    @property
    def state_value(self) -> int:
        return STATE_VALUES[self.state]

    def add_listener(self, listener: Callable[[BreakerState, BreakerState], None]) -> None:
        """Call `listener(old, new)` on every transition (the metrics hook)."""
        self._listeners.append(listener)

    # --- protocol ----------------------------------------------------------------------------------
    def can_call(self) -> bool:
        """True when a call may go to Redis now; in half_open only one trial call at a time."""
        state = self.state
        if state == "closed":
            return True
        if state == "open":
            return False
        if self._state == "open":
            self._transition("half_open")
        if self._trial_in_flight:
            return False
        self._trial_in_flight = True
        return True

    def release_trial(self) -> None:
        """Give back a half-open trial slot whose call was cancelled (no verdict on Redis)."""
        self._trial_in_flight = False

    def record_success(self) -> None:
        self._trial_in_flight = False
        self._num_failures = 0
        if self._state != "closed":
            self._transition("closed")

    def record_failure(self, reason: str = "") -> None:
        self._trial_in_flight = False
        self._num_failures += 1
        tripped = self._state == "closed" and self._num_failures >= self.failure_threshold
        if self._state == "half_open" or tripped:
            self._opened_at = self._clock()
            self.num_opened_total += 1
            self._transition("open", reason)

    def _transition(self, new: BreakerState, reason: str = "") -> None:
        old, self._state = self._state, new
        if old == new:
            return
        if new == "open":
            logger.warning(
                "%s circuit breaker open (%s): rate limits fall back to per-process counters, "
                "response cache bypassed; next trial in %.1fs",
                self.name,
                reason or "failures",
                self.reset_s,
            )
        elif new == "closed":
            logger.warning("%s circuit breaker closed: %s is back", self.name, self.name)
        else:
            logger.info("%s circuit breaker half-open: trying one call", self.name)
        for listener in self._listeners:
            try:
                listener(old, new)
            except Exception:  # a broken metrics hook must not break requests
                logger.exception("circuit breaker listener failed")
