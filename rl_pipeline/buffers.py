"""Replay buffers: circular storage in preallocated tensors, sampled in batches."""

from dataclasses import dataclass, fields

import numpy as np
import torch

from rl_pipeline.validation import expected, positive_int


@dataclass
class Batch:
    observations: torch.Tensor
    actions: torch.Tensor  # int64
    rewards: torch.Tensor  # float32
    next_observations: torch.Tensor
    terminated: torch.Tensor  # float32: 1.0 where s' is terminal, 0.0 where the episode goes on or was truncated

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


class UniformReplayBuffer:
    """Keeps the last `capacity` transitions; samples `batch_size` of them uniformly with replacement.

    Storage is allocated on the first `add`, shaped and typed after what arrives, so the buffer
    needs no knowledge of the env.
    """

    def __init__(self, capacity: int, batch_size: int):
        self.capacity = positive_int("capacity", capacity)
        self.batch_size = positive_int("batch_size", batch_size)
        if batch_size > capacity:
            raise expected("batch_size", f"at most capacity ({capacity})", batch_size)
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
        return sum(getattr(self.storage, f.name).nbytes for f in fields(Batch))

    def state_dict(self) -> dict:
        return {"storage": self.storage, "cursor": self.cursor, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        self.storage, self.cursor, self.size = state["storage"], state["cursor"], state["size"]

    def add(self, observations, actions, rewards, next_observations, terminated) -> None:
        """Append a batch of transitions (numpy arrays with a leading batch dimension)."""
        incoming = Batch(
            torch.as_tensor(np.asarray(observations)),
            torch.as_tensor(np.asarray(actions), dtype=torch.int64),
            torch.as_tensor(np.asarray(rewards), dtype=torch.float32),
            torch.as_tensor(np.asarray(next_observations)),
            torch.as_tensor(np.asarray(terminated), dtype=torch.float32),
        )
        count = len(incoming.actions)
        if count > self.capacity:
            raise ValueError(f"cannot add {count} transitions at once to a buffer of capacity {self.capacity}")
        if self.storage is None:
            self.storage = self._allocate(incoming)
        indices = (self.cursor + torch.arange(count)) % self.capacity
        for field in fields(Batch):
            getattr(self.storage, field.name)[indices] = getattr(incoming, field.name)
        self.cursor = (self.cursor + count) % self.capacity
        self.size = min(self.size + count, self.capacity)

    def sample(self) -> Batch:
        if self.size == 0:
            raise RuntimeError("cannot sample from an empty replay buffer")
        indices = torch.randint(self.size, (self.batch_size,))
        return Batch(*(getattr(self.storage, f.name)[indices] for f in fields(Batch)))

    def _allocate(self, example: Batch) -> Batch:
        return Batch(
            *(
                torch.zeros((self.capacity, *value.shape[1:]), dtype=value.dtype)
                for value in (getattr(example, f.name) for f in fields(Batch))
            )
        )
