"""When iterations end: evaluations exactly every interval, the budget exactly, never more than a full iteration."""

import pytest

from rl_pipeline.data.schedule import Schedule, linear_schedule


def iteration_ends(schedule: Schedule) -> list[int]:
    steps, ends = 0, []
    while steps < schedule.max_env_steps:
        steps += schedule.steps_to_collect(steps)
        ends.append(steps)
    return ends


@pytest.mark.parametrize(
    ("per_iteration", "interval", "budget"), [(256, 2500, 100_000), (256, 2000, 8000), (128, 300, 1000), (256, 5000, 1024),
                                       (8, 8, 64)],
)
def test_iterations_end_on_every_evaluation_and_on_the_budget_and_count_as_lightning_is_told(per_iteration, interval, budget):
    schedule = Schedule(per_iteration, interval, budget)
    ends = iteration_ends(schedule)
    assert ends[-1] == budget and len(ends) == schedule.iterations
    assert set(range(interval, budget + 1, interval)) <= set(ends)
    assert all(0 < later - earlier <= per_iteration for earlier, later in zip([0, *ends], ends))
    # Lightning validates after every iterations_per_eval-th iteration: exactly the evaluation steps.
    evaluated = ends[schedule.iterations_per_eval - 1 :: schedule.iterations_per_eval]
    assert evaluated == list(range(interval, budget + 1, interval))[: len(evaluated)]


def test_an_interval_of_whole_iterations_keeps_every_iteration_full():
    assert set(iteration_ends(Schedule(256, 2560, 10240))) == set(range(256, 10241, 256))


@pytest.mark.parametrize(("t", "expected"), [(0, 1.0), (50, 0.525), (100, 0.05), (10_000, 0.05)])
def test_linear_schedule(t, expected):
    assert linear_schedule(1.0, 0.05, 100, t) == pytest.approx(expected)
