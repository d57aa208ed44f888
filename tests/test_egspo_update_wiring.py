"""How the EGSPO trainer wires rollouts, step rewards and advantages into its updates (issue #20).

One-step runs of builtin:tiny (LoRA r 8, float32, one CPU thread) whose internals are spied on with
monkeypatch; every expected value is recomputed here from the recorded trajectory (rewards from the
decoded texts, advantages with :func:`egspo.rl.advantages.stepwise_advantages`, old log-probs read off
the trajectory by plain indexing), never by calling the trainer's own code path again.

Rollouts: 4 rows (2 prompts x G = 2), a 16-token completion in one block over 6 steps (3, 3, 3, 3, 2, 2
tokens per step), K = 4 selected steps, so 4 micro-batches and, with accumulation 2, 2 optimizer steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import egspo.rl.steps as steps_module
import egspo.rl.trainer as trainer_module
from egspo import EGSPOConfig, EGSPOTrainer
from egspo.rl.advantages import stepwise_advantages

torch.set_num_threads(1)

ROWS = [{"prompt": f"say {i}"} for i in range(8)]
ROLLOUT_ROWS, GROUP, K = 4, 2, 4


def distinct(prompts, completions, **kwargs):
    """Share of distinct characters: varies between rollouts and between greedy completions."""
    return [len(set(text)) / 16 for text in completions]


def length_bonus(prompts, completions, **kwargs):
    """Never 0, so that counting it in a step reward would always show."""
    return [0.25 + len(text) / 64 for text in completions]


length_bonus.correctness = False  # a format-style reward: not a correctness reward


def _args(out, **overrides: Any) -> EGSPOConfig:
    fields = {"output_dir": str(out), "max_steps": 1, "per_device_train_batch_size": ROLLOUT_ROWS,
              "num_generations": GROUP, "max_completion_length": 16, "block_length": 16, "diffusion_steps": 6,
              "num_selected_steps": K, "gradient_accumulation_steps": 2, "temperature": 0.9, "lora_r": 8,
              "lora_alpha": 16, "lora_dropout": 0.0, "rollout_cache": "none", "learning_rate": 1e-2, "save_steps": 0,
              "seed": 0, "dtype": "float32"}
    return EGSPOConfig(**{**fields, **overrides})


def _spied_run(out, reward_funcs, **overrides: Any) -> tuple[EGSPOTrainer, dict[str, Any]]:
    """Train one step, recording the rollout batch, the selection, every ``egspo_step_loss`` call (with the
    number of optimizer steps taken before it), the advantage inputs and the gradients at each optimizer step."""
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=reward_funcs, train_dataset=ROWS,
                           args=_args(out, **overrides))
    seen: dict[str, Any] = {"loss_calls": [], "advantage_inputs": [], "grads": [], "optimizer_steps": 0}
    rollout, select, optimizer_step = trainer._rollout, trainer._select, trainer.optimizer.step
    step_loss, advantages = steps_module.egspo_step_loss, steps_module.global_stepwise_advantages
    trainable = [(n, p) for n, p in trainer.dlm.model.named_parameters() if p.requires_grad]
    seen["init_params"] = {n: p.detach().clone() for n, p in trainable}

    def spy_rollout(step):
        seen["batch"] = rollout(step)
        return seen["batch"]

    def spy_select(traj, step):
        seen["selected"] = select(traj, step)
        return seen["selected"]

    def spy_loss(logp, logp_old, logp_ref, adv, weights, num_tokens, **kwargs):
        seen["loss_calls"].append({
            "logp": logp.detach().clone(), "old": logp_old.detach().clone(), "adv": adv.detach().clone(),
            "weights": weights.detach().clone(), "num_tokens": num_tokens.detach().clone(),
            "optimizer_steps_before": seen["optimizer_steps"],
        })
        return step_loss(logp, logp_old, logp_ref, adv, weights, num_tokens, **kwargs)

    def spy_advantages(local_rewards, local_greedy, *args, **kwargs):
        seen["advantage_inputs"].append((local_rewards.clone(), None if local_greedy is None else local_greedy.clone()))
        return advantages(local_rewards, local_greedy, *args, **kwargs)

    def spy_optimizer_step(*args, **kwargs):
        seen["grads"].append({n: p.grad.detach().clone() for n, p in trainable})
        seen["optimizer_steps"] += 1
        return optimizer_step(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:  # module functions restored after this run
        mp.setattr(trainer, "_rollout", spy_rollout)
        mp.setattr(trainer, "_select", spy_select)
        mp.setattr(trainer.optimizer, "step", spy_optimizer_step)
        mp.setattr(steps_module, "egspo_step_loss", spy_loss)
        mp.setattr(steps_module, "global_stepwise_advantages", spy_advantages)
        trainer.train()
    seen["params"] = {n: p.detach().clone() for n, p in trainable}
    return trainer, seen


def _texts(trainer: EGSPOTrainer, tokens: torch.Tensor) -> list[str]:
    return trainer.processing_class.batch_decode(tokens, skip_special_tokens=True)


def _greedy_texts(trainer: EGSPOTrainer, traj, steps: torch.Tensor) -> list[str]:
    """Row-major (B*K) decoded one-step greedy completions at the selected steps, by plain indexing."""
    rows = torch.arange(steps.shape[0]).unsqueeze(1)
    return _texts(trainer, traj.greedy[rows, steps].flatten(0, 1))


@pytest.fixture(scope="module")
def egspo_sa_run(tmp_path_factory):
    return _spied_run(tmp_path_factory.mktemp("wiring") / "run", [distinct])


def test_slot_k_is_paired_with_advantage_column_k_and_old_logp_column_k(egspo_sa_run):
    """Micro-batch k trains the k-th selected step (time order) of every row with that slot's advantage
    A_k = R_k - mean_group(R_k), R_k = (r + 0.5 (r - r_hat_k)) / 1.5, and that step's recorded log-prob.
    Mutations caught: advantage columns reversed in the update, old log-probs of another slot, r_hat
    reshaped (K, B) instead of (B, K)."""
    trainer, seen = egspo_sa_run
    traj, sel = seen["batch"].traj, seen["selected"]
    steps, weights = sel.steps, sel.weights
    rows = torch.arange(ROLLOUT_ROWS)
    assert steps.shape == (ROLLOUT_ROWS, K) and (steps.diff(dim=1) > 0).all(), "slots in time order"
    assert (weights == 1).all()

    r = torch.tensor(distinct(None, _texts(trainer, traj.completions)))
    r_hat = torch.tensor(distinct(None, _greedy_texts(trainer, traj, steps))).view(ROLLOUT_ROWS, K)
    expected = stepwise_advantages(r, r_hat, GROUP, 0.5, normalize_returns=True, weights=weights.float())
    # the pairing is observable: the slots' advantages and old log-probs differ
    assert len({tuple(expected[:, k].tolist()) for k in range(K)}) > 1
    old_logps = traj.step_logps[rows.unsqueeze(1), steps]  # (B, K)
    assert len({tuple(old_logps[:, k].tolist()) for k in range(K)}) == K

    calls = seen["loss_calls"]
    assert len(calls) == K
    for k, call in enumerate(calls):
        torch.testing.assert_close(call["adv"], expected[:, k], rtol=0, atol=1e-6)
        torch.testing.assert_close(call["old"], old_logps[:, k], rtol=0, atol=0)
        assert torch.equal(call["weights"], weights[:, k].to(call["weights"].dtype))
        committed = (traj.step_of_position == steps[:, k : k + 1]).sum(1)
        assert torch.equal(call["num_tokens"], committed)


def test_ratio_is_one_at_the_first_micro_batch_on_the_exact_path(egspo_sa_run):
    """rollout_cache=none and lora_dropout=0: the update's log-probs of the rollout's actions equal the
    sampler's record until the first optimizer step (micro-batches 0 and 1 of accumulation 2), and not
    after it (so the comparison sees the policy). Mutations caught: the sampler recording log-probs
    renormalised without the mask token, or at the temperature (0.9), instead of the untempered softmax."""
    _, seen = egspo_sa_run
    calls = seen["loss_calls"]
    assert [c["optimizer_steps_before"] for c in calls] == [0, 0, 1, 1]
    for call in calls[:2]:
        ratio = torch.exp(call["logp"] - call["old"])
        torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=1e-5)
    assert (torch.exp(calls[2]["logp"] - calls[2]["old"]) - 1).abs().max() > 1e-3


def test_step_rewards_use_only_correctness_rewards_when_asked(tmp_path, monkeypatch):
    """step_reward_correctness_only=true: r counts every reward function, r_hat only the correctness ones
    (length_bonus, marked correctness=False, is never 0, so counting it would show). The same batch with the
    option off counts it in r_hat (the test can tell the two apart). Mutation caught: the trainer not passing
    ``correctness_only`` to the step-reward scoring."""
    trainer, seen = _spied_run(tmp_path / "run", [distinct, length_bonus], step_reward_correctness_only=True)
    batch, sel = seen["batch"], seen["selected"]
    final = _texts(trainer, batch.traj.completions)
    greedy = _greedy_texts(trainer, batch.traj, sel.steps)
    (r, r_hat), = seen["advantage_inputs"]
    torch.testing.assert_close(r, torch.tensor(distinct(None, final)) + torch.tensor(length_bonus(None, final)))
    torch.testing.assert_close(r_hat, torch.tensor(distinct(None, greedy)).view(ROLLOUT_ROWS, K))

    greedy_rewards = []
    advantages = steps_module.global_stepwise_advantages

    def spy(rewards, local_greedy, *args, **kwargs):
        greedy_rewards.append(local_greedy)
        return advantages(rewards, local_greedy, *args, **kwargs)

    monkeypatch.setattr(steps_module, "global_stepwise_advantages", spy)
    trainer.args.step_reward_correctness_only = False
    trainer._egspo_advantages(batch, sel, r)
    r_hat_all, = greedy_rewards
    bonus = torch.tensor(length_bonus(None, greedy)).view(ROLLOUT_ROWS, K)
    torch.testing.assert_close(r_hat_all, r_hat + bonus)


def _sgd(params, cfg, optimizer_steps):
    """Plain SGD at a constant learning rate: the parameters move linearly with the gradients. (AdamW's first
    steps move every weight by about +-lr whatever its gradient's size, so gradients of rounding size (LoRA's A
    gets exactly 0 while B = 0) would flip whole updates and the parameters could not be compared tightly.)"""
    optimizer = torch.optim.SGD(params, lr=cfg.learning_rate)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)


def test_two_steps_per_microbatch_equal_one_with_twice_the_accumulation(tmp_path, monkeypatch):
    """steps_per_microbatch=2 with accumulation 1 against steps_per_microbatch=1 with accumulation 2.

    Why they are the same update: a micro-batch of m slots folds them into m*B rows, and the step loss
    averages over its rows, so its loss is (1/m) * sum of the m slots' B-row losses L_k; accelerate divides
    each backward by the accumulation A. An optimizer step of (m, A) therefore applies the gradient of
    (1/(m*A)) * sum of L_k over the same m*A slots, in the same order, at the same parameters (nothing
    changes inside an optimizer step) as (1, m*A) does. Only the forward's batching differs: float32
    rounding (below 1e-8 here). Gradient clipping is off and the optimizer is plain SGD, so a wrongly
    scaled gradient shows (clipping or Adam would hide a scale). Mutations caught: advantages folded
    without the transpose (rows of one slot paired with another's advantages), the folded loss not
    averaged over its m*B rows."""
    monkeypatch.setattr(trainer_module, "make_optimizer", _sgd)
    runs = {}
    for m, accumulation in ((1, 2), (2, 1)):
        _, runs[m] = _spied_run(tmp_path / f"m{m}", [distinct], steps_per_microbatch=m,
                                gradient_accumulation_steps=accumulation, max_grad_norm=0.0, learning_rate=1.0)
    one, two = runs[1], runs[2]
    assert len(one["loss_calls"]) == K and len(two["loss_calls"]) == K // 2
    assert len(one["grads"]) == len(two["grads"]) == 2
    for grads_one, grads_two in zip(one["grads"], two["grads"]):
        assert max(float(g.abs().max()) for g in grads_one.values()) > 1e-3
        for name, g in grads_one.items():
            torch.testing.assert_close(grads_two[name], g, rtol=1e-5, atol=1e-7)
    assert max(float((p - one["init_params"][n]).abs().max()) for n, p in one["params"].items()) > 1e-3
    for name, p in one["params"].items():
        torch.testing.assert_close(two["params"][name], p, rtol=1e-5, atol=1e-7)
