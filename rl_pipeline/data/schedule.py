"""When a run collects, evaluates and stops, in env steps; and the linear anneals of ε and β."""

import math
from dataclasses import dataclass


def linear_schedule(start: float, end: float, duration: int, t: int) -> float:
    """Moves linearly from `start` to `end` over `duration` steps, then holds `end`."""
    if duration <= 0:
        return end
    return start + (end - start) * min(t / duration, 1.0)


@dataclass(frozen=True)
class Schedule:
    """Evaluations exactly every `eval_interval` env steps, and a budget of exactly `max_env_steps`.

    An iteration collects `env_steps_per_iteration` env steps, or fewer where an evaluation or the
    end of the budget comes first; so each evaluation interval is the same `iterations_per_eval`
    iterations, and a budget that is no multiple of the interval ends in a shorter last stretch,
    evaluated when it ends. All three are multiples of the env's `num_envs` (parts.build_schedule checks that).
    """

    env_steps_per_iteration: int
    eval_interval: int
    max_env_steps: int

    def steps_to_collect(self, env_steps: int) -> int:
        """The env steps of the iteration that starts at `env_steps`."""
        next_eval = (env_steps // self.eval_interval + 1) * self.eval_interval
        return min(self.env_steps_per_iteration, next_eval - env_steps, self.max_env_steps - env_steps)

    @property
    def iterations_per_eval(self) -> int:
        return math.ceil(self.eval_interval / self.env_steps_per_iteration)

    @property
    def iterations(self) -> int:
        """Training steps that spend the budget."""
        evaluations, rest = divmod(self.max_env_steps, self.eval_interval)
        return evaluations * self.iterations_per_eval + math.ceil(rest / self.env_steps_per_iteration)
