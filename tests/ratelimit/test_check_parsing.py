"""The check body's quick reading agrees with the field-by-field one on every body."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tenfold.kernel.http import InvalidField
from tenfold.ratelimit.api import _check_fields, _parse_check

_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-2, max_value=3),
    st.text(max_size=3),
    st.text(min_size=60, max_size=70),
    st.text(min_size=250, max_size=260),
    st.lists(st.integers(), max_size=1),
)
_bodies = st.dictionaries(
    st.sampled_from(
        ["client_id", "api_key", "resource", "ip", "region", "weight", "async", "extra"]
    ),
    _values,
)


def _outcome(parse: Any, body: dict[str, Any]) -> Any:
    try:
        return parse(body)
    except InvalidField as exc:
        return ("refused", exc.detail)


@given(_bodies)
def test_the_quick_reading_agrees_with_the_full_one(body: dict[str, Any]) -> None:
    assert _outcome(_parse_check, body) == _outcome(_check_fields, body)


def test_a_usual_body() -> None:
    body = {"client_id": "c1", "api_key": "k1", "resource": "/x", "weight": 2, "async": True}
    assert _parse_check(body) == ("c1", "k1", "/x", "", "", 2, True)
