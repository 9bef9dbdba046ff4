import numpy as np
import pytest
import torch

from rl_pipeline.buffers import UniformReplayBuffer
from rl_pipeline.validation import ConfigError


def add_numbered(buffer: UniformReplayBuffer, numbers) -> None:
    """Transition k has observation [k, -k], action k % 2, reward k, next observation [k + 1, -k - 1]."""
    k = np.asarray(numbers, dtype=np.float32)
    buffer.add(np.stack([k, -k], 1), k.astype(int) % 2, k, np.stack([k + 1, -k - 1], 1), np.zeros_like(k))


def test_wraps_around_overwriting_the_oldest():
    buffer = UniformReplayBuffer(capacity=4, batch_size=2)
    add_numbered(buffer, [0, 1, 2])
    add_numbered(buffer, [3, 4, 5])
    assert len(buffer) == 4
    assert buffer.cursor == 2
    assert buffer.storage.rewards.tolist() == [4, 5, 2, 3]
    assert buffer.storage.observations[:, 0].tolist() == [4, 5, 2, 3]


def test_samples_only_stored_transitions_with_fields_aligned():
    torch.manual_seed(0)
    buffer = UniformReplayBuffer(capacity=512, batch_size=256)
    add_numbered(buffer, [10, 11, 12])
    batch = buffer.sample()
    assert set(batch.rewards.tolist()) == {10.0, 11.0, 12.0}
    assert torch.equal(batch.observations[:, 0], batch.rewards)
    assert torch.equal(batch.next_observations[:, 0], batch.rewards + 1)
    assert torch.equal(batch.actions, batch.rewards.long() % 2)


def test_sample_shapes_and_dtypes():
    buffer = UniformReplayBuffer(capacity=100, batch_size=32)
    add_numbered(buffer, range(50))
    batch = buffer.sample()
    assert batch.observations.shape == (32, 2) and batch.observations.dtype == torch.float32
    assert batch.actions.shape == (32,) and batch.actions.dtype == torch.int64
    assert batch.rewards.shape == batch.terminated.shape == (32,)
    assert batch.terminated.dtype == torch.float32


def test_storage_is_preallocated_once_at_capacity():
    buffer = UniformReplayBuffer(capacity=64, batch_size=4)
    add_numbered(buffer, [0])
    storage = buffer.storage.observations
    for start in range(1, 100, 33):
        add_numbered(buffer, range(start, start + 33))
    assert buffer.storage.observations is storage
    assert storage.shape == (64, 2)


def test_sampling_frequencies_are_uniform():
    torch.manual_seed(0)
    buffer = UniformReplayBuffer(capacity=40_000, batch_size=40_000)
    add_numbered(buffer, range(4))
    counts = torch.bincount(buffer.sample().rewards.long(), minlength=4)
    assert torch.allclose(counts / 40_000, torch.full((4,), 0.25), atol=0.01)


def test_refuses_more_transitions_at_once_than_it_holds():
    with pytest.raises(ValueError, match="capacity 4"):
        add_numbered(UniformReplayBuffer(capacity=4, batch_size=1), range(5))


@pytest.mark.parametrize(
    ("capacity", "batch_size", "key"),
    [(0, 1, "capacity"), (10, -1, "batch_size"), (4, 8, "batch_size"), ("many", 2, "capacity")],
)
def test_rejects_bad_sizes_naming_the_key(capacity, batch_size, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        UniformReplayBuffer(capacity=capacity, batch_size=batch_size)
