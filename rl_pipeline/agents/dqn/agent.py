"""The LightningModule: one training_step is one DQN iteration, one validation is a greedy evaluation."""

import copy
import random
import time

import numpy as np
import pytorch_lightning as pl
import torch
from torch import nn

from rl_pipeline.agents.dqn.loss import DQNLoss
from rl_pipeline.agents.evaluation import Evaluator, Score
from rl_pipeline.agents.networks import update_target
from rl_pipeline.data.buffers import UniformReplayBuffer
from rl_pipeline.data.collector import Collector
from rl_pipeline.data.schedule import Schedule
from rl_pipeline.envs.transforms import policy_input
from rl_pipeline.errors import TrainingDiverged


def mean64(values) -> torch.Tensor:
    """The mean of float32 measurements, taken in float64."""
    return torch.stack(list(values)).double().mean()


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


class DQNModule(pl.LightningModule):
    def __init__(
        self,
        q_network: nn.Module,
        loss_fn: DQNLoss,
        buffer: UniformReplayBuffer,
        collector: Collector,
        optimizer: torch.optim.Optimizer,
        transforms: list,
        evaluator: Evaluator,
        schedule: Schedule,
        updates_per_iteration: int,
        target_sync_interval_updates: int,
        target_sync_tau: float,
        max_grad_norm: float | None = None,
        checkpoint_buffer_max_bytes: float = float("inf"),
    ):
        super().__init__()
        self.automatic_optimization = False  # many updates per training_step, on our own schedule
        self.q_network = q_network
        self.target_network = copy.deepcopy(q_network).requires_grad_(False)
        self.policy_input = policy_input(transforms)
        self.loss_fn, self.buffer, self.collector = loss_fn, buffer, collector
        self.optimizer, self.transforms = optimizer, transforms
        self.evaluator, self.schedule = evaluator, schedule
        self.updates_per_iteration = updates_per_iteration
        self.target_sync_interval_updates = target_sync_interval_updates
        self.target_sync_tau = target_sync_tau
        self.max_grad_norm = max_grad_norm
        self.checkpoint_buffer_max_bytes = checkpoint_buffer_max_bytes
        self.num_updates = 0
        self.solved_env_steps: int | None = None  # at the first evaluation that solved, if any
        self._clock = (time.perf_counter(), 0)  # (time, env steps) at the last iteration's end
        self._resumed_rng_states = None

    @property
    def policy(self) -> nn.Module:
        """Q(s, ·) on raw env observations: what acts, learns, is evaluated and is stored in MLflow."""
        return nn.Sequential(self.policy_input, self.q_network)

    @property
    def target_policy(self) -> nn.Module:
        """Q⁻(s, ·) on raw env observations, through the same input as the online network."""
        return nn.Sequential(self.policy_input, self.target_network)

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

    @property
    def env_steps(self) -> int:
        """Env steps collected so far: the x-axis of every metric, and what checkpoints are timed by."""
        return self.collector.env_steps

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
            "buffer": self.buffer.state_dict() if keep_buffer else None,
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint["training_state"]
        self.num_updates = state["num_updates"]
        self.solved_env_steps = state.get("solved_env_steps")  # checkpoints from before it was kept: none
        self.collector.load_state_dict(state["collector"])
        if state["buffer"] is not None:
            self.buffer.load_state_dict(state["buffer"])
        else:  # left out for its size: refill it, as at the start, before updating again
            self.collector.restart_warm_up()
        self._resumed_rng_states = state["rng"]

    def training_step(self, _batch: int, _batch_idx: int) -> None:
        """One DQN iteration. Lightning's batch only counts iterations: the schedule says what to collect."""
        stats = self.collector.collect(self.policy, self.buffer.add, self.schedule.steps_to_collect(self.env_steps))
        self.refresh_policy_input()  # now with this iteration's observations
        online, target = self.policy, self.target_policy
        updates = []
        if not self.collector.warming_up:
            for _ in range(self.updates_per_iteration):
                updates.append(self.update(online, target, self.buffer.sample(self.env_steps).to(self.device)))
        self.log_iteration(stats, updates)
        if self.env_steps >= self.schedule.max_env_steps:
            self.trainer.should_stop = True  # budget spent; Lightning evaluates once more before it stops

    def update(self, online: nn.Module, target: nn.Module, batch):
        """One gradient step on the TD loss of `batch`; writes its TD errors back as priorities; syncs θ⁻ on schedule.

        Returns the loss's output and the gradient's norm before clipping.
        """
        optimizer = self.optimizers()
        out = self.loss_fn(online, target, batch)
        if not torch.isfinite(out.loss):
            raise TrainingDiverged(
                f"loss is {out.loss.item()} at env step {self.env_steps} (update {self.num_updates + 1})"
            )
        optimizer.zero_grad()
        self.manual_backward(out.loss)
        grad_norm = self.clip_gradient()
        optimizer.step()
        self.buffer.update_priorities(batch.indices, out.td_error)
        self.num_updates += 1
        if self.num_updates % self.target_sync_interval_updates == 0:
            update_target(self.target_network, self.q_network, self.target_sync_tau)
        return out, grad_norm

    def clip_gradient(self) -> torch.Tensor:
        """Clips the gradient's norm to max_grad_norm, where that is set; returns the norm before clipping."""
        if self.max_grad_norm is None:
            return nn.utils.get_total_norm([p.grad for p in self.q_network.parameters() if p.grad is not None])
        return nn.utils.clip_grad_norm_(self.q_network.parameters(), self.max_grad_norm)

    def log_iteration(self, stats, updates: list) -> None:
        env_steps = self.env_steps
        now = time.perf_counter()
        then, steps_then = self._clock
        self._clock = (now, env_steps)
        metrics = {"train/epsilon": self.collector.epsilon, "train/lr": self.optimizer.param_groups[0]["lr"]}
        if stats.episode_returns:
            metrics["train/episode_return"] = float(np.mean(stats.episode_returns))
            metrics["train/episode_length"] = float(np.mean(stats.episode_lengths))
        if updates:  # warm-up iterations do no update: their steps/s would dwarf the rest
            outs, grad_norms = zip(*updates)
            metrics["train/loss"] = mean64([out.loss.detach() for out in outs])
            metrics["train/q_mean"] = mean64([out.q_taken.mean() for out in outs])
            metrics["train/grad_norm"] = mean64(grad_norms)
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
