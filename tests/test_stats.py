"""BCa bootstrap intervals and the promotion rule on constructed per-volume scores (fast)."""

from __future__ import annotations

import numpy as np
import pytest

from clinbundle.analysis.stats import mean_ci, paired_difference_ci
from clinbundle.registry import RULE_MINIMUM, RULE_PAIRED_CI, Score, decide


def test_mean_ci_brackets_the_mean_and_narrows_with_more_volumes() -> None:
    rng = np.random.default_rng(1)
    small = rng.normal(0.8, 0.05, 5)
    large = np.concatenate([small, rng.normal(0.8, 0.05, 45)])
    a, b = mean_ci(small), mean_ci(large)
    assert a.method == "BCa" and a.low < a.mean < a.high and a.n == 5
    assert b.low < b.mean < b.high
    assert b.high - b.low < a.high - a.low
    # a 95% CI of 50 draws of N(0.8, 0.05) is about +-0.014 around its mean
    assert 0.015 < b.high - b.low < 0.045


def test_bca_differs_from_percentile_on_a_skewed_sample() -> None:
    """BCa corrects for skew: on a right-skewed sample its interval sits further right."""
    from scipy.stats import bootstrap

    x = np.array([0.1, 0.1, 0.12, 0.15, 0.2, 0.25, 0.9, 1.5])
    ours = mean_ci(x)
    pct = bootstrap((x,), np.mean, method="percentile", rng=np.random.default_rng(0))
    assert ours.high > pct.confidence_interval.high


def test_degenerate_inputs_are_named_not_nan_warnings() -> None:
    same = mean_ci([0.7, 0.7, 0.7])
    assert (same.low, same.mean, same.high) == (0.7, 0.7, 0.7) and "all values equal" in same.note
    one = mean_ci([0.4])
    assert one.mean == 0.4 and not one.defined and "fewer than 2" in one.note
    assert "no CI" in one.text()
    twins = paired_difference_ci([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert twins.mean == 0 and twins.low == twins.high == 0
    with pytest.raises(ValueError, match="same volumes"):
        paired_difference_ci([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])


def test_paired_difference_uses_the_pairs_and_the_direction() -> None:
    # volumes differ a lot from each other, the challenger is better by ~0.02 on every one:
    # unpaired intervals overlap, the paired difference clearly excludes zero
    base = np.array([0.35, 0.55, 0.62, 0.71, 0.8, 0.9])
    better = base + np.array([0.02, 0.025, 0.015, 0.02, 0.03, 0.018])
    a, b = mean_ci(better), mean_ci(base)
    assert a.low < b.high  # the marginal CIs overlap
    d = paired_difference_ci(better, base)
    assert d.low > 0.01 and d.mean == pytest.approx(0.021333, abs=1e-5)
    # for a lower-is-better metric the same numbers mean "worse"
    assert paired_difference_ci(better, base, sign=-1.0).high < 0


def _score(version: str, metric: str, values: list[float]) -> Score:
    return Score(version, metric, values, mean_ci(values))


def test_better_mean_with_a_ci_crossing_zero_is_not_promoted() -> None:
    champion = _score("1", "dice", [0.80, 0.70, 0.75, 0.85])
    challenger = _score("2", "dice", [0.95, 0.66, 0.73, 0.83])  # +0.15 once, worse 3 times
    assert challenger.mean > champion.mean
    d = decide(challenger, champion)
    assert d.difference is not None and d.difference.low < 0 < d.difference.high
    assert not d.promoted and d.rule == RULE_PAIRED_CI
    assert "the mean is better, but the CI does not clear the margin" in d.reason


def test_consistent_improvement_is_promoted_and_margins_apply() -> None:
    champion = _score("1", "masd", [2.0, 3.0, 1.5, 2.5, 4.0])
    challenger = _score("2", "masd", [1.5, 2.4, 1.1, 2.0, 3.3])  # lower is better
    d = decide(challenger, champion)
    assert d.promoted and d.difference.low > 0, d.reason
    assert not decide(challenger, champion, min_improvement=0.5).promoted
    first = decide(challenger, None, minimum=2.0)  # first champion: mean 2.06 mm > 2.0 mm
    assert first.rule == RULE_MINIMUM and not first.promoted and "misses" in first.reason
