"""Exponential backoff with full jitter, for reconnecting feeds and retried sends."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``attempt`` (0-based): up to ``initial * multiplier**attempt`` seconds, at most
    ``maximum``. With ``jitter`` (the default) the delay is drawn uniformly below that bound, so that many clients
    cut off by the same broker restart do not come back in step."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: bool = True
    random: Callable[[], float] = field(default=random.random, repr=False, compare=False)

    def delay(self, attempt: int) -> float:
        bound = min(self.maximum, self.initial * self.multiplier**attempt)
        return bound * self.random() if self.jitter else bound
