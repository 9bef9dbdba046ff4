"""C51's loss by hand: the projection onto the atoms (on an atom, between two, on and beyond the bounds),
the target distribution, the cross-entropy and the Q-values."""

import math

import pytest
import torch
from test_qrdqn import Fixed, batch

from rl_pipeline.agents.c51.loss import CategoricalLoss, CategoricalMean, project
from rl_pipeline.errors import ConfigError

SUPPORT = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0])


def projected(*atoms_and_masses) -> list[float]:
    """The projection of point masses [(where, mass), ...] onto SUPPORT."""
    where, mass = zip(*atoms_and_masses)
    return project(torch.tensor([mass]), torch.tensor([where]), SUPPORT).squeeze(0).tolist()


def test_mass_that_lands_exactly_on_an_atom_stays_whole_there():
    assert projected((2.0, 1.0)) == [0, 0, 1, 0, 0]
    assert projected((1.0, 0.3), (3.0, 0.7)) == pytest.approx([0, 0.3, 0, 0.7, 0])


def test_mass_between_two_atoms_splits_by_its_distance_to_each():
    assert projected((2.25, 1.0)) == pytest.approx([0, 0, 0.75, 0.25, 0])
    assert projected((0.5, 0.4), (0.9, 0.6)) == pytest.approx([0.4 * 0.5 + 0.6 * 0.1, 0.4 * 0.5 + 0.6 * 0.9, 0, 0, 0])


def test_mass_on_the_bounds_stays_there_and_mass_beyond_them_is_clipped_to_them():
    assert projected((0.0, 1.0)) == [1, 0, 0, 0, 0]
    assert projected((4.0, 1.0)) == [0, 0, 0, 0, 1]
    assert projected((-3.0, 0.5), (7.5, 0.5)) == [0.5, 0, 0, 0, 0.5]


def test_the_projection_keeps_every_bit_of_mass():
    torch.manual_seed(0)
    probabilities = torch.rand(64, 5).softmax(dim=1)
    shifted = torch.randn(64, 5) * 4 + 2
    torch.testing.assert_close(project(probabilities, shifted, SUPPORT).sum(dim=1), torch.ones(64))


def loss(**kwargs) -> CategoricalLoss:
    return CategoricalLoss(gamma=0.5, num_atoms=5, v_min=0.0, v_max=4.0, **kwargs)


def logits_of(*distributions) -> list:
    """Logits whose softmax is each distribution (zero probabilities as -inf's stand-in)."""
    return [[math.log(p) if p > 0 else -1e9 for p in d] for d in distributions]


def test_the_target_moves_the_greedy_actions_atoms_by_the_bellman_operator_and_projects_them():
    # Q⁻(s', ·): action 0 all at z = 2 (Q 2), action 1 half at 0, half at 4 (Q 2 too; argmax takes the first)
    target = Fixed(logits_of([0, 0, 1, 0, 0], [0.5, 0, 0, 0, 0.5]))
    online = Fixed(logits_of([1, 0, 0, 0, 0], [0, 0, 0, 0, 1]))  # double DQN's a* = 1
    # r + γ z with r = 1, γ = 0.5: z = 2 -> 2; z = 0 -> 1, z = 4 -> 3
    assert loss().target_distribution(online, target, batch()).tolist()[0] == pytest.approx([0, 0, 1, 0, 0])
    assert loss(double_dqn=True).target_distribution(online, target, batch()).tolist()[0] == pytest.approx(
        [0, 0.5, 0, 0.5, 0])
    terminated = loss().target_distribution(online, target, batch(terminated=(1.0,)))
    assert terminated.tolist()[0] == pytest.approx([0, 1, 0, 0, 0])  # all of it at r
    three_steps = loss().target_distribution(online, target, batch(steps=(3,)))  # 1 + 0.125 * 2 = 1.25
    assert three_steps.tolist()[0] == pytest.approx([0, 0.75, 0.25, 0, 0])


def test_the_loss_is_the_weighted_cross_entropy_and_priorities_its_kl_divergence():
    uniform = Fixed([[0.0] * 5, [0.0] * 5])  # p = 1/5 everywhere: Q = 2
    target = Fixed(logits_of([0, 0, 1, 0, 0], [0, 0, 1, 0, 0]))
    out = loss()(uniform, target, batch(rewards=(1.0, 1.0), terminated=(0.0, 1.0), steps=(1, 1),
                                        weights=(1.0, 0.5), actions=(0, 1)))
    # m is one-hot for both samples: cross-entropy log 5 each, and so is the KL divergence (m's entropy is 0)
    assert out.loss.item() == pytest.approx((1.0 + 0.5) * math.log(5) / 2)
    assert out.errors.tolist() == pytest.approx([math.log(5)] * 2)
    assert out.q_taken.tolist() == pytest.approx([2.0, 2.0])


def test_q_values_are_the_distributions_mean():
    head = CategoricalMean(SUPPORT)
    q_values = head(torch.tensor([logits_of([0, 0, 0, 0, 1], [0.5, 0.5, 0, 0, 0])]))
    assert q_values.squeeze(0).tolist() == pytest.approx([4.0, 0.5])
    assert loss().output_shape(3) == (3, 5)


@pytest.mark.parametrize(("kwargs", "key"), [({"num_atoms": 1}, "num_atoms"), ({"v_min": 5.0, "v_max": 5.0}, "v_min")])
def test_a_support_that_is_no_range_of_atoms_is_refused(kwargs, key):
    with pytest.raises(ConfigError, match=f"^{key}: expected"):
        CategoricalLoss(**kwargs)
