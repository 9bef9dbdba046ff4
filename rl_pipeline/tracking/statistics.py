"""Results over seeds, as rliable reports them (Agarwal et al., 2021), on SciPy's bootstrap.

IQM (the mean of the middle half, `scipy.stats.trim_mean` at 25%), mean and median, each with a 95%
percentile-bootstrap interval, and the probability that one configuration's run beats another's.
Several tasks (envs) are resampled each within itself: the stratified bootstrap. Percentile intervals
of these statistics never leave the range of the observed scores, unlike a t-interval on two seeds.

SciPy rather than rliable: SciPy is already installed with MLflow and kept by a large team, and its
`bootstrap` resamples several samples independently, which is the stratified bootstrap itself;
rliable would add arch, seaborn and pandas pins for the same three lines.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
RESAMPLES = 2000
SEED = 0  # intervals are reproducible: the same scores give the same interval


def iqm(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """The interquartile mean: the mean of the middle 50% (with fewer than 4 scores, the mean)."""
    return stats.trim_mean(scores, 0.25, axis=axis)


AGGREGATES: dict[str, Callable[..., np.ndarray]] = {"iqm": iqm, "mean": np.mean, "median": np.median}


@dataclass(frozen=True)
class Estimate:
    """A statistic of the scores and its 95% bootstrap interval (NaN bounds from fewer than 2 scores)."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        if np.isnan(self.low):
            return f"{self.value:.4g}"
        return f"{self.value:.4g} [{self.low:.4g}, {self.high:.4g}]"


def _pooled(statistic: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
    """`statistic` over every task's scores together, for bootstrap's samples (one per task)."""
    return lambda *tasks, axis=-1: statistic(np.concatenate(tasks, axis=axis), axis=axis)


def _percentile_interval(samples, statistic: Callable[..., np.ndarray], axis: int = -1) -> tuple:
    """The 95% percentile-bootstrap interval of `statistic`, each sample resampled on its own."""
    result = stats.bootstrap(
        samples, statistic, paired=False, vectorized=True, axis=axis, n_resamples=RESAMPLES,
        confidence_level=CONFIDENCE, method="percentile", rng=np.random.default_rng(SEED),
    )
    return result.confidence_interval.low, result.confidence_interval.high


def bootstrap(statistic: Callable[..., np.ndarray], tasks: Sequence[np.ndarray]) -> Estimate:
    """`statistic` of the pooled scores with its stratified-bootstrap interval; `tasks`: each task's runs."""
    tasks = [np.asarray(task, dtype=float) for task in tasks]
    value = float(_pooled(statistic)(*tasks))
    if min(len(task) for task in tasks) < 2:
        return Estimate(value, float("nan"), float("nan"))
    if np.ptp(np.concatenate(tasks)) == 0:  # every run the same: a point, which the bootstrap cannot resample
        return Estimate(value, value, value)
    low, high = _percentile_interval(tasks, _pooled(statistic))
    return Estimate(value, float(low), float(high))


def summarize(tasks: Sequence[np.ndarray]) -> dict[str, Estimate]:
    """IQM, mean and median of the runs' scores, each with its interval."""
    return {name: bootstrap(statistic, tasks) for name, statistic in AGGREGATES.items()}


def _improvement(x: np.ndarray, y: np.ndarray, axis: int = -1) -> np.ndarray:
    """P(X > Y) + P(X = Y) / 2 for a run of each, over all pairs (the Mann-Whitney U over its maximum)."""
    x, y = np.expand_dims(x, -1), np.expand_dims(y, -2)
    return ((x > y) + 0.5 * (x == y)).mean(axis=(-1, -2))


def probability_of_improvement(x: Sequence[float], y: Sequence[float]) -> Estimate:
    """How likely a run of X beats a run of Y, with its interval, each configuration resampled on its own."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    value = float(_improvement(x, y))
    if min(len(x), len(y)) < 2:
        return Estimate(value, float("nan"), float("nan"))
    low, high = _percentile_interval((x, y), _improvement)
    return Estimate(value, float(np.nan_to_num(low, nan=value)), float(np.nan_to_num(high, nan=value)))


def verdict(best: str, runner_up: str, improvement: Estimate) -> str:
    """In words: whether the best configuration is told apart from the runner-up."""
    if np.isnan(improvement.low):
        return f"{best} leads {runner_up}, but with one run of either the lead cannot be told from chance."
    if improvement.low > 0.5:
        return f"{best} beats {runner_up}: P(improvement) {improvement}, its interval above 0.5."
    return (
        f"{best} is not distinguishable from {runner_up}: P(improvement) {improvement} includes 0.5 "
        "(more seeds would tell)."
    )


def band(curves: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IQM over seeds (axis 0) at each point of `curves`, and its 95% bootstrap band."""
    center = iqm(curves, axis=0)
    if len(curves) < 2:
        return center, center, center
    low, high = _percentile_interval((curves,), iqm, axis=0)
    return center, np.where(np.isnan(low), center, low), np.where(np.isnan(high), center, high)
