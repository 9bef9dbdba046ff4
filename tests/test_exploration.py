import numpy as np
import pytest
import torch

from rl_pipeline.agents.exploration import EpsilonGreedy, NoisyNets, epsilon_greedy
from rl_pipeline.agents.networks import MLP
from rl_pipeline.errors import ConfigError


def test_epsilon_anneals_linearly_over_its_fraction_of_the_budget_then_holds():
    exploration = EpsilonGreedy(max_env_steps=1000, epsilon_start=1.0, epsilon_end=0.1, epsilon_fraction=0.5)
    assert exploration.epsilon(0) == 1.0
    assert exploration.epsilon(250) == pytest.approx(1.0 - 0.9 * 250 / 500)
    assert exploration.epsilon(500) == pytest.approx(0.1)
    assert exploration.epsilon(900) == pytest.approx(0.1)


@pytest.mark.parametrize(("key", "value"), [("epsilon_end", 1.5), ("epsilon_start", -0.1), ("epsilon_fraction", 2)])
def test_epsilon_settings_outside_zero_one_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: expected a number in \\[0, 1\\]"):
        EpsilonGreedy(max_env_steps=1000, **{key: value})


def test_greedy_actions_once_epsilon_is_zero():
    torch.manual_seed(0)
    q_network = MLP((4,), (2,), [8])
    observations = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    expected = q_network(torch.as_tensor(observations)).argmax(1).numpy()
    assert len(set(expected)) == 2  # both actions are someone's greedy one: a fixed action would not pass
    np.testing.assert_array_equal(epsilon_greedy(q_network, observations, 0.0, 2, torch.device("cpu")), expected)


def test_epsilon_one_acts_uniformly_at_random_without_asking_the_network():
    def network_never_asked(observations):
        raise AssertionError("a forward pass at ε = 1")

    torch.manual_seed(0)
    actions = epsilon_greedy(network_never_asked, np.zeros((4000, 4), np.float32), 1.0, 3, torch.device("cpu"))
    assert np.bincount(actions, minlength=3) == pytest.approx([4000 / 3] * 3, rel=0.1)


def test_epsilon_mixes_random_and_greedy_actions_in_its_proportion():
    torch.manual_seed(0)
    q_network = torch.nn.Linear(4, 10)
    observations = np.ones((10_000, 4), np.float32)  # one greedy action for all
    greedy = int(q_network(torch.ones(1, 4)).argmax())
    actions = epsilon_greedy(q_network, observations, 0.3, 10, torch.device("cpu"))
    # greedy: 70%, plus the random draws that land on it (3%)
    assert np.mean(actions == greedy) == pytest.approx(0.7 + 0.3 / 10, abs=0.015)


def test_noisy_exploration_needs_noisy_layers_and_takes_no_random_action():
    with pytest.raises(ConfigError, match=r"^exploration: noisy exploration needs a network with noisy layers"):
        NoisyNets().check_network(MLP((4,), (2,), [8]))
    NoisyNets().check_network(MLP((4,), (2,), [8], noisy=True))
    assert NoisyNets().epsilon(0) == 0.0


def test_noisy_exploration_draws_fresh_noise_before_each_act_step():
    network = MLP((4,), (2,), [8], noisy=True)
    before = [b.clone() for b in network.buffers()]
    NoisyNets().perturb(network)
    assert all(not torch.equal(b, a) for b, a in zip(before, network.buffers()))
