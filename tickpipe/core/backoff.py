"""Exponential backoff with full jitter, for retrying an unavailable Redis or Postgres."""

from __future__ import annotations

import random


class Backoff:
    """Delays of ``base * 2**n`` seconds capped at ``cap``, each drawn uniformly below it."""

    def __init__(self, base_s: float = 0.1, cap_s: float = 10.0) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.attempt = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap_s, self.base_s * 2**self.attempt)
        self.attempt += 1
        # Never zero: a retry loop must always yield some time.
        return max(self.base_s / 10, random.uniform(0, ceiling))

    def reset(self) -> None:
        self.attempt = 0
