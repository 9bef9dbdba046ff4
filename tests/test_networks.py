import copy

import pytest
import torch

from rl_pipeline.agents.networks import MLP, NatureCNN, update_target
from rl_pipeline.errors import ConfigError


@pytest.mark.parametrize("batch_size", [1, 5])
def test_mlp_maps_observations_to_one_q_value_per_action(batch_size):
    q_network = MLP(observation_shape=(4,), output_shape=(3,), hidden_sizes=[8, 8], activation="tanh")
    assert q_network(torch.zeros(batch_size, 4)).shape == (batch_size, 3)


def test_hard_sync_copies_the_online_weights_exactly():
    online = MLP((4,), (2,), [8])
    target = copy.deepcopy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    update_target(target, online, tau=1.0)
    assert all(torch.equal(t, o) for t, o in zip(target.parameters(), online.parameters()))


def test_polyak_sync_moves_tau_of_the_way():
    online, target = MLP((4,), (2,), [8]), MLP((4,), (2,), [8])
    before = [p.clone() for p in target.parameters()]
    update_target(target, online, tau=0.1)
    for t, b, o in zip(target.parameters(), before, online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"hidden_sizes": []}, "hidden_sizes"), ({"hidden_sizes": [8, 0]}, "hidden_sizes"), ({"activation": "swish"}, "activation")],
)
@pytest.mark.parametrize("dueling", [False, True])
def test_rejects_bad_arguments_naming_the_key(kwargs, key, dueling):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        MLP((4,), (2,), dueling=dueling, **kwargs)


@pytest.mark.parametrize("hidden_sizes", [[8], [16, 8]])
def test_dueling_q_values_are_value_plus_mean_centred_advantages(hidden_sizes):
    q_network = MLP(observation_shape=(4,), output_shape=(3,), hidden_sizes=hidden_sizes, dueling=True)
    observations = torch.randn(5, 4)
    features = q_network.trunk(observations)
    value, advantage = q_network.head.value(features), q_network.head.advantage(features)
    q_values = q_network(observations)
    assert q_values.shape == (5, 3) and value.shape == (5, 1)
    assert torch.allclose(q_values, value + advantage - advantage.mean(dim=1, keepdim=True))
    assert torch.allclose(q_values.mean(dim=1, keepdim=True), value, atol=1e-6)  # the advantages average to 0


@pytest.mark.parametrize("dueling", [False, True])
def test_nature_cnn_maps_stacked_uint8_frames_to_one_q_value_per_action(dueling):
    q_network = NatureCNN(observation_shape=(4, 84, 84), output_shape=(6,), dueling=dueling)
    frames = torch.randint(0, 256, (3, 4, 84, 84), dtype=torch.uint8)
    assert q_network(frames).shape == (3, 6)
    # It scales pixels itself: the same frames as floats in [0, 1] would be a different input.
    assert torch.equal(q_network(frames), q_network.head(q_network.trunk(frames.float() / 255)))


def test_nature_cnn_refuses_flat_observations_naming_the_key():
    with pytest.raises(ConfigError, match=r"^observation_shape: expected image observations"):
        NatureCNN(observation_shape=(4,), output_shape=(2,))


@pytest.mark.parametrize("dueling", [False, True])
@pytest.mark.parametrize("noisy", [False, True])
def test_networks_output_a_distribution_per_action_when_asked(dueling, noisy):
    assert MLP((4,), (3, 51), [16], dueling=dueling, noisy=noisy)(torch.zeros(5, 4)).shape == (5, 3, 51)
    frames = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)
    assert NatureCNN((4, 84, 84), (6, 51), 32, dueling=dueling, noisy=noisy)(frames).shape == (2, 6, 51)


def test_a_dueling_distribution_combines_its_streams_atom_by_atom():
    q_network = MLP(observation_shape=(4,), output_shape=(3, 5), hidden_sizes=[8], dueling=True)
    observations = torch.randn(2, 4)
    features = q_network.trunk(observations)
    value, advantage = q_network.head.value(features), q_network.head.advantage(features)
    assert value.shape == (2, 1, 5) and advantage.shape == (2, 3, 5)
    torch.testing.assert_close(q_network(observations), value + advantage - advantage.mean(dim=1, keepdim=True))


@pytest.mark.parametrize("shape", [(), 3, (3, 0)])
def test_an_output_shape_that_is_no_tuple_of_positive_sizes_is_refused(shape):
    with pytest.raises(ConfigError, match="^output_shape: expected"):
        MLP((4,), shape)
