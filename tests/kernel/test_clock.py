"""Timestamp text: the hot paths' formatter writes what orjson writes for the datetime."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson
from hypothesis import given
from hypothesis import strategies as st

from tenfold.kernel.clock import rfc3339_ms

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _orjson_text(moment: datetime) -> str:
    return str(orjson.loads(orjson.dumps(moment, option=orjson.OPT_UTC_Z)))


@given(st.integers(min_value=0, max_value=253_402_300_799_999))  # up to 9999-12-31
def test_the_same_text_as_orjson_gives_the_exact_datetime(ms: int) -> None:
    assert rfc3339_ms(ms) == _orjson_text(EPOCH + timedelta(milliseconds=ms))


@given(st.integers(min_value=0, max_value=4_102_444_800_000))  # up to 2100
def test_the_same_text_as_the_datetime_of_a_float_in_this_era(ms: int) -> None:
    # What the services answered before: exact while seconds-as-float keep microseconds.
    assert rfc3339_ms(ms) == _orjson_text(datetime.fromtimestamp(ms / 1000, UTC))


def test_whole_seconds_and_the_epoch() -> None:
    assert rfc3339_ms(0) == "1970-01-01T00:00:00Z"
    assert rfc3339_ms(1_764_318_148_000) == "2025-11-28T08:22:28Z"
    assert rfc3339_ms(1_764_318_148_007) == "2025-11-28T08:22:28.007000Z"
    assert rfc3339_ms(253_402_300_799_999) == "9999-12-31T23:59:59.999000Z"
