"""The statistics of results over seeds: each figure checked against one worked out by hand."""

import numpy as np
import pytest

from rl_pipeline.tracking.statistics import (
    band,
    iqm,
    probability_of_improvement,
    summarize,
    verdict,
)


def test_iqm_is_the_mean_of_the_middle_half():
    assert iqm(np.array([1.0, 100, 3, 4, 5, 6, -50, 8])) == pytest.approx(np.mean([3, 4, 5, 6]))
    assert iqm(np.array([0.0, 10, 20, 30, 1000])) == pytest.approx(20.0)  # 5 seeds: one trimmed from each end
    assert iqm(np.array([1.0, 2, 9])) == pytest.approx(4.0)  # under 4 seeds nothing is trimmed


def test_intervals_stay_inside_what_was_observed():
    # Two CartPole seeds: Student's t gives [-644, 1041] for the mean of 9.4 and 388; the bootstrap cannot leave [9.4, 388].
    for name, estimate in summarize([np.array([9.4, 388.0])]).items():
        assert 9.4 <= estimate.low <= estimate.value <= estimate.high <= 388.0, name
    assert summarize([np.array([9.4, 388.0])])["mean"].high - summarize([np.array([9.4, 388.0])])["mean"].low > 300


def test_figures_of_a_configuration():
    summary = summarize([np.array([500.0, 470, 440, 499, 10])])
    assert summary["iqm"].value == pytest.approx(np.mean([440, 470, 499]))
    assert summary["mean"].value == pytest.approx(383.8)
    assert summary["median"].value == 470.0
    assert all(10.0 <= e.low <= e.value <= e.high <= 500.0 for e in summary.values())


def test_one_seed_has_no_interval_and_equal_seeds_a_point():
    one = summarize([np.array([200.0])])["iqm"]
    assert one.value == 200.0 and np.isnan(one.low) and np.isnan(one.high)
    same = summarize([np.array([500.0, 500.0, 500.0])])["mean"]
    assert (same.low, same.value, same.high) == (500.0, 500.0, 500.0)


def test_the_bootstrap_is_stratified_by_task():
    # Within each task the runs agree, so resampling each task on its own never moves the pooled mean;
    # resampling the pooled runs together would (a draw of all six from the first task gives 0).
    pooled = summarize([np.zeros(3), np.full(3, 10.0)])["mean"]
    assert (pooled.low, pooled.value, pooled.high) == (5.0, 5.0, 5.0)


def test_probability_of_improvement_counts_pairs_and_half_of_ties():
    assert probability_of_improvement([3.0, 1.0], [2.0, 2.0]).value == 0.5  # wins 2 of the 4 pairs
    assert probability_of_improvement([3.0, 2.0], [2.0, 1.0]).value == 0.875  # 3 wins and a tie of 4 pairs
    surely = probability_of_improvement([500.0, 490, 480], [100.0, 200, 300])
    assert (surely.low, surely.value, surely.high) == (1.0, 1.0, 1.0)
    ties = probability_of_improvement([500.0, 500], [500.0, 500])
    assert (ties.low, ties.value, ties.high) == (0.5, 0.5, 0.5)


def test_the_verdict_says_whether_the_best_is_told_apart():
    assert verdict("lr=1", "lr=2", probability_of_improvement([500.0, 490, 480], [100.0, 200, 300])).startswith(
        "lr=1 beats lr=2")
    unsure = verdict("lr=1", "lr=2", probability_of_improvement([500.0, 100, 300], [480.0, 200, 250]))
    assert unsure.startswith("lr=1 is not distinguishable from lr=2")
    assert "cannot be told from chance" in verdict("lr=1", "lr=2", probability_of_improvement([500.0], [100.0]))


def test_the_band_holds_the_iqm_and_shrinks_where_seeds_agree():
    curves = np.array([[0.0, 10.0], [100.0, 10.0], [50.0, 10.0]])  # seeds disagree at the first point, agree at the second
    center, low, high = band(curves)
    np.testing.assert_allclose(center, [50.0, 10.0])
    assert low[0] <= 50.0 <= high[0] and high[0] - low[0] > 30
    assert low[1] == high[1] == 10.0
