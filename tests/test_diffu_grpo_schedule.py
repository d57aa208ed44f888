"""diffu-GRPO is scheduled as d1 (TRL's GRPOTrainer with num_iterations): one rollout batch per accumulation
slot, and each optimizer step accumulates every slot's batch, iteration i with mask seed i."""

from __future__ import annotations

import pytest
import torch

import egspo.rl.estimators as estimators_module
import egspo.rl.steps as steps_module
from egspo import EGSPOConfig, EGSPOTrainer

torch.set_num_threads(1)

ROWS = [{"prompt": f"say {i}"} for i in range(8)]


def distinct(prompts, completions, **kwargs):
    """Share of distinct characters: differs between the rollouts of a group (builtin:tiny's random
    completions almost never contain a given character, so a count of one gave all-zero advantages and
    no update at all)."""
    return [len(set(text)) / 8 for text in completions]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A 1-step diffu-GRPO run (2 accumulation slots, 3 iterations) with its rollouts, training forwards,
    optimizer steps, per-micro-batch ratios and every masked estimator input (which use: old, ref or
    current; which batch; the mask) recorded."""
    args = EGSPOConfig(algorithm="diffu_grpo", output_dir=str(tmp_path_factory.mktemp("d1") / "run"), max_steps=1,
                       per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
                       num_iterations=3, max_completion_length=8, block_length=8, diffusion_steps=4,
                       learning_rate=1e-2, save_steps=0, seed=0, epsilon=0.5, epsilon_high=0.5, beta=0.04,
                       p_mask_prompt=0.5, lora_r=8, lora_alpha=16)
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[distinct], train_dataset=ROWS, args=args)
    events: list[tuple] = []
    rollout = trainer._rollout

    def spy_rollout(index):
        batch = rollout(index)
        events.append(("rollout", index, id(batch.traj.sequences)))
        return batch

    estimator = steps_module.masked_completion_logps
    use = {}

    def spy_estimator(dlm, traj, seed, p_mask, model=None):
        use["kind"] = "ref" if model is not None else "current" if torch.is_grad_enabled() else "old"
        out = estimator(dlm, traj, seed, p_mask, model=model)
        if out.requires_grad:  # a training forward (old and reference ones run without grad)
            events.append(("forward", traj.sequences.data_ptr(), seed))
        return out

    loss_fn = steps_module.diffu_grpo_loss

    def spy_loss(*a, **k):
        loss, stats = loss_fn(*a, **k)
        events.append(("ratio", float(stats["ratio"])))
        return loss, stats

    masked_inputs = estimators_module.diffu_grpo_masked_inputs

    def spy_masked_inputs(input_ids, prompt_length, **kwargs):
        out = masked_inputs(input_ids, prompt_length, **kwargs)
        events.append(("mask", use["kind"], input_ids.data_ptr(), out == kwargs["mask_id"]))
        return out

    step = trainer.optimizer.step

    def spy_step(*a, **k):
        events.append(("optimizer_step",))
        return step(*a, **k)

    with pytest.MonkeyPatch.context() as mp:  # one run shared by the module's tests
        mp.setattr(trainer, "_rollout", spy_rollout)
        mp.setattr(steps_module, "masked_completion_logps", spy_estimator)
        mp.setattr(steps_module, "diffu_grpo_loss", spy_loss)
        mp.setattr(estimators_module, "diffu_grpo_masked_inputs", spy_masked_inputs)
        mp.setattr(trainer.optimizer, "step", spy_step)
        trainer.train()
    return trainer, events


def test_each_slot_gets_its_own_batch_and_each_batch_num_iterations_optimizer_steps(recorded):
    trainer, events = recorded
    assert [e[1] for e in events if e[0] == "rollout"] == [0, 1], "one rollout batch per accumulation slot"
    kinds = [e[0] for e in events if e[0] in ("forward", "optimizer_step")]
    # iteration i: slot 0's batch, slot 1's batch, then the optimizer step; three iterations
    assert kinds == ["forward", "forward", "optimizer_step"] * 3
    forwards = [e for e in events if e[0] == "forward"]
    batches = [ptr for _, ptr, _ in forwards]
    assert batches[0] != batches[1] and batches[::2] == [batches[0]] * 3 and batches[1::2] == [batches[1]] * 3
    seeds = [seed for *_, seed in forwards]
    assert seeds[0] == seeds[1] and seeds[2] == seeds[3] and seeds[4] == seeds[5]
    assert seeds == [s for s in trainer.mask_seeds(0) for _ in range(2)], "iteration i uses mask seed i"
    assert len(set(seeds)) == 3


def test_the_ratio_is_one_before_the_first_optimizer_step(recorded):
    _, events = recorded
    ratios = [e[1] for e in events if e[0] == "ratio"]
    assert ratios[0] == pytest.approx(1.0, abs=1e-6) and ratios[1] == pytest.approx(1.0, abs=1e-6)
    assert any(abs(r - 1.0) > 1e-6 for r in ratios[2:]), "later iterations see the updated policy"


def test_old_reference_and_current_logps_of_an_iteration_share_one_mask(recorded):
    """Per batch, the masked inputs of iteration i (the i-th old and reference forwards, the current one of
    optimizer step i) mask the same positions, and different iterations mask different prompt positions
    (so it is the mask that is shared, not one mask for everything). Read from the estimator's inputs, not
    from the seeds the trainer passes. Mutations caught: the reference forward with another seed, the
    current forward always with the first seed, the prompt mask drawn from the global RNG."""
    trainer, events = recorded
    masks = [e[1:] for e in events if e[0] == "mask"]
    batches = list(dict.fromkeys(ptr for _, ptr, _ in masks))
    assert len(batches) == 2
    iterations = trainer.args.num_iterations
    for ptr in batches:
        by_use = {kind: [m for k, p, m in masks if k == kind and p == ptr] for kind in ("old", "ref", "current")}
        assert {kind: len(ms) for kind, ms in by_use.items()} == {"old": iterations, "ref": iterations,
                                                                  "current": iterations}
        for i in range(iterations):
            assert torch.equal(by_use["ref"][i], by_use["old"][i]) and torch.equal(by_use["current"][i],
                                                                                    by_use["old"][i])
        completion_length = trainer.args.max_completion_length
        for i in range(iterations):
            mask = by_use["old"][i]
            assert mask[:, -completion_length:].all(), "every completion token is masked"
            prompt_mask = mask[:, :-completion_length]
            assert 0 < prompt_mask.sum() < prompt_mask.numel(), "a random share of the prompt is masked"
            for j in range(i):
                assert not torch.equal(mask, by_use["old"][j]), f"iterations {j} and {i} share a mask"
