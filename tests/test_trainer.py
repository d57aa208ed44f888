"""End-to-end RL trainer tests on a micro LLaDA (CPU, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egspo.config import ConfigError, load_config
from egspo.rl.rewards import RewardError
from egspo.rl.trainer import EGSPOTrainer


def make_config(model: Path, data: Path, out: Path, *extra: str):
    return load_config(None, [
        f"model_name_or_path={model}", "use_peft=false",
        "max_completion_length=8", "block_length=8", "diffusion_steps=4", "temperature=1.0",
        "num_generations=4", "num_selected_steps=2", "num_iterations=2",
        "task=custom", f"train_file={data}", "reward_funcs=[tests.reward_fns:count_sevens]",
        f"output_dir={out}", "per_device_train_batch_size=8", "gradient_accumulation_steps=2",
        "learning_rate=0.01", "max_grad_norm=1.0", "max_steps=12", "save_steps=0",
        *extra,
    ])


def _sevens(trainer: EGSPOTrainer, n: int = 64) -> float:
    """Mean reward of n fresh temperature-1 rollouts of the trainer's current policy."""
    from egspo.sampling import sample

    ids = torch.tensor([trainer.processing_class("say 1")["input_ids"]] * n)
    traj = sample(trainer.dlm, ids, trainer.args.rollout_sampler(), generator=torch.Generator().manual_seed(123))
    texts = trainer.processing_class.batch_decode(traj.completions, skip_special_tokens=True)
    return sum(min(1.0, t.count("7") / 8) for t in texts) / n


@pytest.mark.parametrize("algorithm", ["egspo_sa", "diffu_grpo"])
def test_training_raises_a_learnable_reward(micro_model, prompts_file, tmp_path, algorithm):
    # diffu-GRPO with d1's symmetric clip (epsilon 0.5 both ways)
    clip = ["epsilon=0.5"] if algorithm == "diffu_grpo" else []
    cfg = make_config(micro_model, prompts_file, tmp_path / "run", f"algorithm={algorithm}", "max_steps=30",
                      "learning_rate=0.003", *clip)
    trainer = EGSPOTrainer(args=cfg)
    before = _sevens(trainer)
    reference = {k: v.clone() for k, v in trainer.dlm.reference.state_dict().items()}
    initial = {k: v.clone() for k, v in trainer.dlm.core.state_dict().items()}
    trainer.train()
    after = _sevens(trainer)
    assert after > max(before + 0.2, 2 * before), (before, after)
    changed = [k for k, v in trainer.dlm.core.state_dict().items() if not torch.equal(v, initial[k])]
    assert changed, "parameters must change"
    assert all(torch.equal(v, reference[k]) for k, v in trainer.dlm.reference.state_dict().items())
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 31))
    for key in ("reward/mean", "reward/count_sevens/mean", "kl", "clip_fraction", "time/rollout", "time/update"):
        assert key in lines[-1]
    assert (tmp_path / "run" / "config.yaml").exists()
    assert (tmp_path / "run" / "checkpoint-30" / "trainable.safetensors").exists()


def test_lora_reference_is_the_adapter_free_model(micro_model, prompts_file, tmp_path):
    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "use_peft=true", "lora_r=4",
                      "lora_alpha=8", "max_steps=2")
    trainer = EGSPOTrainer(args=cfg)
    base = {k: v.clone() for k, v in trainer.dlm.core.state_dict().items() if "lora_" not in k}
    trainer.train()
    after = trainer.dlm.core.state_dict()
    assert all(torch.equal(after[k], v) for k, v in base.items()), "base weights stay frozen under LoRA"
    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "trainable.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert (tmp_path / "run" / "checkpoint-2" / "adapter" / "adapter_config.json").exists()


def test_resume_matches_uninterrupted_run(micro_model, prompts_file, tmp_path):
    straight = make_config(micro_model, prompts_file, tmp_path / "a", "max_steps=4", "use_peft=true",
                           "lora_r=4", "lora_alpha=8")
    EGSPOTrainer(args=straight).train()
    first = make_config(micro_model, prompts_file, tmp_path / "b", "max_steps=4", "save_steps=2",
                        "use_peft=true", "lora_r=4", "lora_alpha=8")
    interrupted = EGSPOTrainer(args=first)

    class Killed(Exception):
        pass

    class KillAfterCheckpoint:
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:  # dies mid-way between the checkpoint at 2 and the end
                raise Killed

    interrupted.callbacks.callbacks.append(KillAfterCheckpoint())
    with pytest.raises(Killed):
        interrupted.train()
    with pytest.raises(ConfigError, match="--resume"):
        EGSPOTrainer(args=first).train()  # a new run over old checkpoints is refused
    EGSPOTrainer(args=first).train(resume_from_checkpoint=True)
    a = load_file(str(tmp_path / "a" / "checkpoint-4" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-4" / "trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    ma = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == [1, 2, 3, 4]
    assert [m["reward/mean"] for m in ma] == pytest.approx([m["reward/mean"] for m in mb])


def test_bad_inputs_fail_early(micro_model, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="num_generations=4"):
        EGSPOTrainer(args=make_config(micro_model, prompts_file, tmp_path / "r0", "per_device_train_batch_size=6"))
    cfg = make_config(micro_model, prompts_file, tmp_path / "r",
                      "reward_funcs=[tests.reward_fns:broken]", "max_steps=1")
    with pytest.raises(RewardError, match="broken"):
        EGSPOTrainer(args=cfg).train()
    assert not list((tmp_path / "r").glob("checkpoint-*")), "no checkpoint after a failed first step"
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="not writable"):
        EGSPOTrainer(args=make_config(micro_model, prompts_file, blocker / "run"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"question": "no prompt"}) + "\n")
    with pytest.raises(Exception, match="line 2"):
        EGSPOTrainer(args=make_config(micro_model, bad, tmp_path / "r2"))


def test_missing_rewards_are_excluded_and_counted(micro_model, prompts_file, tmp_path):
    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=1",
                      "reward_funcs=[tests.reward_fns:count_sevens,tests.reward_fns:sometimes_none]",
                      "algorithm=egspo")
    trainer = EGSPOTrainer(args=cfg)
    trainer.train()
    assert trainer.scorer.missing == {"sometimes_none": 1}
