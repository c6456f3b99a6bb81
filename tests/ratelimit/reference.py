"""Obviously-correct reference models of each algorithm (fractions, brute force)."""

from __future__ import annotations

from fractions import Fraction
from math import ceil


class RefBucket:
    """Continuous token bucket over exact fractions."""

    def __init__(self, rate: int, window_ms: int, burst: int) -> None:
        self.rate, self.w, self.cap = rate, window_ms, burst
        self.tokens = Fraction(burst)
        self.last: int | None = None

    def hit(self, now: int, weight: int) -> tuple[bool, int, int]:
        if self.last is not None and now > self.last:
            self.tokens = min(
                Fraction(self.cap), self.tokens + Fraction((now - self.last) * self.rate, self.w)
            )
        self.last = now if self.last is None else max(self.last, now)
        if self.tokens >= weight:
            self.tokens -= weight
            return True, int(self.tokens), 0
        return False, int(self.tokens), ceil((weight - self.tokens) * self.w / self.rate)


class RefFixed:
    def __init__(self, rate: int, window_ms: int) -> None:
        self.rate, self.w = rate, window_ms
        self.counts: dict[int, int] = {}

    def hit(self, now: int, weight: int) -> tuple[bool, int, int]:
        wid = now // self.w
        count = self.counts.get(wid, 0)
        if count + weight <= self.rate:
            self.counts[wid] = count + weight
            return True, self.rate - count - weight, 0
        return False, self.rate - count, (wid + 1) * self.w - now


class RefLog:
    def __init__(self, rate: int, window_ms: int) -> None:
        self.rate, self.w = rate, window_ms
        self.entries: list[tuple[int, int]] = []

    def used(self, at: int) -> int:
        return sum(w for ts, w in self.entries if ts > at - self.w)

    def hit(self, now: int, weight: int) -> tuple[bool, int, int]:
        used = self.used(now)
        if used + weight <= self.rate:
            self.entries.append((now, weight))
            return True, self.rate - used - weight, 0
        retry = min(
            ts + self.w - now
            for ts, _ in self.entries
            if ts + self.w > now and self.used(ts + self.w) + weight <= self.rate
        )
        return False, self.rate - used, retry


class RefCounter:
    """Cloudflare's estimate, evaluated with fractions; retry by brute-force search."""

    def __init__(self, rate: int, window_ms: int) -> None:
        self.rate, self.w = rate, window_ms
        self.counts: dict[int, int] = {}

    def estimate(self, at: int) -> Fraction:
        wid = at // self.w
        prev, cur = self.counts.get(wid - 1, 0), self.counts.get(wid, 0)
        return Fraction(prev * (self.w - (at - wid * self.w)), self.w) + cur

    def hit(self, now: int, weight: int) -> tuple[bool, int, int]:
        est = self.estimate(now)
        if est + weight <= self.rate:
            wid = now // self.w
            self.counts[wid] = self.counts.get(wid, 0) + weight
            return True, int(self.rate - est - weight), 0
        t = now + 1
        while self.estimate(t) + weight > self.rate:
            t += 1
        return False, int(self.rate - est), t - now
