"""What every off-policy value agent shares, as a LightningModule: one training_step collects from the env
into a replay buffer and learns from sampled batches; one validation is a greedy evaluation.

A subclass says how it learns from a batch (`learn`) and gives the module that turns its network's
outputs into Q-values; the base acts greedily on those, explores with its exploration part, keeps
the schedule, checkpoints every state that continuing exactly needs, and logs.
"""

import dataclasses
import functools
import random
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from rl_pipeline.agents.evaluation import Evaluator, Score
from rl_pipeline.agents.exploration import EpsilonGreedy, NoisyNets, epsilon_greedy
from rl_pipeline.data.buffers import Batch, UniformReplayBuffer
from rl_pipeline.data.collector import Collector, VectorStep
from rl_pipeline.data.nstep import NStepReturns
from rl_pipeline.data.schedule import Schedule
from rl_pipeline.envs.transforms import policy_input
from rl_pipeline.errors import ConfigError
from rl_pipeline.validation import positive_int


def mean64(values) -> torch.Tensor:
    """The mean of float32 measurements, taken in float64."""
    return torch.stack(list(values)).double().mean()


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


@dataclass
class Update:
    """What one gradient step measured, detached."""

    loss: torch.Tensor
    q_mean: torch.Tensor  # the mean of Q(s, a) over the batch
    grad_norm: torch.Tensor  # before clipping


def check_outputs(network: nn.Module, space, output_shape: tuple[int, ...]) -> None:
    """The network must map a batch of the env's observations to `output_shape` per observation."""
    example = torch.as_tensor(np.zeros((1, *space.shape), dtype=space.dtype))
    try:
        with torch.no_grad():
            shape = tuple(network(example).shape)
    except Exception as error:
        raise ConfigError(
            "network", f"cannot take the env's observations of shape {space.shape} ({space.dtype}): "
            f"{str(error).splitlines()[0]}", rooted=True,
        ) from None
    if shape != (1, *output_shape):
        raise ConfigError(
            "network", f"expected outputs of shape {(1, *output_shape)} for one observation, got {shape}", rooted=True
        )


class OffPolicyAgent(pl.LightningModule, ABC):
    def __init__(
        self,
        network: nn.Module,
        q_values: nn.Module,
        buffer: UniformReplayBuffer,
        collector: Collector,
        exploration: EpsilonGreedy | NoisyNets,
        optimizer: torch.optim.Optimizer,
        transforms: list,
        evaluator: Evaluator,
        schedule: Schedule,
        gamma: float,
        n_step: int = 1,
        updates_per_iteration: int = 1,
        checkpoint_buffer_max_bytes: float = float("inf"),
    ):
        super().__init__()
        self.automatic_optimization = False  # many updates per training_step, on our own schedule
        exploration.check_network(network)
        self.network, self.q_values = network, q_values
        self.policy_input = policy_input(transforms)
        self.buffer, self.collector, self.exploration = buffer, collector, exploration
        self.optimizer, self.transforms = optimizer, transforms
        self.evaluator, self.schedule = evaluator, schedule
        self.n_step_returns = NStepReturns(positive_int("n_step", n_step), gamma, collector.num_envs)
        self.updates_per_iteration = positive_int("updates_per_iteration", updates_per_iteration)
        self.checkpoint_buffer_max_bytes = checkpoint_buffer_max_bytes
        self.num_updates = 0
        self.solved_env_steps: int | None = None  # at the first evaluation that solved, if any
        self._clock = (time.perf_counter(), 0)  # (time, env steps) at the last iteration's end
        self._resumed_rng_states = None

    @abstractmethod
    def learn(self, batch: Batch) -> Update:
        """Update number `num_updates`, on a batch whose observations have been through the policy's input."""

    @property
    def policy(self) -> nn.Module:
        """Q(s, ·) on raw env observations: what acts, is evaluated and is stored in MLflow."""
        return nn.Sequential(self.policy_input, self.network, self.q_values)

    @property
    def env_steps(self) -> int:
        """Env steps collected so far: the x-axis of every metric, and what checkpoints are timed by."""
        return self.collector.env_steps

    @property
    def epsilon(self) -> float:
        """The chance of a uniformly random action now: every action is one during the warm-up."""
        return 1.0 if self.collector.warming_up else self.exploration.epsilon(self.env_steps)

    def act(self, policy: nn.Module, observations: np.ndarray) -> np.ndarray:
        """The behaviour policy on a batch of raw observations, around `policy` (this iteration's)."""
        if not self.collector.warming_up:
            self.exploration.perturb(self.network)
        return epsilon_greedy(policy, observations, self.epsilon, self.collector.num_actions, self.device)

    def store(self, step: VectorStep) -> None:
        transitions = self.n_step_returns(*step)
        if transitions is not None:
            self.buffer.add(transitions)

    def prepared(self, batch: Batch) -> Batch:
        """The batch on this device, its observations through the policy's input (normalized, where that is on)."""
        batch = batch.to(self.device)
        return dataclasses.replace(
            batch,
            observations=self.policy_input(batch.observations),
            next_observations=self.policy_input(batch.next_observations),
        )

    def refresh_policy_input(self) -> None:
        """Freeze the observation statistics of this moment into the policy (and so into its checkpoints)."""
        self.policy_input = policy_input(self.transforms).to(self.device)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.optimizer

    def on_train_start(self) -> None:
        self._clock = (time.perf_counter(), self.env_steps)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Restored here, not on load: a resuming Lightning makes dataloader iterators, which draw from torch's RNG.
        if self._resumed_rng_states is not None:
            restore_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Beside Lightning's own state (networks, optimizer, loops): what continuing exactly needs."""
        checkpoint["env_steps"] = self.env_steps  # every checkpoint's, the best's included
        if "optimizer_states" not in checkpoint:  # weights only (the best policy's): nothing to continue from
            return
        keep_buffer = self.buffer.nbytes <= self.checkpoint_buffer_max_bytes
        checkpoint["training_state"] = {
            "num_updates": self.num_updates,
            "solved_env_steps": self.solved_env_steps,
            "collector": self.collector.state_dict(),
            "n_step_pending": self.n_step_returns.pending,
            "buffer": self.buffer.state_dict() if keep_buffer else None,
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["training_state"]
        self.num_updates = state["num_updates"]
        self.solved_env_steps = state["solved_env_steps"]
        self.collector.load_state_dict(state["collector"])
        if state["collector"]["env"] is not None:  # the episodes go on: so do their unfinished n-step sums
            self.n_step_returns.pending = state["n_step_pending"]
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        else:  # left out for its size: refill it, as at the start, before updating again
            self.collector.restart_warm_up()
        self._resumed_rng_states = state["rng"]

    def training_step(self, _batch: int, _batch_idx: int) -> None:
        """One iteration. Lightning's batch only counts iterations: the schedule says what to collect."""
        act = functools.partial(self.act, self.policy)  # the policy built once an iteration, not at every step
        stats = self.collector.collect(act, self.store, self.schedule.steps_to_collect(self.env_steps))
        self.refresh_policy_input()  # now with this iteration's observations
        updates = []
        if not self.collector.warming_up:
            for _ in range(self.updates_per_iteration):
                self.num_updates += 1
                updates.append(self.learn(self.prepared(self.buffer.sample(self.env_steps))))
        self.log_iteration(stats, updates)
        if self.env_steps >= self.schedule.max_env_steps:
            self.trainer.should_stop = True  # budget spent; Lightning evaluates once more before it stops

    def log_iteration(self, stats, updates: list[Update]) -> None:
        env_steps = self.env_steps
        now = time.perf_counter()
        then, steps_then = self._clock
        self._clock = (now, env_steps)
        metrics = {"train/epsilon": self.epsilon, "train/lr": self.optimizer.param_groups[0]["lr"]}
        if stats.episode_returns:
            metrics["train/episode_return"] = float(np.mean(stats.episode_returns))
            metrics["train/episode_length"] = float(np.mean(stats.episode_lengths))
        if updates:  # warm-up iterations do no update: their steps/s would dwarf the rest
            metrics["train/loss"] = mean64(update.loss for update in updates)
            metrics["train/q_mean"] = mean64(update.q_mean for update in updates)
            metrics["train/grad_norm"] = mean64(update.grad_norm for update in updates)
            metrics["perf/env_steps_per_sec"] = (env_steps - steps_then) / (now - then)
        if self.logger is not None:  # straight to the logger, in float64: Lightning's self.log costs ~0.4 ms a key
            self.logger.log_metrics({key: float(value) for key, value in metrics.items()}, step=env_steps)
        bar = {"env_steps": float(env_steps), "steps/s": (env_steps - steps_then) / (now - then)}
        if stats.episode_returns:
            bar["return"] = metrics["train/episode_return"]
        self.log_dict(bar, prog_bar=True, logger=False, batch_size=1)

    def log_measured(self, metrics: dict) -> None:
        """`metrics` at this env step, in float64 (self.log would make them float32: 247.15 -> 247.14999389648438),
        where callbacks that stop and checkpoint on them see them too."""
        # Lightning sends a logged "step" to the loggers as the x-axis: env steps, not batches.
        metrics = {**metrics, "step": self.env_steps}
        self.log_dict({key: torch.as_tensor(value, dtype=torch.float64) for key, value in metrics.items()}, batch_size=1)

    def validation_step(self, batch, batch_idx: int) -> None:
        score = Score.of(self.evaluator(self.policy))
        if self.solved_env_steps is None and self.evaluator.solved(score.lower_bound):
            self.solved_env_steps = self.env_steps
        # Stopping and checkpoint selection compare these against solved_return, as measured.
        self.log_measured(score.metrics("eval"))
