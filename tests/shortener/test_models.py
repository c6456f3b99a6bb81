"""Target URLs, aliases, the blocklist and link passwords, without I/O."""

from __future__ import annotations

import pytest

from tenfold.shortener.models import (
    MAX_URL,
    Blocklist,
    LinkError,
    check_password,
    hash_password,
    is_own_host,
    normalise_url,
    validate_alias,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("HTTP://Example.COM", "http://example.com/"),
        ("https://example.com:443/a", "https://example.com/a"),
        ("http://example.com:8080/a", "http://example.com:8080/a"),
        ("https://example.com/a b", "https://example.com/a%20b"),
        ("https://bücher.example/x", "https://xn--bcher-kva.example/x"),
        ("https://example.com/p?q=1&r=ü#frag", "https://example.com/p?q=1&r=%C3%BC#frag"),
        ("  https://example.com/  ", "https://example.com/"),
        ("https://[2001:db8::1]:8443/x", "https://[2001:db8::1]:8443/x"),
    ],
)
def test_urls_are_normalised(raw: str, expected: str) -> None:
    assert normalise_url(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("ftp://example.com", "scheme-not-allowed"),
        ("data:text/html,hi", "scheme-not-allowed"),
        ("https://", "no-host"),
        ("https://exa mple.com/", "invalid-host"),
        ("https://a:b@example.com", "credentials"),
        ("https://example.com/\x00", "invalid-characters"),
        ("https://example.com:99999/", "malformed"),
        ("https://example.com/" + "x" * MAX_URL, "too-long"),
    ],
)
def test_bad_urls_say_why(raw: str, reason: str) -> None:
    with pytest.raises(LinkError) as info:
        normalise_url(raw)
    assert info.value.reason == reason and info.value.field == "url"


def test_aliases() -> None:
    assert validate_alias("Abc-1_2") == "Abc-1_2"
    for bad in ("ab", "x" * 21, "a/b", "a.b", "Admin", "API"):
        with pytest.raises(LinkError):
            validate_alias(bad)


def test_blocklist_domains_cover_subdomains_and_patterns_match_urls() -> None:
    blocklist = Blocklist.of(["Evil.example", "*.zip/*", "https://*/login?*"])
    assert blocklist.match("https://evil.example/x") == "domain evil.example"
    assert blocklist.match("https://a.b.evil.example/") == "domain evil.example"
    assert blocklist.match("https://notevil.example/") is None
    assert blocklist.match("https://files.zip/a") == "pattern *.zip/*"
    assert blocklist.match("https://bank.example/login?x=1") is not None
    assert blocklist.match("https://bank.example/login") is None


def test_own_hosts_are_loops() -> None:
    assert is_own_host("https://sho.rt/abc", frozenset({"sho.rt"}))
    assert not is_own_host("https://example.com/", frozenset({"sho.rt"}))


def test_passwords_are_hashed_and_checked_in_constant_time() -> None:
    stored = hash_password("hunter2")
    assert "hunter2" not in stored and stored.startswith("scrypt$")
    assert check_password("hunter2", stored)
    assert not check_password("hunter3", stored)
    assert not check_password("hunter2", "garbage")
