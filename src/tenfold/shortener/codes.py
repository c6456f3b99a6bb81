"""Short codes: a counter, a keyed permutation of the code space, and base62.

Every code is `length` base62 characters (7 by default: 62**7, about 3.5 trillion codes per
domain). A process reserves counter values in blocks (one SQL round trip per block, none per
link); each value goes through a keyed Feistel permutation of [0, 62**length), so two values
never give the same code (no collision check) and consecutive values give unrelated codes (no
guessing the next link from the last). The permutation is a balanced Feistel network over the
smallest even number of bits that holds the space, with cycle walking: a value that lands
outside the space is permuted again until it lands inside, which keeps it a bijection.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Awaitable, Callable

ALPHABET = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BASE = len(ALPHABET)
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
MIN_LENGTH = 5
MAX_LENGTH = 10
DEFAULT_LENGTH = 7
ROUNDS = 4
DEFAULT_BLOCK = 1_000


class CodeSpaceExhausted(Exception):
    """Every code of this length has been handed out; configure a longer code length."""


def encode(value: int, length: int) -> str:
    """`value` in base62, left-padded to `length` characters."""
    chars = []
    for _ in range(length):
        value, digit = divmod(value, BASE)
        chars.append(ALPHABET[digit])
    if value:
        raise ValueError(f"{value} does not fit in {length} base62 characters")
    return "".join(reversed(chars))


def decode(code: str) -> int:
    value = 0
    for char in code:
        value = value * BASE + _INDEX[char]
    return value


def is_code(text: str) -> bool:
    return all(c in _INDEX for c in text)


class Permutation:
    """A keyed bijection of [0, size)."""

    def __init__(self, key: bytes, size: int) -> None:
        if size < 2:
            raise ValueError("the code space needs at least two values")
        self.size = size
        bits = max(2, (size - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self._round_keys = [
            hmac.new(key, b"feistel-round-%d" % i, hashlib.sha256).digest()[:16]
            for i in range(ROUNDS)
        ]

    def _f(self, index: int, value: int) -> int:
        digest = hashlib.blake2b(
            value.to_bytes(8, "big"), key=self._round_keys[index], digest_size=8
        ).digest()
        return int.from_bytes(digest, "big") & self.mask

    def _once(self, value: int) -> int:
        left, right = value >> self.half, value & self.mask
        for i in range(ROUNDS):
            left, right = right, left ^ self._f(i, right)
        return (left << self.half) | right

    def _once_inverse(self, value: int) -> int:
        left, right = value >> self.half, value & self.mask
        for i in reversed(range(ROUNDS)):
            left, right = right ^ self._f(i, left), left
        return (left << self.half) | right

    def forward(self, value: int) -> int:
        if not 0 <= value < self.size:
            raise ValueError(f"{value} is outside [0, {self.size})")
        value = self._once(value)
        while value >= self.size:  # cycle walking: stays a bijection of [0, size)
            value = self._once(value)
        return value

    def inverse(self, value: int) -> int:
        if not 0 <= value < self.size:
            raise ValueError(f"{value} is outside [0, {self.size})")
        value = self._once_inverse(value)
        while value >= self.size:
            value = self._once_inverse(value)
        return value


def domain_key(master: bytes, domain: str) -> bytes:
    """The permutation key of one domain's code space (each domain has its own sequence)."""
    return hmac.new(master, b"tenfold.shortener.codes|" + domain.encode(), hashlib.sha256).digest()


Reserve = Callable[[str, int], Awaitable[int]]
"""reserve(domain, n) -> the first of n counter values now owned by the caller."""


class CodeGenerator:
    """Hands out fresh codes for one process, reserving counter blocks as it goes."""

    def __init__(
        self, master: bytes, reserve: Reserve, *, length: int = DEFAULT_LENGTH, block: int = 0
    ) -> None:
        if not MIN_LENGTH <= length <= MAX_LENGTH:
            raise ValueError(f"code length must be {MIN_LENGTH}..{MAX_LENGTH}, got {length}")
        self.master = master
        self.reserve = reserve
        self.length = length
        self.size = BASE**length
        self.block = block or DEFAULT_BLOCK
        self._permutations: dict[str, Permutation] = {}
        self._blocks: dict[str, tuple[int, int]] = {}  # domain -> (next value, end)

    def permutation(self, domain: str) -> Permutation:
        found = self._permutations.get(domain)
        if found is None:
            found = self._permutations[domain] = Permutation(
                domain_key(self.master, domain), self.size
            )
        return found

    def code_of(self, domain: str, value: int) -> str:
        return encode(self.permutation(domain).forward(value), self.length)

    async def take(self, domain: str, count: int = 1) -> list[str]:
        """`count` fresh codes of `domain`'s space."""
        codes: list[str] = []
        while len(codes) < count:
            start, end = self._blocks.get(domain, (0, 0))
            if start >= end:
                want = max(self.block, count - len(codes))
                start = await self.reserve(domain, want)
                end = start + want
                if start >= self.size:
                    raise CodeSpaceExhausted()
                end = min(end, self.size)
            n = min(end - start, count - len(codes))
            codes.extend(self.code_of(domain, v) for v in range(start, start + n))
            self._blocks[domain] = (start + n, end)
        return codes
