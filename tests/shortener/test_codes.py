"""Short codes: base62, the keyed permutation, block reservation."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.shortener.codes import (
    ALPHABET,
    CodeGenerator,
    CodeSpaceExhausted,
    Permutation,
    decode,
    domain_key,
    encode,
)

KEY = b"k" * 32


@given(st.integers(min_value=0, max_value=62**7 - 1))
def test_base62_round_trips_at_fixed_width(value: int) -> None:
    code = encode(value, 7)
    assert len(code) == 7 and all(c in ALPHABET for c in code)
    assert decode(code) == value


def test_encode_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError):
        encode(62**5, 5)


@pytest.mark.parametrize("size", [2, 3, 62, 1000, 4096, 62**2 * 7])
def test_the_permutation_is_a_bijection(size: int) -> None:
    perm = Permutation(KEY, size)
    image = [perm.forward(v) for v in range(size)]
    assert sorted(image) == list(range(size))
    assert all(perm.inverse(perm.forward(v)) == v for v in range(size))


@given(st.integers(min_value=0, max_value=62**7 - 1))
def test_the_full_space_inverts(value: int) -> None:
    perm = Permutation(KEY, 62**7)
    assert perm.inverse(perm.forward(value)) == value


def test_keys_and_domains_give_different_sequences() -> None:
    size = 62**7
    a = [Permutation(domain_key(KEY, ""), size).forward(v) for v in range(50)]
    b = [Permutation(domain_key(KEY, "brand.example"), size).forward(v) for v in range(50)]
    c = [Permutation(domain_key(b"x" * 32, ""), size).forward(v) for v in range(50)]
    assert a != b and a != c
    # Consecutive counters do not give neighbouring codes.
    assert sum(1 for x, y in pairwise(a) if abs(x - y) < 1000) == 0


async def test_blocks_are_reserved_once_per_block() -> None:
    calls: list[tuple[str, int]] = []
    counter = {"": 0}

    async def reserve(domain: str, n: int) -> int:
        calls.append((domain, n))
        start = counter.setdefault(domain, 0)
        counter[domain] = start + n
        return start

    gen = CodeGenerator(KEY, reserve, length=7, block=100)
    codes = [c for _ in range(250) for c in await gen.take("", 1)]
    assert len(set(codes)) == 250
    assert calls == [("", 100)] * 3
    many = await gen.take("", 500)  # a bigger request than a block reserves what it needs
    assert len(set(many) | set(codes)) == 750


async def test_an_exhausted_space_says_so() -> None:
    async def reserve(domain: str, n: int) -> int:
        return 62**5

    gen = CodeGenerator(KEY, reserve, length=5)
    with pytest.raises(CodeSpaceExhausted):
        await gen.take("")
