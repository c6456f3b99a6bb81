from __future__ import annotations

import json
import math
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenfold.flags.stats import (
    VariationCounts,
    chi_square_sf,
    compare,
    probability_to_beat_control,
    results,
    sample_ratio_mismatch,
    wilson_interval,
)

Z95 = 1.959963984540054


def counts(variation: str, exposures: int, conversions: int) -> VariationCounts:
    return VariationCounts(variation=variation, exposures=exposures, conversions=conversions)


def monte_carlo(
    control: VariationCounts, treatment: VariationCounts, draws: int = 200_000
) -> float:
    rng = random.Random(20240611)
    a_c, b_c = 1 + control.conversions, 1 + control.exposures - control.conversions
    a_t, b_t = 1 + treatment.conversions, 1 + treatment.exposures - treatment.conversions
    wins = sum(rng.betavariate(a_t, b_t) > rng.betavariate(a_c, b_c) for _ in range(draws))
    return wins / draws


def test_z_test_matches_the_pooled_formula_and_published_value() -> None:
    result = compare(counts("a", 1000, 200), counts("b", 1000, 250))
    pooled = 450 / 2000
    z = 0.05 / math.sqrt(pooled * (1 - pooled) * (2 / 1000))
    assert result.z_score == pytest.approx(z, rel=1e-12)
    assert result.z_score == pytest.approx(2.677, abs=1e-3)
    assert result.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), rel=1e-9)
    assert result.p_value == pytest.approx(0.0074, abs=1e-4)
    assert result.significant
    assert not compare(counts("a", 1000, 200), counts("b", 1000, 250), confidence=0.999).significant


def test_lifts_and_wald_interval() -> None:
    result = compare(counts("a", 1000, 200), counts("b", 1000, 250))
    assert result.control_rate == 0.2
    assert result.treatment_rate == 0.25
    assert result.absolute_lift == pytest.approx(0.05)
    assert result.relative_lift == pytest.approx(0.25)
    se = math.sqrt(0.2 * 0.8 / 1000 + 0.25 * 0.75 / 1000)
    assert result.absolute_lift_interval is not None
    low, high = result.absolute_lift_interval
    assert low == pytest.approx(0.05 - Z95 * se)
    assert high == pytest.approx(0.05 + Z95 * se)
    assert low == pytest.approx(0.0135, abs=1e-4)


def test_negative_lift_has_symmetric_p_value() -> None:
    up = compare(counts("a", 1000, 200), counts("b", 1000, 250))
    down = compare(counts("b", 1000, 250), counts("a", 1000, 200))
    assert down.z_score == pytest.approx(-(up.z_score or 0))
    assert down.p_value == pytest.approx(up.p_value)
    assert down.probability_to_beat_control == pytest.approx(
        1 - (up.probability_to_beat_control or 0)
    )


@pytest.mark.parametrize(
    ("control", "treatment"),
    [
        (counts("a", 100, 10), counts("b", 100, 15)),
        (counts("a", 1000, 200), counts("b", 1000, 230)),
        (counts("a", 30, 29), counts("b", 40, 37)),  # the sum runs over the non-conversions
        # every Beta parameter above 10,000: the normal approximation
        (counts("a", 50_000, 20_000), counts("b", 50_000, 20_150)),
    ],
)
def test_probability_to_beat_control_agrees_with_monte_carlo(
    control: VariationCounts, treatment: VariationCounts
) -> None:
    exact = probability_to_beat_control(control, treatment)
    assert exact is not None
    assert exact == pytest.approx(monte_carlo(control, treatment), abs=0.01)


def test_probability_to_beat_control_is_continuous_across_the_approximation_switch() -> None:
    # 10,000 conversions: exact sum; 10,001: every parameter exceeds the limit, normal approximation
    below = probability_to_beat_control(counts("a", 30_000, 9_999), counts("b", 30_000, 10_150))
    above = probability_to_beat_control(counts("a", 30_002, 10_000), counts("b", 30_002, 10_151))
    assert below is not None and above is not None
    assert below == pytest.approx(above, abs=2e-3)


def test_symmetric_case_gives_one_half() -> None:
    for n, k in [(1, 0), (10, 3), (500, 250), (80_000, 30_000)]:
        p = probability_to_beat_control(counts("a", n, k), counts("b", n, k))
        assert p == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize(
    ("x", "df", "expected"),
    [(3.841, 1, 0.05), (5.991, 2, 0.05), (9.210, 2, 0.01), (7.815, 3, 0.05), (11.345, 3, 0.01)],
)
def test_chi_square_survival_matches_table_values(x: float, df: int, expected: float) -> None:
    assert chi_square_sf(x, df) == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("x", [0.01, 0.5, 1.0, 2.0, 2.9, 3.1, 10.0, 40.0, 120.0])
def test_chi_square_survival_closed_forms(x: float) -> None:
    # df = 1: erfc(sqrt(x / 2)); df = 2: exp(-x / 2); df = 4: (1 + x / 2) exp(-x / 2)
    assert chi_square_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-10, abs=1e-300)
    assert chi_square_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10, abs=1e-300)
    assert chi_square_sf(x, 4) == pytest.approx((1 + x / 2) * math.exp(-x / 2), rel=1e-10)


def test_chi_square_survival_edges() -> None:
    assert chi_square_sf(0.0, 3) == 1.0
    assert chi_square_sf(5.0, 0) == 1.0
    assert chi_square_sf(1e6, 2) == 0.0


def test_srm_detects_a_skewed_split() -> None:
    srm = sample_ratio_mismatch({"a": 5000, "b": 4600}, {"a": 0.5, "b": 0.5})
    assert srm.degrees_of_freedom == 1
    assert srm.chi_square == pytest.approx(2 * 200**2 / 4800)
    assert srm.p_value is not None and srm.p_value < 1e-4
    assert srm.mismatch


def test_srm_5000_vs_4700_depends_on_the_threshold() -> None:
    # chi2 = 9.28, p = 0.0023: above the default 0.001 threshold, below 0.01
    srm = sample_ratio_mismatch({"a": 5000, "b": 4700}, {"a": 1, "b": 1})
    assert srm.p_value == pytest.approx(math.erfc(math.sqrt(srm.chi_square or 0) / math.sqrt(2)))
    assert srm.p_value == pytest.approx(0.0023, abs=1e-4)
    assert not srm.mismatch
    assert sample_ratio_mismatch({"a": 5000, "b": 4700}, {"a": 1, "b": 1}, threshold=0.01).mismatch


def test_srm_accepts_a_balanced_split_and_unnormalised_weights() -> None:
    srm = sample_ratio_mismatch({"a": 5000, "b": 4980}, {"a": 50, "b": 50})
    assert srm.p_value is not None and srm.p_value > 0.8
    assert not srm.mismatch
    uneven = sample_ratio_mismatch({"a": 1000, "b": 2000, "c": 1000}, {"a": 1, "b": 2, "c": 1})
    assert uneven.expected == {"a": 1000, "b": 2000, "c": 1000}
    assert uneven.chi_square == 0
    assert uneven.degrees_of_freedom == 2
    assert uneven.p_value == 1.0


def test_srm_degenerate_inputs() -> None:
    empty = sample_ratio_mismatch({}, {"a": 1, "b": 1})
    assert empty.p_value is None and empty.chi_square is None and not empty.mismatch
    missing = sample_ratio_mismatch({"a": 20}, {"a": 1, "b": 1})
    assert missing.observed == {"a": 20, "b": 0}
    assert missing.mismatch
    stray = sample_ratio_mismatch({"a": 10, "b": 1}, {"a": 1, "b": 0})
    assert stray.p_value == 0.0 and stray.mismatch
    single = sample_ratio_mismatch({"a": 10}, {"a": 1})
    assert single.degrees_of_freedom == 0 and single.p_value == 1.0
    with pytest.raises(ValueError, match="without a weight"):
        sample_ratio_mismatch({"a": 1, "z": 1}, {"a": 1})
    with pytest.raises(ValueError):
        sample_ratio_mismatch({"a": 1}, {"a": 0})
    with pytest.raises(ValueError):
        sample_ratio_mismatch({"a": 1}, {"a": -1, "b": 2})


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(0, 10) or (math.nan, math.nan)
    assert low == 0.0
    assert high == pytest.approx(Z95**2 / (10 + Z95**2))  # 0.2775
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z95**2), 1.0))
    assert wilson_interval(50, 100) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize(("k", "n"), [(1, 10), (81, 263), (999, 1000)])
def test_wilson_bounds_are_where_the_score_test_reaches_z(k: int, n: int) -> None:
    interval = wilson_interval(k, n)
    assert interval is not None
    for bound in interval:
        score = abs(k / n - bound) / math.sqrt(bound * (1 - bound) / n)
        assert score == pytest.approx(Z95, rel=1e-9)


def test_degenerate_comparisons() -> None:
    empty = compare(counts("a", 0, 0), counts("b", 100, 10))
    assert empty.control_rate is None and empty.treatment_rate == 0.1
    assert empty.absolute_lift is None and empty.absolute_lift_interval is None
    assert empty.z_score is None and empty.p_value is None
    assert empty.probability_to_beat_control is None and not empty.significant

    none_converted = compare(counts("a", 100, 0), counts("b", 100, 0))
    assert none_converted.relative_lift is None
    assert none_converted.absolute_lift_interval == (0.0, 0.0)
    assert (none_converted.z_score, none_converted.p_value) == (0.0, 1.0)
    assert none_converted.probability_to_beat_control == pytest.approx(0.5)

    all_converted = compare(counts("a", 100, 100), counts("b", 50, 50))
    assert (all_converted.z_score, all_converted.p_value) == (0.0, 1.0)
    assert all_converted.relative_lift == 0.0

    from_zero = compare(counts("a", 100, 0), counts("b", 100, 5))
    assert from_zero.relative_lift is None
    assert from_zero.p_value is not None and 0 < from_zero.p_value < 1


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError):
        counts("a", 10, 11)
    with pytest.raises(ValueError):
        counts("a", -1, 0)
    with pytest.raises(ValueError):
        compare(counts("a", 10, 1), counts("b", 10, 1), confidence=1.0)
    with pytest.raises(ValueError, match="control"):
        results("x", [counts("a", 10, 1)], None)
    with pytest.raises(ValueError, match="once"):
        results("a", [counts("a", 10, 1), counts("a", 10, 2)], None)


def test_results_rows_and_json() -> None:
    report = results(
        "control",
        [counts("control", 5000, 500), counts("blue", 4980, 560), counts("empty", 0, 0)],
        {"control": 1, "blue": 1, "empty": 1},
    )
    control, blue, empty = report.variations
    assert control.comparison is None
    assert control.rate == 0.1
    assert control.rate_interval == wilson_interval(500, 5000)
    assert blue.comparison == compare(control.counts, blue.counts)
    assert empty.rate is None and empty.rate_interval is None
    assert empty.comparison is not None and empty.comparison.p_value is None
    assert report.srm is not None and report.srm.mismatch

    data = report.to_dict()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["variations"][0]["comparison"] is None
    assert data["variations"][1]["comparison"]["treatment"] == "blue"
    assert data["variations"][2]["rate_interval"] is None
    assert data["srm"]["degrees_of_freedom"] == 2

    assert results("control", [counts("control", 10, 1)], None).to_dict()["srm"] is None


small = st.integers(0, 60).flatmap(
    lambda n: st.builds(lambda k: counts("v", n, k), st.integers(0, n))
)


@given(small, small)
def test_probabilities_of_beating_each_other_sum_to_one(
    a: VariationCounts, b: VariationCounts
) -> None:
    result = compare(a, b)
    reverse = compare(b, a)
    if a.exposures and b.exposures:
        p, q = result.probability_to_beat_control, reverse.probability_to_beat_control
        assert p is not None and q is not None
        assert 0 <= p <= 1
        assert p + q == pytest.approx(1, abs=1e-6)
        assert result.p_value is not None and 0 <= result.p_value <= 1
        assert result.p_value == pytest.approx(reverse.p_value)
    else:
        assert result.probability_to_beat_control is None and result.p_value is None
