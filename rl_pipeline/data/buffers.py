"""Replay buffers: circular storage in preallocated tensors, sampled uniformly or by priority."""

from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import numpy as np
import torch

from rl_pipeline.data.frames import FrameStore
from rl_pipeline.data.schedule import linear_schedule
from rl_pipeline.validation import boolean, expected, positive_int, positive_number, probability


@dataclass
class Batch:
    observations: torch.Tensor
    actions: torch.Tensor  # int64
    rewards: torch.Tensor  # float32: r, or the discounted sum of n rewards for an n-step transition
    next_observations: torch.Tensor
    terminated: torch.Tensor  # float32: 1.0 where s' is terminal, 0.0 where the episode goes on or was truncated
    steps: torch.Tensor  # int64: env steps from s to s' (n, or fewer where the episode ended sooner)
    # Set by sampling only:
    indices: torch.Tensor | None = None  # where in the buffer each sample lives
    weights: torch.Tensor | None = None  # importance-sampling weights for the loss

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(None if v is None else v.to(device) for v in (getattr(self, f.name) for f in fields(self))))


class Transitions(NamedTuple):
    """What the collector hands over to be stored: arrays with a leading batch dimension."""

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray  # r, or the discounted sum of n rewards for an n-step transition
    next_observations: np.ndarray
    terminated: np.ndarray  # whether s' is terminal
    steps: np.ndarray | None = None  # env steps from s to s'; 1 each when None
    env_ids: np.ndarray | None = None  # which sub-env's stream each is from; 0 each when None


STORED = ("observations", "actions", "rewards", "next_observations", "terminated", "steps")


class UniformReplayBuffer:
    """Keeps the last `capacity` transitions; samples `batch_size` of them uniformly with replacement.

    Storage is allocated on the first `add`, shaped and typed after what arrives, so the buffer
    needs no knowledge of the env. With `dedup_frames`, observations of stacked frames (uint8
    pixels) keep each frame once in a FrameStore, and the transitions hold its slot numbers.
    """

    def __init__(self, capacity: int, batch_size: int, dedup_frames: bool = False):
        self.capacity = positive_int("capacity", capacity)
        self.batch_size = positive_int("batch_size", batch_size)
        if batch_size > capacity:
            raise expected("batch_size", f"at most capacity ({capacity})", batch_size)
        # Room for every transition's newest frame, plus episodes' last frames and each env's recent stacks.
        self.frames = FrameStore(capacity + capacity // 16 + 1024) if boolean("dedup_frames", dedup_frames) else None
        self.storage: Batch | None = None
        self.cursor = 0  # where the next transition is written
        self.size = 0

    def __len__(self) -> int:
        return self.size

    @property
    def nbytes(self) -> int:
        """Bytes of storage (0 until the first `add` allocates it)."""
        if self.storage is None:
            return 0
        frames = 0 if self.frames is None else self.frames.nbytes
        return frames + sum(getattr(self.storage, name).nbytes for name in STORED)

    def planned_nbytes(self, observation_shape: tuple[int, ...], observation_dtype) -> int:
        """Bytes the storage will take once full, for observations of this shape and dtype."""
        observation = int(np.prod(observation_shape)) * np.dtype(observation_dtype).itemsize
        scalars = 8 + 4 + 4 + 8  # action, reward, terminated, steps
        if self.frames is None:
            return self.capacity * (2 * observation + scalars)
        stack = observation_shape[0]
        slots = 2 * stack * 8  # the observation and the next one, as int64 slot numbers
        return self.capacity * (slots + scalars) + self.frames.capacity * (observation // stack)

    def state_dict(self) -> dict:
        frames = None if self.frames is None else self.frames.state_dict()
        return {"storage": self.storage, "cursor": self.cursor, "size": self.size, "frames": frames}

    def load_state_dict(self, state: dict) -> None:
        self.storage, self.cursor, self.size = state["storage"], state["cursor"], state["size"]
        if self.frames is not None:
            self.frames.load_state_dict(state["frames"])

    def add(self, transitions: Transitions) -> None:
        """Append a batch of transitions, overwriting the oldest once full."""
        observations, actions, rewards, next_observations, terminated, steps, env_ids = transitions
        count = len(actions)
        if count > self.capacity:
            raise ValueError(f"cannot add {count} transitions at once to a buffer of capacity {self.capacity}")
        indices = (self.cursor + torch.arange(count)) % self.capacity
        if self.frames is not None:
            env_ids = np.zeros(count, dtype=np.int64) if env_ids is None else env_ids
            overwritten = indices[indices < self.size]
            if len(overwritten):
                self.frames.release(self.storage.observations[overwritten])
                self.frames.release(self.storage.next_observations[overwritten])
            observations = self.frames.store(np.asarray(observations), env_ids)
            next_observations = self.frames.store(np.asarray(next_observations), env_ids)
        incoming = Batch(
            torch.as_tensor(np.asarray(observations)),
            torch.as_tensor(np.asarray(actions), dtype=torch.int64),
            torch.as_tensor(np.asarray(rewards), dtype=torch.float32),
            torch.as_tensor(np.asarray(next_observations)),
            torch.as_tensor(np.asarray(terminated), dtype=torch.float32),
            torch.ones(count, dtype=torch.int64) if steps is None else torch.as_tensor(np.asarray(steps), dtype=torch.int64),
        )
        if self.storage is None:
            self.storage = self._allocate(incoming)
        # A slice where the rows are contiguous: faster to write than a list of indices.
        rows = slice(self.cursor, self.cursor + count) if self.cursor + count <= self.capacity else indices
        for name in STORED:
            getattr(self.storage, name)[rows] = getattr(incoming, name)
        self.cursor = (self.cursor + count) % self.capacity
        self.size = min(self.size + count, self.capacity)
        self._added(indices)

    def sample(self, env_steps: int = 0) -> Batch:
        """`batch_size` transitions, uniformly with replacement, each with weight 1."""
        indices = torch.randint(self._sampleable(), (self.batch_size,))
        return replace(self._gather(indices), weights=torch.ones(self.batch_size))

    def update_priorities(self, indices: torch.Tensor, td_errors: torch.Tensor) -> None:
        """Uniform sampling has no priorities to update."""

    def _added(self, indices: torch.Tensor) -> None:
        """Hook for what a subclass keeps per stored transition."""

    def _sampleable(self) -> int:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        return self.size

    def _gather(self, indices: torch.Tensor) -> Batch:
        batch = Batch(*(getattr(self.storage, name)[indices] for name in STORED), indices=indices)
        if self.frames is None:
            return batch
        return replace(
            batch,
            observations=self.frames.load(batch.observations),
            next_observations=self.frames.load(batch.next_observations),
        )

    def _allocate(self, example: Batch) -> Batch:
        return Batch(
            *(torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype) for value in
              (getattr(example, name) for name in STORED))
        )


class SumTree:
    """Priorities in a binary tree whose every node holds the sum of its subtree.

    Node 1 is the root, node i has children 2i and 2i + 1, and the leaves (one per buffer slot)
    are nodes L .. 2L - 1. Updating and finding are O(log n) and vectorized over a batch.
    """

    def __init__(self, capacity: int):
        self.num_leaves = 1 << max(capacity - 1, 1).bit_length()
        self.depth = self.num_leaves.bit_length() - 1
        self.nodes = np.zeros(2 * self.num_leaves)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    def __getitem__(self, indices: np.ndarray) -> np.ndarray:
        return self.nodes[np.asarray(indices) + self.num_leaves]

    def update(self, indices: np.ndarray, priorities: np.ndarray) -> None:
        """Set leaves, then recompute their ancestors' sums level by level (exact, even for repeated indices)."""
        nodes = np.asarray(indices) + self.num_leaves
        self.nodes[nodes] = priorities
        for _ in range(self.depth):
            nodes = np.unique(nodes // 2)
            self.nodes[nodes] = self.nodes[2 * nodes] + self.nodes[2 * nodes + 1]

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each value v in [0, total), the leaf i with sum(p[:i]) <= v < sum(p[:i + 1])."""
        nodes = np.ones(len(prefix_sums), dtype=np.int64)
        values = np.asarray(prefix_sums, dtype=np.float64)
        for _ in range(self.depth):
            left = 2 * nodes
            # Never descend into an empty subtree, which rounding at a boundary could otherwise pick.
            go_right = (values >= self.nodes[left]) & (self.nodes[left + 1] > 0)
            values = np.where(go_right, values - self.nodes[left], values)
            nodes = np.where(go_right, left + 1, left)
        return nodes - self.num_leaves


class PrioritizedReplayBuffer(UniformReplayBuffer):
    """Proportional prioritized replay (Schaul et al., 2016): P(i) = p_i^α / Σ_k p_k^α.

    New transitions get the largest priority so far, so each is replayed at least once soon.
    Importance weights w_i = (N P(i))^-β, divided by the batch's largest, correct the bias; β
    anneals linearly from `beta_start` to 1 over `beta_steps` env steps (the run's budget).
    """

    def __init__(
        self,
        capacity: int,
        batch_size: int,
        alpha: float = 0.6,
        beta_start: float = 0.4,
        beta_steps: int = 100_000,
        epsilon: float = 1e-6,
        dedup_frames: bool = False,
    ):
        super().__init__(capacity, batch_size, dedup_frames)
        self.alpha = probability("alpha", alpha)
        self.beta_start = probability("beta_start", beta_start)
        self.beta_steps = positive_int("beta_steps", beta_steps)
        self.epsilon = positive_number("epsilon", epsilon)
        self.tree = SumTree(self.capacity)
        self.max_priority = 1.0  # of p^α

    def beta(self, env_steps: int) -> float:
        return linear_schedule(self.beta_start, 1.0, self.beta_steps, env_steps)

    def sample(self, env_steps: int = 0) -> Batch:
        """One sample from each of `batch_size` equal slices of the priority mass (stratified)."""
        size = self._sampleable()
        slices = (torch.arange(self.batch_size) + torch.rand(self.batch_size)).numpy()
        indices = self.tree.find(slices * (self.tree.total / self.batch_size))
        probabilities = self.tree[indices] / self.tree.total
        weights = (size * probabilities) ** -self.beta(env_steps)
        batch = self._gather(torch.as_tensor(indices))
        return replace(batch, weights=torch.as_tensor(weights / weights.max(), dtype=torch.float32))

    def update_priorities(self, indices: torch.Tensor, td_errors: torch.Tensor) -> None:
        priorities = (td_errors.abs().cpu().double().numpy() + self.epsilon) ** self.alpha
        self.tree.update(indices.cpu().numpy(), priorities)
        self.max_priority = max(self.max_priority, float(priorities.max()))

    def _added(self, indices: torch.Tensor) -> None:
        self.tree.update(indices.numpy(), np.full(len(indices), self.max_priority))

    def state_dict(self) -> dict:
        return {**super().state_dict(), "tree": self.tree.nodes, "max_priority": self.max_priority}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.tree.nodes, self.max_priority = state["tree"], state["max_priority"]
