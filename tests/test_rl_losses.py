import math

import pytest
import torch

from egspo.rl.losses import (
    clipped_surrogate,
    completion_token_mask,
    diffu_grpo_loss,
    diffu_grpo_masked_inputs,
    egspo_step_loss,
    kl_exact,
    kl_k3,
)


def _surrogate(delta: float, adv: float, lo: float, hi: float) -> float:
    ratio = math.exp(delta)
    return -min(ratio * adv, min(max(ratio, 1 - lo), 1 + hi) * adv)


def _k3(cur: float, ref: float) -> float:
    return math.exp(ref - cur) - (ref - cur) - 1


def _t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_clipped_surrogate_matches_scalar_reference():
    delta = [0.3, 0.6, -0.5, 0.6, -0.5]
    adv = [2.0, 1.0, -1.0, -1.0, 1.0]
    loss, clipped = clipped_surrogate(_t(delta), _t([0.0] * 5), _t(adv), 0.2, 0.5)
    # by hand: inside the range; clipped at 1.5; clipped at 0.8; rho*A smaller; rho*A smaller
    expected = [-2 * math.exp(0.3), -1.5, 0.8, math.exp(0.6), -math.exp(-0.5)]
    torch.testing.assert_close(loss, _t(expected))
    torch.testing.assert_close(loss, _t([_surrogate(d, a, 0.2, 0.5) for d, a in zip(delta, adv)]))
    assert clipped.tolist() == [False, True, True, False, False]


def test_kl_k3_known_values():
    # by hand, with r = pi_ref(a) / pi(a): k3 = r - log r - 1
    half, quarter = math.log(0.5), math.log(0.25)
    out = kl_k3(_t([half, quarter, half, -0.3]), _t([quarter, half, half, -0.3]))
    torch.testing.assert_close(out, _t([math.log(2) - 0.5, 1 - math.log(2), 0.0, 0.0]))
    assert kl_k3(_t([-0.3]), _t([-0.3])).item() == 0.0


# k3 checked against quantities that do not restate it. Mutations caught (tried): current and reference
# swapped, the "- 1" dropped, the sign of the linear term flipped, k2 = diff^2 / 2 in its place.
# A small categorical pi and a uniform reference; the two KL directions differ (0.438 vs 0.652 nats), so
# an estimator of the wrong one cannot pass. An independent quantity, not the k3 formula restated.
PI = [0.6, 0.3, 0.08, 0.02]
REF = [0.25, 0.25, 0.25, 0.25]


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_kl_k3_expectation_under_pi_is_kl_pi_ref():
    """k3 is an unbiased estimator of KL(pi || ref) for actions drawn from pi: its exact expectation (a sum
    over the 4 actions) equals KL(pi || ref), not KL(ref || pi)."""
    assert abs(_kl(PI, REF) - _kl(REF, PI)) > 0.2
    logp, logr = _t(PI).log(), _t(REF).log()
    expectation = (_t(PI) * kl_k3(logp, logr)).sum().item()
    assert expectation == pytest.approx(_kl(PI, REF), rel=1e-12)
    assert (kl_k3(logp, logr)[torch.tensor(PI) != torch.tensor(REF)] > 0).all()


def test_kl_k3_monte_carlo_mean_over_samples_from_pi():
    """Actions sampled from pi (fixed seed): the sample mean of k3 is within 4 standard errors of
    KL(pi || ref) (and further than that from KL(ref || pi))."""
    n = 200_000
    actions = torch.multinomial(_t(PI), n, replacement=True, generator=torch.Generator().manual_seed(0))
    k3 = kl_k3(_t(PI).log()[actions], _t(REF).log()[actions])
    mean, stderr = k3.mean().item(), k3.std().item() / math.sqrt(n)
    assert abs(mean - _kl(PI, REF)) < 4 * stderr
    assert abs(mean - _kl(REF, PI)) > 4 * stderr


def test_kl_exact_matches_scalar_reference_and_skips_invalid_positions():
    logits = torch.tensor([[[1.0, 2.0, 0.0], [0.5, 0.5, 0.5], [float("nan")] * 3]], requires_grad=True)
    ref = torch.tensor([[[0.0, 1.0, 1.0], [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]]])
    valid = torch.tensor([[True, True, False]])

    def kl(p_logits, q_logits):
        zp = sum(math.exp(x) for x in p_logits)
        zq = sum(math.exp(x) for x in q_logits)
        return sum(math.exp(a) / zp * (a - math.log(zp) - b + math.log(zq)) for a, b in zip(p_logits, q_logits))

    expected = kl([1.0, 2.0, 0.0], [0.0, 1.0, 1.0]) + kl([0.5, 0.5, 0.5], [2.0, 0.0, 0.0])
    out = kl_exact(logits, ref, valid)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, rel=1e-5)
    out.sum().backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[0, 2] == 0).all()
    # with mean step log-probs the KL is per committed token too (2 valid positions here)
    assert kl_exact(logits, ref, valid, "mean").item() == pytest.approx(expected / 2, rel=1e-5)


def _step_inputs():
    logp = torch.tensor([-1.0, -2.0, float("inf")], dtype=torch.float64, requires_grad=True)
    old = _t([-1.2, -1.5, float("nan")])
    ref = _t([-0.8, -2.5, float("nan")])
    adv = _t([1.0, -0.5, float("nan")])
    weights = _t([1.0, 1.0, 0.0])
    num_tokens = torch.tensor([2, 4, 0])
    return logp, old, ref, adv, weights, num_tokens


def test_egspo_step_loss_matches_scalar_reference_and_padding_is_exactly_zero():
    logp, old, ref, adv, weights, num_tokens = _step_inputs()
    loss, stats = egspo_step_loss(logp, old, ref, adv, weights, num_tokens, eps_low=0.2, eps_high=0.5, beta=0.04)
    row0 = (_surrogate(0.2, 1.0, 0.2, 0.5) + 0.04 * _k3(-1.0, -0.8)) / 2
    row1 = (_surrogate(-0.5, -0.5, 0.2, 0.5) + 0.04 * _k3(-2.0, -2.5)) / 4
    # denominator: B = 3 rows, the padded one included
    assert loss.item() == pytest.approx((row0 + row1) / 3, rel=1e-12)
    loss.backward()
    assert torch.isfinite(logp.grad).all() and logp.grad[2].item() == 0.0 and logp.grad[0].item() != 0.0
    # row 1: ratio exp(-0.5) < 0.8 with A < 0 -> clipped; row 0 not
    assert stats["clip_fraction"].item() == pytest.approx(0.5)
    assert stats["kl"].item() == pytest.approx((_k3(-1.0, -0.8) + _k3(-2.0, -2.5)) / 2)
    assert stats["ratio"].item() == pytest.approx((math.exp(0.2) + math.exp(-0.5)) / 2)


def test_egspo_step_loss_options():
    logp, old, ref, adv, weights, num_tokens = _step_inputs()
    # beta = 0: no reference needed, mean aggregation: no division by tokens
    loss, _ = egspo_step_loss(logp, old, None, adv, weights, num_tokens, eps_low=0.2, eps_high=0.5, beta=0.0,
                              aggregation="mean")
    assert loss.item() == pytest.approx((_surrogate(0.2, 1.0, 0.2, 0.5) + _surrogate(-0.5, -0.5, 0.2, 0.5)) / 3)
    # exact KL given per row replaces k3; NaN on the padded row is ignored
    kl = _t([0.1, 0.3, float("nan")])
    loss, stats = egspo_step_loss(logp, old, ref, adv, weights, num_tokens, eps_low=0.2, eps_high=0.5, beta=0.04,
                                  kl=kl)
    row0 = (_surrogate(0.2, 1.0, 0.2, 0.5) + 0.04 * 0.1) / 2
    row1 = (_surrogate(-0.5, -0.5, 0.2, 0.5) + 0.04 * 0.3) / 4
    assert loss.item() == pytest.approx((row0 + row1) / 3) and stats["kl"].item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="logp_ref"):
        egspo_step_loss(logp, old, None, adv, weights, num_tokens, eps_low=0.2, eps_high=0.5, beta=0.04)
    # all rows padded: zero loss, zero gradient, still finite
    logp.grad = None
    loss, stats = egspo_step_loss(logp, old, ref, adv, torch.zeros(3), num_tokens, eps_low=0.2, eps_high=0.5,
                                  beta=0.04)
    loss.backward()
    assert loss.item() == 0.0 and (logp.grad == 0).all() and stats["clip_fraction"].item() == 0.0


def test_diffu_grpo_mask_shared_by_seed_and_global_rng_untouched():
    ids = torch.arange(4 * 30).view(4, 30) + 1
    kwargs = dict(mask_id=0, p_mask_prompt=0.5)
    state = torch.random.get_rng_state()
    a = diffu_grpo_masked_inputs(ids, 20, seed=1, **kwargs)
    b = diffu_grpo_masked_inputs(ids, 20, seed=1, **kwargs)
    c = diffu_grpo_masked_inputs(ids, 20, seed=2, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a[:, 20:] == 0).all()  # every completion token masked
    masked = a[:, :20] == 0
    assert 0 < masked.sum().item() < 80
    assert torch.equal(a[:, :20][~masked], ids[:, :20][~masked])  # unmasked prompt tokens kept
    assert torch.equal(diffu_grpo_masked_inputs(ids, 20, seed=1, mask_id=0, p_mask_prompt=0.0)[:, :20], ids[:, :20])


def test_diffu_grpo_never_masks_prompt_padding():
    ids = torch.arange(2 * 12).view(2, 12) + 1
    attention = torch.ones(2, 8, dtype=torch.long)
    attention[0, :3] = 0  # row 0 is left-padded by 3
    out = diffu_grpo_masked_inputs(ids, 8, mask_id=0, p_mask_prompt=0.999, seed=0, prompt_attention_mask=attention)
    assert torch.equal(out[0, :3], ids[0, :3])
    assert (out[0, 3:] == 0).all() and (out[1] == 0).all()
    # a full-length (B, L) attention mask works the same
    full = torch.cat([attention, torch.ones(2, 4, dtype=torch.long)], dim=1)
    out_full = diffu_grpo_masked_inputs(ids, 8, mask_id=0, p_mask_prompt=0.999, seed=0, prompt_attention_mask=full)
    assert torch.equal(out, out_full)


def test_completion_token_mask_stops_after_first_eos():
    ids = torch.tensor([[5, 2, 7, 2, 9], [1, 3, 4, 6, 8], [0, 5, 5, 5, 5]])
    mask = completion_token_mask(ids, [0, 2])
    assert mask.tolist() == [[True, True, False, False, False], [True] * 5, [True, False, False, False, False]]


def test_diffu_grpo_loss_token_mean_matches_scalar_reference():
    cur = torch.tensor([[-1.0, -0.5, float("nan")], [-2.0, float("inf"), 0.0]], dtype=torch.float64,
                       requires_grad=True)
    old = _t([[-1.1, -0.2, 0.0], [-1.0, 0.0, float("nan")]])
    ref = _t([[-0.9, -0.5, 0.0], [-2.2, 0.0, 0.0]])
    adv = _t([0.5, -1.0])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    loss, stats = diffu_grpo_loss(cur, old, ref, adv, mask, eps_low=0.5, eps_high=0.5, beta=0.04)
    terms = [
        _surrogate(0.1, 0.5, 0.5, 0.5) + 0.04 * _k3(-1.0, -0.9),
        _surrogate(-0.3, 0.5, 0.5, 0.5) + 0.04 * _k3(-0.5, -0.5),
        _surrogate(-1.0, -1.0, 0.5, 0.5) + 0.04 * _k3(-2.0, -2.2),  # ratio e^-1 < 0.5, A < 0: clipped
    ]
    assert loss.item() == pytest.approx(sum(terms) / 3, rel=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert torch.isfinite(cur.grad).all()
    assert cur.grad[0, 2].item() == 0.0 and cur.grad[1, 1].item() == 0.0 and cur.grad[1, 2].item() == 0.0
    # beta = 0 needs no reference
    loss0, _ = diffu_grpo_loss(cur, old, None, adv, mask, eps_low=0.5, eps_high=0.5, beta=0.0)
    assert loss0.item() == pytest.approx(
        (_surrogate(0.1, 0.5, 0.5, 0.5) + _surrogate(-0.3, 0.5, 0.5, 0.5) + _surrogate(-1.0, -1.0, 0.5, 0.5)) / 3
    )
