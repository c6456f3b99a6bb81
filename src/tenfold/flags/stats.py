"""Experiment statistics for flag variations: conversion rates, lifts and a split check (no I/O)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

_NORMAL = NormalDist()
# Above this many terms the exact Beta comparison gives way to a normal approximation.
_EXACT_TERMS = 10_000
_GAMMA_EPS = 1e-15
_GAMMA_TINY = 1e-300
_GAMMA_MAX_ITER = 10_000


@dataclass(frozen=True, slots=True)
class VariationCounts:
    variation: str
    exposures: int  # unique users exposed
    conversions: int  # unique exposed users who converted

    def __post_init__(self) -> None:
        if self.exposures < 0 or self.conversions < 0:
            raise ValueError(f"{self.variation}: counts cannot be negative")
        if self.conversions > self.exposures:
            raise ValueError(f"{self.variation}: more conversions than exposures")

    @property
    def rate(self) -> float | None:
        return self.conversions / self.exposures if self.exposures else None


@dataclass(frozen=True, slots=True)
class Comparison:
    control: str
    treatment: str
    confidence: float
    control_rate: float | None
    treatment_rate: float | None
    absolute_lift: float | None  # treatment rate - control rate
    absolute_lift_interval: tuple[float, float] | None
    relative_lift: float | None  # absolute lift / control rate
    z_score: float | None
    p_value: float | None  # two-sided
    significant: bool
    probability_to_beat_control: float | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "treatment": self.treatment,
            "confidence": self.confidence,
            "control_rate": self.control_rate,
            "treatment_rate": self.treatment_rate,
            "absolute_lift": self.absolute_lift,
            "absolute_lift_interval": _interval(self.absolute_lift_interval),
            "relative_lift": self.relative_lift,
            "z_score": self.z_score,
            "p_value": self.p_value,
            "significant": self.significant,
            "probability_to_beat_control": self.probability_to_beat_control,
        }


@dataclass(frozen=True, slots=True)
class SrmResult:
    observed: dict[str, int]
    expected: dict[str, float]  # expected exposures under the configured split
    chi_square: float | None  # None when undefined: no exposures, or exposures at weight 0
    degrees_of_freedom: int
    p_value: float | None
    threshold: float
    mismatch: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "observed": dict(self.observed),
            "expected": dict(self.expected),
            "chi_square": self.chi_square,
            "degrees_of_freedom": self.degrees_of_freedom,
            "p_value": self.p_value,
            "threshold": self.threshold,
            "mismatch": self.mismatch,
        }


@dataclass(frozen=True, slots=True)
class VariationResult:
    counts: VariationCounts
    rate: float | None
    rate_interval: tuple[float, float] | None  # Wilson score interval
    comparison: Comparison | None  # None for the control

    def to_dict(self) -> dict[str, Any]:
        return {
            "variation": self.counts.variation,
            "exposures": self.counts.exposures,
            "conversions": self.counts.conversions,
            "rate": self.rate,
            "rate_interval": _interval(self.rate_interval),
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
        }


@dataclass(frozen=True, slots=True)
class ExperimentResults:
    control: str
    confidence: float
    variations: tuple[VariationResult, ...]
    srm: SrmResult | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "control": self.control,
            "confidence": self.confidence,
            "variations": [row.to_dict() for row in self.variations],
            "srm": None if self.srm is None else self.srm.to_dict(),
        }


def compare(
    control: VariationCounts, treatment: VariationCounts, *, confidence: float = 0.95
) -> Comparison:
    z_crit = _critical_value(confidence)
    c_rate, t_rate = control.rate, treatment.rate
    lift = lift_interval = relative = z = p_value = None
    if c_rate is not None and t_rate is not None:
        lift = t_rate - c_rate
        # Wald interval: unpooled standard error of the difference.
        se = math.sqrt(
            c_rate * (1 - c_rate) / control.exposures + t_rate * (1 - t_rate) / treatment.exposures
        )
        lift_interval = (lift - z_crit * se, lift + z_crit * se)
        relative = lift / c_rate if c_rate > 0 else None
        z, p_value = _two_proportion_z_test(control, treatment)
    return Comparison(
        control=control.variation,
        treatment=treatment.variation,
        confidence=confidence,
        control_rate=c_rate,
        treatment_rate=t_rate,
        absolute_lift=lift,
        absolute_lift_interval=lift_interval,
        relative_lift=relative,
        z_score=z,
        p_value=p_value,
        significant=p_value is not None and p_value < 1 - confidence,
        probability_to_beat_control=probability_to_beat_control(control, treatment),
    )


def probability_to_beat_control(
    control: VariationCounts, treatment: VariationCounts
) -> float | None:
    """P(treatment rate > control rate), Beta(1 + conversions, 1 + non-conversions) posteriors."""
    if control.exposures == 0 or treatment.exposures == 0:
        return None
    a_c, b_c = 1 + control.conversions, 1 + control.exposures - control.conversions
    a_t, b_t = 1 + treatment.conversions, 1 + treatment.exposures - treatment.conversions
    # The exact sum runs over one Beta parameter; by symmetry, any of the four will do.
    fewest = min(a_t, a_c, b_t, b_c)
    if fewest > _EXACT_TERMS:
        return _beta_difference_normal(a_t, b_t, a_c, b_c)
    if fewest == a_t:
        p = _beta_greater(a_t, b_t, a_c, b_c)
    elif fewest == a_c:
        p = 1 - _beta_greater(a_c, b_c, a_t, b_t)
    elif fewest == b_c:  # 1 - C > 1 - T, with 1 - X ~ Beta(b, a)
        p = _beta_greater(b_c, a_c, b_t, a_t)
    else:
        p = 1 - _beta_greater(b_t, a_t, b_c, a_c)
    return min(1.0, max(0.0, p))


def wilson_interval(
    conversions: int, exposures: int, *, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Wilson score interval for a binomial proportion."""
    z = _critical_value(confidence)
    if exposures == 0:
        return None
    p = conversions / exposures
    z2n = z * z / exposures
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(p * (1 - p) / exposures + z2n / (4 * exposures))
    low = 0.0 if conversions == 0 else max(0.0, centre - half)
    high = 1.0 if conversions == exposures else min(1.0, centre + half)
    return (low, high)


def sample_ratio_mismatch(
    observed: Mapping[str, int],
    expected_weights: Mapping[str, float],
    *,
    threshold: float = 0.001,
) -> SrmResult:
    """Pearson's chi-square goodness-of-fit test of exposures against the configured split."""
    unknown = sorted(set(observed) - set(expected_weights))
    if unknown:
        raise ValueError(f"exposures for variations without a weight: {', '.join(unknown)}")
    if any(not math.isfinite(w) or w < 0 for w in expected_weights.values()):
        raise ValueError("weights must be finite and non-negative")
    weight_sum = math.fsum(expected_weights.values())
    if weight_sum <= 0:
        raise ValueError("at least one weight must be positive")
    if any(n < 0 for n in observed.values()):
        raise ValueError("exposures cannot be negative")

    counts = {name: observed.get(name, 0) for name in expected_weights}
    total = sum(counts.values())
    expected = {name: total * w / weight_sum for name, w in expected_weights.items()}
    df = sum(1 for w in expected_weights.values() if w > 0) - 1

    def result(chi2: float | None, p: float | None) -> SrmResult:
        return SrmResult(
            observed=counts,
            expected=expected,
            chi_square=chi2,
            degrees_of_freedom=df,
            p_value=p,
            threshold=threshold,
            mismatch=p is not None and p < threshold,
        )

    if total == 0:
        return result(None, None)
    if any(counts[name] > 0 for name, w in expected_weights.items() if w == 0):
        return result(None, 0.0)  # exposures in a variation the split never assigns
    chi2 = math.fsum(
        (counts[name] - e) ** 2 / e for name, e in expected.items() if expected_weights[name] > 0
    )
    return result(chi2, chi_square_sf(chi2, df))


def results(
    control: str,
    counts: Sequence[VariationCounts],
    expected_weights: Mapping[str, float] | None,
    *,
    confidence: float = 0.95,
) -> ExperimentResults:
    _critical_value(confidence)
    by_name = {c.variation: c for c in counts}
    if len(by_name) != len(counts):
        raise ValueError("each variation may appear only once")
    if control not in by_name:
        raise ValueError(f"no counts for the control variation {control!r}")
    base = by_name[control]
    rows = tuple(
        VariationResult(
            counts=c,
            rate=c.rate,
            rate_interval=wilson_interval(c.conversions, c.exposures, confidence=confidence),
            comparison=None if c.variation == control else compare(base, c, confidence=confidence),
        )
        for c in counts
    )
    srm = None
    if expected_weights is not None:
        srm = sample_ratio_mismatch({c.variation: c.exposures for c in counts}, expected_weights)
    return ExperimentResults(control=control, confidence=confidence, variations=rows, srm=srm)


def chi_square_sf(x: float, df: int) -> float:
    """P(X >= x) for X chi-square distributed with `df` degrees of freedom."""
    if df < 0:
        raise ValueError("degrees of freedom cannot be negative")
    if df == 0 or x <= 0:
        return 1.0
    return _gamma_q(df / 2, x / 2)


def _critical_value(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError("confidence must be between 0 and 1")
    return _NORMAL.inv_cdf(0.5 + confidence / 2)


def _two_proportion_z_test(
    control: VariationCounts, treatment: VariationCounts
) -> tuple[float, float]:
    """Two-proportion z-test with the pooled standard error; returns z and the two-sided p."""
    n_c, n_t = control.exposures, treatment.exposures
    pooled = (control.conversions + treatment.conversions) / (n_c + n_t)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    if se == 0:  # nobody or everybody converted in both: the rates are equal
        return 0.0, 1.0
    z = (treatment.conversions / n_t - control.conversions / n_c) / se
    return z, min(1.0, 2 * _NORMAL.cdf(-abs(z)))


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def _beta_greater(a_x: int, b_x: int, a_y: int, b_y: int) -> float:
    """P(X > Y), X ~ Beta(a_x, b_x), Y ~ Beta(a_y, b_y): Evan Miller's closed form, a_x terms."""
    base = _log_beta(a_y, b_y)
    return math.fsum(
        math.exp(_log_beta(a_y + i, b_y + b_x) - math.log(b_x + i) - _log_beta(1 + i, b_x) - base)
        for i in range(a_x)
    )


def _beta_difference_normal(a_x: int, b_x: int, a_y: int, b_y: int) -> float:
    """P(X > Y) approximating both Beta posteriors by normals with their mean and variance."""

    def moments(a: int, b: int) -> tuple[float, float]:
        n = a + b
        return a / n, a * b / (n * n * (n + 1))

    mean_x, var_x = moments(a_x, b_x)
    mean_y, var_y = moments(a_y, b_y)
    return _NORMAL.cdf((mean_x - mean_y) / math.sqrt(var_x + var_y))


def _gamma_q(a: float, x: float) -> float:
    """Regularized upper incomplete gamma Q(a, x): series below a + 1, continued fraction above."""
    log_prefix = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1 / a
        ap = a
        for _ in range(_GAMMA_MAX_ITER):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * _GAMMA_EPS:
                break
        return max(0.0, 1 - total * math.exp(log_prefix))
    # Modified Lentz evaluation of the continued fraction.
    b = x + 1 - a
    c = 1 / _GAMMA_TINY
    d = 1 / b
    h = d
    for i in range(1, _GAMMA_MAX_ITER):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        if abs(d) < _GAMMA_TINY:
            d = _GAMMA_TINY
        c = b + an / c
        if abs(c) < _GAMMA_TINY:
            c = _GAMMA_TINY
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < _GAMMA_EPS:
            break
    return min(1.0, math.exp(log_prefix) * h)


def _interval(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [interval[0], interval[1]]
