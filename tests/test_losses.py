import pytest
import torch
from torch import nn

from rl_pipeline.agents.dqn.loss import DQNLoss
from rl_pipeline.data.buffers import Batch


def linear(weight) -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight, dtype=torch.float32))
    return layer


# With s' = [1, 2]: the target net (identity) gives Q⁻(s') = [1, 2]; the online net (swap) gives Q(s') = [2, 1].
TARGET_NET = linear([[1.0, 0.0], [0.0, 1.0]])
ONLINE_NET = linear([[0.0, 1.0], [1.0, 0.0]])


def batch(terminated, steps=None, weights=None) -> Batch:
    n = len(terminated)
    return Batch(
        observations=torch.tensor([[3.0, 5.0]] * n),  # Q(s) = [5, 3]
        actions=torch.zeros(n, dtype=torch.int64),
        rewards=torch.ones(n),
        next_observations=torch.tensor([[1.0, 2.0]] * n),
        terminated=torch.tensor(terminated, dtype=torch.float32),
        steps=torch.tensor(steps or [1] * n),
        weights=torch.tensor(weights or [1.0] * n),
    )


def test_td_target_bootstraps_from_the_target_networks_max():
    # y = r + γ max_a Q⁻(s', a) = 1 + 0.5 * 2
    loss = DQNLoss(gamma=0.5)
    assert loss.td_target(ONLINE_NET, TARGET_NET, batch([0.0])).tolist() == [2.0]


def test_double_dqn_evaluates_the_online_argmax_with_the_target_network():
    # a* = argmax Q(s') = 0, y = r + γ Q⁻(s', 0) = 1 + 0.5 * 1
    loss = DQNLoss(gamma=0.5, double_dqn=True)
    assert loss.td_target(ONLINE_NET, TARGET_NET, batch([0.0])).tolist() == [1.5]


@pytest.mark.parametrize("double_dqn", [False, True])
def test_terminated_transition_does_not_bootstrap_but_truncated_does(double_dqn):
    # The buffer stores `terminated`, not `terminated or truncated`: a time-limit end is the second row.
    loss = DQNLoss(gamma=0.5, double_dqn=double_dqn)
    bootstrapped = 1.5 if double_dqn else 2.0
    assert loss.td_target(ONLINE_NET, TARGET_NET, batch([1.0, 0.0])).tolist() == [1.0, bootstrapped]


def test_loss_td_error_and_q_values_by_hand():
    # Q(s, 0) = 5, y = 2: TD error -3; Huber: |δ| - 0.5 = 2.5; squared: 9.
    out = DQNLoss(gamma=0.5, loss="huber")(ONLINE_NET, TARGET_NET, batch([0.0]))
    assert out.q_taken.tolist() == [5.0]
    assert out.errors.tolist() == [-3.0]
    assert out.loss.item() == 2.5
    assert DQNLoss(gamma=0.5, loss="mse")(ONLINE_NET, TARGET_NET, batch([0.0])).loss.item() == 9.0


def test_an_n_step_transition_bootstraps_with_gamma_to_the_n():
    # Rewards already summed over k steps; y = R + γᵏ max_a Q⁻(s', a) = 1 + 0.5³ * 2, and 1 + 0.5 * 2 for k = 1.
    loss = DQNLoss(gamma=0.5)
    assert loss.td_target(ONLINE_NET, TARGET_NET, batch([0.0, 0.0, 1.0], steps=[3, 1, 3])).tolist() == [1.25, 2.0, 1.0]


def test_importance_weights_scale_each_samples_loss():
    # Squared errors 9 and 9, weighted 1 and 0.5: (9 + 4.5) / 2; the TD errors are not weighted.
    out = DQNLoss(gamma=0.5, loss="mse")(ONLINE_NET, TARGET_NET, batch([0.0, 0.0], weights=[1.0, 0.5]))
    assert out.loss.item() == 6.75 and out.errors.tolist() == [-3.0, -3.0]


def test_gradient_flows_only_into_the_online_network():
    online, target = linear([[0.0, 1.0], [1.0, 0.0]]), linear([[1.0, 0.0], [0.0, 1.0]])
    DQNLoss()(online, target, batch([0.0])).loss.backward()
    assert online.weight.grad is not None and target.weight.grad is None


@pytest.mark.parametrize(("kwargs", "key"), [({"gamma": 1.5}, "gamma"), ({"loss": "l1"}, "loss"), ({"double_dqn": "yes"}, "double_dqn")])
def test_rejects_bad_arguments_naming_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}: expected"):
        DQNLoss(**kwargs)
