import math

import pytest
import torch

from egspo.rl.advantages import group_advantages, stepwise_advantages, zero_variance_groups

# One group of G=3 (r = 2, 0, 1; mean 1) plus a constant group that must stay at zero.
REWARDS = torch.tensor([2.0, 0.0, 1.0, 5.0, 5.0, 5.0])
GREEDY = torch.tensor([[1.0, 2.0], [0.0, 1.0], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]])
# d = r - r_hat = [[1, 0], [0, -1], [0, 0]] in the first group


def _close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=torch.float32), rtol=1e-5, atol=1e-6)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 2.0, 3.0])
    _close(group_advantages(r, 2), [0.5, -0.5, -0.5, 0.5])
    s = 0.5 / (math.sqrt(0.5) + 1e-4)  # unbiased std of (1, 0) is sqrt(0.5)
    _close(group_advantages(r, 2, scale=True), [s, -s, -s, s])
    with pytest.raises(ValueError, match="groups"):
        group_advantages(r, 3)


def test_stepwise_lambda_zero_is_sequence_advantage():
    for center in (True, False):
        adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.0, center_step_term=center)
        _close(adv, [[1, 1], [-1, -1], [0, 0], [0, 0], [0, 0], [0, 0]])


def test_stepwise_centered_normalized():
    # R = (r + 0.5 d) / 1.5: col0 = 5/3, 0, 2/3 (mean 7/9); col1 = 4/3, -1/3, 2/3 (mean 5/9)
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5)
    _close(adv, [[8 / 9, 7 / 9], [-7 / 9, -8 / 9], [-1 / 9, 1 / 9], [0, 0], [0, 0], [0, 0]])


def test_stepwise_centered_unnormalized():
    # R = r + 0.5 d: col0 = 2.5, 0, 1 (mean 7/6); col1 = 2, -0.5, 1 (mean 5/6)
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5, normalize_returns=False)
    _close(adv, [[4 / 3, 7 / 6], [-7 / 6, -4 / 3], [-1 / 6, 1 / 6], [0, 0], [0, 0], [0, 0]])


def test_stepwise_centered_scaled():
    # col0 deviations 8/9, -7/9, -1/9: unbiased var (64 + 49 + 1) / 81 / 2 -> std sqrt(57) / 9
    std0 = math.sqrt(57) / 9
    # col1 deviations 7/9, -8/9, 1/9: same std
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5, scale_rewards=True)
    expected = [[8 / 9, 7 / 9], [-7 / 9, -8 / 9], [-1 / 9, 1 / 9]]
    _close(adv[:3], [[v / (std0 + 1e-4) for v in row] for row in expected])
    _close(adv[3:], [[0, 0]] * 3)


def test_stepwise_uncentered_step_term():
    # (r - mean r) = 1, -1, 0 plus 0.5 d uncentered
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5, center_step_term=False)
    _close(adv, [[1.0, 2 / 3], [-2 / 3, -1.0], [0, 0], [0, 0], [0, 0], [0, 0]])
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5, normalize_returns=False, center_step_term=False)
    _close(adv, [[1.5, 1.0], [-1.0, -1.5], [0, 0], [0, 0], [0, 0], [0, 0]])
    # scaling touches only the centered r part: std of (2, 0, 1) is 1
    s = 1 / (1 + 1e-4)
    adv = stepwise_advantages(REWARDS, GREEDY, 3, 0.5, center_step_term=False, scale_rewards=True)
    _close(adv[:3], [[(s + 0.5) / 1.5, s / 1.5], [-s / 1.5, (-s - 0.5) / 1.5], [0, 0]])


def test_padded_slots_are_left_out_of_the_slot_baseline():
    greedy = GREEDY.clone()
    greedy[1, 1] = float("nan")  # never scored: padded slot
    weights = torch.ones(6, 2)
    weights[1, 1] = 0.0
    adv = stepwise_advantages(REWARDS, greedy, 3, 0.5, weights=weights)
    # col1 over rows 0 and 2 only: R = 4/3, 2/3 -> mean 1
    _close(adv[:3], [[8 / 9, 1 / 3], [-7 / 9, 0.0], [-1 / 9, -1 / 3]])
    assert torch.isfinite(adv).all() and adv[1, 1].item() == 0.0
    adv = stepwise_advantages(REWARDS, greedy, 3, 0.5, center_step_term=False, weights=weights)
    _close(adv[:3], [[1.0, 2 / 3], [-2 / 3, 0.0], [0, 0]])
    adv = stepwise_advantages(REWARDS, greedy, 3, 0.5, scale_rewards=True, weights=weights)
    assert torch.isfinite(adv).all()


def test_zero_variance_groups():
    assert zero_variance_groups(REWARDS, 3) == 1
    assert zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 2.0, 3.0, 3.0]), 2) == 2
