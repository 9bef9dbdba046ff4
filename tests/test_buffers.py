import copy

import numpy as np
import pytest
import torch

from rl_pipeline.data.buffers import PrioritizedReplayBuffer, SumTree, Transitions, UniformReplayBuffer
from rl_pipeline.errors import ConfigError


def add_numbered(buffer: UniformReplayBuffer, numbers) -> None:
    """Transition k has observation [k, -k], action k % 2, reward k, next observation [k + 1, -k - 1]."""
    k = np.asarray(numbers, dtype=np.float32)
    buffer.add(Transitions(np.stack([k, -k], 1), k.astype(int) % 2, k, np.stack([k + 1, -k - 1], 1), np.zeros_like(k)))


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


def test_sum_tree_total_follows_updates_and_overwrites():
    tree = SumTree(capacity=5)  # 8 leaves; 3 never used
    tree.update(np.arange(5), np.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    assert tree.total == 15.0
    tree.update(np.array([0, 4, 4]), np.array([10.0, 0.5, 0.5]))  # a repeated index counts once
    assert tree.total == 10.0 + 2.0 + 3.0 + 4.0 + 0.5
    assert tree[np.array([0, 4])].tolist() == [10.0, 0.5]


def test_sum_tree_finds_the_leaf_whose_interval_holds_each_value():
    tree = SumTree(capacity=4)
    tree.update(np.arange(4), np.array([1.0, 0.0, 2.0, 3.0]))  # intervals [0,1) [1,1) [1,3) [3,6)
    assert tree.find(np.array([0.0, 0.99, 1.0, 2.5, 3.0, 5.99])).tolist() == [0, 0, 2, 2, 3, 3]


def test_sum_tree_sampling_frequencies_match_priorities():
    # 200,000 draws: each frequency's standard error is at most 0.0011; the tolerance is 5 of them.
    rng = np.random.default_rng(0)
    priorities = np.array([1.0, 2.0, 0.0, 3.0, 4.0, 10.0])
    tree = SumTree(capacity=len(priorities))
    tree.update(np.arange(len(priorities)), priorities)
    leaves = tree.find(rng.uniform(0, tree.total, size=200_000))
    frequencies = np.bincount(leaves, minlength=len(priorities)) / len(leaves)
    np.testing.assert_allclose(frequencies, priorities / priorities.sum(), atol=0.0055)


def test_prioritized_new_transitions_get_the_max_priority_and_updates_follow_td_errors():
    buffer = PrioritizedReplayBuffer(capacity=4, batch_size=2, alpha=0.5, epsilon=7.0)
    add_numbered(buffer, [0, 1])
    assert buffer.tree[np.arange(4)].tolist() == [1.0, 1.0, 0.0, 0.0]
    buffer.update_priorities(torch.tensor([0, 1]), torch.tensor([-9.0, 2.0]))  # p = (|δ| + ε)^α
    assert buffer.tree[np.arange(2)].tolist() == [4.0, 3.0] and buffer.max_priority == 4.0
    add_numbered(buffer, [2, 3, 4])  # 4 overwrites slot 0
    assert buffer.tree[np.arange(4)].tolist() == [4.0, 3.0, 4.0, 4.0]
    assert buffer.tree.total == 15.0


def test_prioritized_importance_weights_by_hand():
    torch.manual_seed(0)
    buffer = PrioritizedReplayBuffer(capacity=64, batch_size=64, alpha=1.0, beta_start=0.5, beta_steps=100, epsilon=0.5)
    add_numbered(buffer, [0, 1, 2, 3])
    buffer.update_priorities(torch.arange(4), torch.tensor([0.5, 1.5, 2.5, 3.5]))  # P = 0.1, 0.2, 0.3, 0.4
    batch = buffer.sample(env_steps=50)  # β = 0.5 + 0.5 * 50 / 100 = 0.75
    assert torch.equal(batch.rewards.long(), batch.indices)  # fields gathered from the sampled slots
    probabilities = (batch.indices + 1).double() / 10
    expected = (4 * probabilities) ** -0.75
    assert torch.allclose(batch.weights.double(), expected / expected.max(), atol=1e-6)
    assert set(batch.indices.tolist()) == {0, 1, 2, 3}
    assert buffer.beta(200) == 1.0  # held at 1 past the budget


def test_prioritized_sampling_frequencies_match_priorities():
    torch.manual_seed(0)
    buffer = PrioritizedReplayBuffer(capacity=50_000, batch_size=50_000, alpha=1.0, epsilon=0.5)
    add_numbered(buffer, range(4))
    buffer.update_priorities(torch.arange(4), torch.tensor([0.5, 1.5, 2.5, 3.5]))
    frequencies = torch.bincount(buffer.sample().indices, minlength=4) / 50_000
    # Stratified: each of the 50,000 slices draws once, so the frequencies are within 1/50,000 of P.
    assert torch.allclose(frequencies, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=1e-4)


def test_uniform_samples_carry_their_slots_and_unit_weights():
    buffer = UniformReplayBuffer(capacity=16, batch_size=16)
    add_numbered(buffer, range(5))
    batch = buffer.sample()
    assert torch.equal(batch.rewards.long(), batch.indices) and torch.equal(batch.weights, torch.ones(16))


def frame_stream(num_frames: int, stack_size: int = 4, episode_starts=(0,), seed: int = 0):
    """A stack-of-frames observation per step, as FrameStackObservation gives: an episode's first stack repeats its first frame."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(num_frames, 6, 5), dtype=np.uint8)
    observations = []
    for t in range(num_frames):
        start = max(s for s in episode_starts if s <= t)
        observations.append(frames[[max(start, t - stack_size + 1 + j) for j in range(stack_size)]])
    return np.stack(observations)


@pytest.mark.parametrize("n_step", [1, 3])
def test_dedup_frames_stores_each_frame_once_and_gives_back_the_observations(n_step):
    # Two envs' streams, interleaved as the collector adds them; env 1 starts a new episode at step 10.
    streams = [frame_stream(30, seed=0), frame_stream(30, episode_starts=(0, 10), seed=1)]
    buffer = UniformReplayBuffer(capacity=200, batch_size=8, dedup_frames=True)
    for t in range(30 - n_step):
        for env, stream in enumerate(streams):
            if env == 1 and 10 - n_step <= t < 10:
                continue  # the n-step window must not cross env 1's episode end
            buffer.add(Transitions(stream[[t]], [0], [0.0], stream[[t + n_step]], [False], [n_step], np.array([env])))
    distinct = len(np.unique(np.concatenate(streams).reshape(-1, 30), axis=0))
    assert buffer.frames.capacity - buffer.frames.num_free == distinct  # each frame once
    batch = buffer._gather(torch.arange(len(buffer)))
    expected = [(s[t], s[t + n_step]) for t in range(30 - n_step) for env, s in enumerate(streams)
                if not (env == 1 and 10 - n_step <= t < 10)]
    assert torch.equal(batch.observations, torch.as_tensor(np.stack([o for o, _ in expected])))
    assert torch.equal(batch.next_observations, torch.as_tensor(np.stack([n for _, n in expected])))
    assert batch.observations.dtype == torch.uint8


def test_dedup_frames_frees_the_frames_of_overwritten_transitions():
    stream = frame_stream(500)
    buffer = UniformReplayBuffer(capacity=50, batch_size=8, dedup_frames=True)
    for t in range(499):
        buffer.add(Transitions(stream[[t]], [0], [0.0], stream[[t + 1]], [False]))
    # 50 transitions span 51 distinct frames (4-frame stacks overlap): 53 counts the 8 recent stacks' few more.
    assert buffer.frames.capacity - buffer.frames.num_free <= 50 + 3 + 8
    batch = buffer._gather(torch.arange(50))
    newest = [(t % 50, t) for t in range(449, 499)]
    for slot, t in newest:
        assert torch.equal(batch.observations[slot], torch.as_tensor(stream[t]))
        assert torch.equal(batch.next_observations[slot], torch.as_tensor(stream[t + 1]))


def test_dedup_frames_bytes_per_transition_are_about_one_frame():
    frames = np.random.default_rng(0).integers(0, 256, size=(10_004, 84, 84), dtype=np.uint8)
    buffer = UniformReplayBuffer(capacity=10_000, batch_size=8, dedup_frames=True)
    for t in range(10_000):
        buffer.add(Transitions(frames[None, t : t + 4], [0], [0.0], frames[None, t + 1 : t + 5], [False]))
    # The frame store's slack (1/16 and 1,024 frames) and the slot numbers: under 1.3 frames a transition,
    # where whole stacks would take 4 frames, and s' beside s 8.
    assert buffer.nbytes / buffer.capacity < 1.3 * 84 * 84


def test_dedup_frames_buffer_state_round_trips_and_goes_on_storing_each_frame_once():
    stream = frame_stream(40)
    original = UniformReplayBuffer(capacity=16, batch_size=4, dedup_frames=True)
    for t in range(20):
        original.add(Transitions(stream[[t]], [0], [0.0], stream[[t + 1]], [False]))
    restored = UniformReplayBuffer(capacity=16, batch_size=4, dedup_frames=True)
    restored.load_state_dict(copy.deepcopy(original.state_dict()))
    for buffer in (original, restored):
        for t in range(20, 39):
            buffer.add(Transitions(stream[[t]], [0], [0.0], stream[[t + 1]], [False]))
    everything = torch.arange(16)
    assert torch.equal(restored._gather(everything).observations, original._gather(everything).observations)
    assert restored.frames.num_free == original.frames.num_free
