import numpy as np
import pytest

from rl_pipeline.compare import aggregate, interquartile_mean, on_grid
from rl_pipeline.sweeps import swept_keys


def test_interquartile_mean_drops_the_outer_quarters():
    # 8 seeds: the middle four are 3, 4, 5, 6
    values = np.array([[1.0], [100], [3], [4], [5], [6], [-50], [8]])
    assert interquartile_mean(values)[0] == pytest.approx(np.mean([3, 4, 5, 6]))


def test_a_stopped_run_holds_its_last_value_on_the_shared_grid():
    curve = on_grid(np.array([10, 20]), np.array([1.0, 2.0]), np.array([5, 10, 15, 20, 30]))
    np.testing.assert_array_equal(curve, [np.nan, 1.0, 1.0, 2.0, 2.0])


def test_bootstrap_band_contains_the_center_and_shrinks_with_agreement():
    rng = np.random.default_rng(0)
    spread = np.array([[0.0, 10.0], [100.0, 10.0], [50.0, 10.0]])  # seeds disagree at t0, agree at t1
    center, low, high = aggregate(spread, rng)
    np.testing.assert_allclose(center, [50.0, 10.0])
    assert np.all(low <= center) and np.all(center <= high)
    assert high[0] - low[0] > 30 and high[1] == low[1] == 10.0


def test_five_seeds_aggregate_by_interquartile_mean():
    five = np.array([[0.0], [10.0], [20.0], [30.0], [1000.0]])
    center, _, _ = aggregate(five, np.random.default_rng(0))
    assert center[0] == pytest.approx(np.mean([10.0, 20.0, 30.0]))


def test_swept_keys_are_the_sweep_overrides_and_the_sweepers_params():
    overrides = ["+experiment=dqn", "seed=0,1,2", "optimizer.lr=1e-3,3e-4", "trainer.max_env_steps=5000"]
    assert swept_keys(overrides, None) == ["seed", "optimizer.lr"]
    assert swept_keys(["+experiment=dqn"], {"buffer.batch_size": "choice(64, 128)"}) == ["buffer.batch_size"]
