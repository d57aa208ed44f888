"""diffu-GRPO is scheduled as d1 (TRL's GRPOTrainer with num_iterations): one rollout batch per accumulation
slot, and each optimizer step accumulates every slot's batch, iteration i with mask seed i."""

from __future__ import annotations

import pytest

import egspo.rl.trainer as trainer_module
from egspo import EGSPOConfig, EGSPOTrainer

ROWS = [{"prompt": f"say {i}"} for i in range(8)]


def variety(prompts, completions, **kwargs):
    """Distinct characters per completion: random completions differ, so advantages are not all zero."""
    return [len(set(text)) / 8 for text in completions]


@pytest.fixture
def recorded(tmp_path, monkeypatch):
    """A 1-step diffu-GRPO run (2 accumulation slots, 3 iterations) with its rollouts, training forwards,
    optimizer steps and per-micro-batch ratios recorded."""
    args = EGSPOConfig(algorithm="diffu_grpo", output_dir=str(tmp_path / "run"), max_steps=1,
                       per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2,
                       num_iterations=3, max_completion_length=8, block_length=8, diffusion_steps=4,
                       learning_rate=1e-2, save_steps=0, seed=0, epsilon=0.5, epsilon_high=0.5)
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[variety], train_dataset=ROWS, args=args)
    events: list[tuple] = []
    rollout = trainer._rollout

    def spy_rollout(index):
        batch = rollout(index)
        events.append(("rollout", index, id(batch.traj.sequences)))
        return batch

    estimator = trainer_module.masked_completion_logps

    def spy_estimator(dlm, traj, seed, p_mask, model=None):
        out = estimator(dlm, traj, seed, p_mask, model=model)
        if out.requires_grad:  # a training forward (old and reference ones run without grad)
            events.append(("forward", traj.sequences.data_ptr(), seed))
        return out

    loss_fn = trainer_module.diffu_grpo_loss

    def spy_loss(*a, **k):
        loss, stats = loss_fn(*a, **k)
        events.append(("ratio", float(stats["ratio"])))
        return loss, stats

    step = trainer.optimizer.step

    def spy_step(*a, **k):
        events.append(("optimizer_step",))
        return step(*a, **k)

    monkeypatch.setattr(trainer, "_rollout", spy_rollout)
    monkeypatch.setattr(trainer_module, "masked_completion_logps", spy_estimator)
    monkeypatch.setattr(trainer_module, "diffu_grpo_loss", spy_loss)
    monkeypatch.setattr(trainer.optimizer, "step", spy_step)
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
