"""Frame storage for stacked pixel observations: each frame kept once, however many observations hold it.

With 4 stacked frames, an observation shares 3 frames with the one before it, and a transition's
next observation is a later transition's observation. Storing whole observations would keep each
frame up to 8 times; the store keeps it once and hands out slot numbers instead: an observation is
`stack_size` slots, and reading it back gathers those frames.

Each env's stream is matched on the way in. An observation that equals one of the env's recent
ones reuses its slots; one that is the newest shifted by one frame reuses all but its last frame;
anything else (an episode's first observation) stores its distinct frames. Slots are reference
counted: a frame is freed when no stored transition, and no recent observation, holds it.
"""

from collections import deque

import numpy as np
import torch

from rl_pipeline.errors import FrameStoreFull


class FrameStore:
    def __init__(self, capacity: int, history: int = 8):
        self.capacity = capacity  # frames
        self.history = history  # recent observations remembered per env, for matching
        self.frames: torch.Tensor | None = None  # [capacity, *frame_shape], allocated on the first store
        self.refcount = np.zeros(capacity, dtype=np.int32)
        self.free = np.arange(capacity - 1, -1, -1, dtype=np.int64)  # a stack of free slots; top at the end
        self.num_free = capacity
        self.recent: dict[int, deque] = {}  # env id -> slot arrays of its latest observations, oldest first

    @property
    def nbytes(self) -> int:
        frames = 0 if self.frames is None else self.frames.nbytes
        return frames + self.refcount.nbytes + self.free.nbytes

    def store(self, observations: np.ndarray, env_ids: np.ndarray) -> torch.Tensor:
        """Slots [batch, stack_size] of each observation [stack_size, *frame_shape]; each holds a reference."""
        if self.frames is None:
            self.frames = torch.zeros((self.capacity, *observations.shape[2:]), dtype=torch.as_tensor(observations).dtype)
        slots = np.stack([self._store_one(obs, int(env)) for obs, env in zip(observations, env_ids)])
        np.add.at(self.refcount, slots.ravel(), 1)
        return torch.as_tensor(slots)

    def load(self, slots: torch.Tensor) -> torch.Tensor:
        return self.frames[slots]

    def release(self, slots) -> None:
        slots = np.asarray(slots).ravel()
        np.subtract.at(self.refcount, slots, 1)
        freed = np.unique(slots[self.refcount[slots] == 0])
        self.free[self.num_free : self.num_free + len(freed)] = freed
        self.num_free += len(freed)

    def _store_one(self, observation: np.ndarray, env: int) -> np.ndarray:
        recent = self.recent.setdefault(env, deque())
        frames = self.frames.numpy()
        newest = recent[-1] if recent else None
        # The usual cases first: the newest observation again, or it shifted by one new frame.
        if newest is not None and np.array_equal(frames[newest], observation):
            return newest
        if newest is not None and np.array_equal(frames[newest[1:]], observation[:-1]):
            slots = np.append(newest[1:], self._allocate(observation[-1]))
        else:
            for slots in recent:  # an n-step transition's s: it arrived n steps ago as an s'
                if np.array_equal(frames[slots], observation):
                    return slots
            slots = self._store_frames(observation, recent)
        np.add.at(self.refcount, slots, 1)  # the recent list's own reference
        recent.append(slots)
        if len(recent) > self.history:
            self.release(recent.popleft())
        return slots

    def _store_frames(self, observation: np.ndarray, recent: deque) -> np.ndarray:
        """Frame by frame: reuse any equal frame of the env's recent observations, store the rest.

        (Around an episode's start: its first stack repeats the reset frame, and with n-step returns
        the first next-observation arrives before the observations between.)
        """
        known = np.unique(np.concatenate(recent)) if recent else np.empty(0, dtype=np.int64)
        slots = np.empty(len(observation), dtype=np.int64)
        for i, frame in enumerate(observation):
            equal = known[(self.frames.numpy()[known] == frame).all(axis=tuple(range(1, frame.ndim + 1)))]
            slots[i] = equal[0] if len(equal) else self._allocate(frame)
            known = np.append(known, slots[i])
        return slots

    def _allocate(self, frame: np.ndarray) -> int:
        if self.num_free == 0:
            raise FrameStoreFull(
                f"all {self.capacity} frame slots are in use: episodes too short for frame storage; "
                "use a buffer without dedup_frames"
            )
        self.num_free -= 1
        slot = int(self.free[self.num_free])
        self.frames[slot] = torch.as_tensor(frame)
        return slot

    def state_dict(self) -> dict:
        return {
            "frames": self.frames,
            "refcount": self.refcount,
            "free": self.free,
            "num_free": self.num_free,
            "recent": {env: list(slots) for env, slots in self.recent.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.frames, self.refcount, self.free, self.num_free = (
            state["frames"], state["refcount"], state["free"], state["num_free"]
        )
        self.recent = {env: deque(slots) for env, slots in state["recent"].items()}
