import math

import pytest
import torch

from rl_pipeline.agents.networks import MLP
from rl_pipeline.agents.noisy import NoisyLinear, noisy_layers, resample_noise


def test_training_mode_computes_with_mean_plus_sigma_times_noise_and_eval_mode_with_the_mean_alone():
    torch.manual_seed(0)
    layer = NoisyLinear(3, 2)
    x = torch.randn(5, 3)
    weight = layer.weight_mu + layer.weight_sigma * layer.weight_epsilon
    bias = layer.bias_mu + layer.bias_sigma * layer.bias_epsilon
    torch.testing.assert_close(layer(x), x @ weight.T + bias)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.T + layer.bias_mu)


def test_noise_is_factorised_into_one_draw_per_input_and_one_per_output():
    torch.manual_seed(0)
    layer = NoisyLinear(4, 3)
    f_out = layer.bias_epsilon  # εᵇ = f(ε_out)
    f_in = layer.weight_epsilon[0] / f_out[0]
    torch.testing.assert_close(layer.weight_epsilon, torch.outer(f_out, f_in))
    # f(x) = sgn(x) √|x|: f of a standard normal has E[f(x)²] = E|x| = √(2/π)
    torch.manual_seed(1)
    draws = torch.stack([NoisyLinear(1, 1000).bias_epsilon for _ in range(20)])
    assert draws.pow(2).mean().item() == pytest.approx(math.sqrt(2 / math.pi), rel=0.03)


def test_initialisation_follows_the_paper():
    layer = NoisyLinear(16, 4, sigma_0=0.5)
    bound = 1 / math.sqrt(16)
    assert layer.weight_mu.abs().max() <= bound and layer.bias_mu.abs().max() <= bound
    assert torch.all(layer.weight_sigma == 0.5 * bound) and torch.all(layer.bias_sigma == 0.5 * bound)


def test_resampling_changes_what_training_mode_computes_and_never_what_eval_mode_computes():
    torch.manual_seed(0)
    network = MLP((4,), (2,), [8, 8], noisy=True)
    x = torch.randn(5, 4)
    noisy_before = network(x)
    network.eval()
    mean_before = network(x)
    resample_noise(network)
    torch.testing.assert_close(network(x), mean_before, rtol=0, atol=0)
    network.train()
    assert not torch.allclose(network(x), noisy_before)


def test_every_linear_layer_of_a_noisy_network_is_noisy_dueling_streams_included():
    network = MLP((4,), (2,), [8, 8], dueling=True, noisy=True)
    assert not any(type(m) is torch.nn.Linear for m in network.modules())
    assert len(noisy_layers(network)) == 5  # one trunk layer, then two per stream


def test_the_noise_is_state_a_checkpoint_keeps():
    torch.manual_seed(0)
    network = MLP((4,), (2,), [8], noisy=True)
    restored = MLP((4,), (2,), [8], noisy=True)  # other weights, other noise
    restored.load_state_dict(network.state_dict())
    x = torch.randn(3, 4)
    torch.testing.assert_close(restored(x), network(x), rtol=0, atol=0)
