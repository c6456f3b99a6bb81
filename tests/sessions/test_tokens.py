"""Token formats, successor derivation and risk signals (pure functions)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tenfold.sessions import risk, tokens
from tenfold.sessions.models import RiskAction, RiskPolicy


def test_tokens_round_trip_and_carry_256_bits() -> None:
    sid, secret = tokens.new_session_id(), tokens.new_secret()
    assert tokens.parse_session_token(f"{sid}.{secret}") == (sid, secret)
    assert len(secret) == 43 and len(sid) == 22  # 256 and 128 bits, urlsafe base64
    refresh = tokens.RefreshToken(sid, 7, tokens.new_secret())
    assert tokens.parse_refresh_token(str(refresh)) == refresh


@given(st.text(max_size=200))
def test_parsers_accept_or_refuse_never_raise(text: str) -> None:
    parsed = tokens.parse_session_token(text)
    assert parsed is None or f"{parsed[0]}.{parsed[1]}" == text
    refresh = tokens.parse_refresh_token(text)
    assert refresh is None or str(refresh) == text


def test_successor_is_deterministic_per_token_and_key() -> None:
    token = tokens.RefreshToken(tokens.new_session_id(), 0, tokens.new_secret())
    key, other_key = b"k" * 32, b"o" * 32
    a, b = tokens.successor(token, key), tokens.successor(token, key)
    assert a == b and a.refresh.generation == 1
    assert tokens.successor(token, other_key) != a
    assert a.refresh.secret != a.session_secret
    third = tokens.walk_forward(token, key, 3)
    assert third == tokens.successor(tokens.successor(a.refresh, key).refresh, key).refresh


def test_networks_and_signals() -> None:
    assert risk.network("198.51.100.7") == "198.51.100.0/24"
    assert risk.network("::ffff:198.51.100.7") == "198.51.100.0/24"
    assert risk.network("2001:db8:1:2::5") == "2001:db8:1::/48"
    assert risk.network("not an ip") is None
    key = b"k" * 32
    home = risk.keyed(key, "network", "198.51.100.0/24")
    away = risk.keyed(key, "network", "203.0.113.0/24")
    found = risk.signals(
        stored_network=home,
        stored_fingerprint="",
        stored_country="DE",
        network_hash=away,
        fingerprint_hash=risk.keyed(key, "fingerprint", "x"),
        country="FR",
    )
    assert found == ("network_changed", "country_changed")  # no stored fingerprint: not compared
    policy = RiskPolicy()
    assert policy.action(found) is RiskAction.STEP_UP
    assert policy.action(("fingerprint_changed", "network_changed")) is RiskAction.REVOKE
    assert policy.action(()) is RiskAction.ALLOW
