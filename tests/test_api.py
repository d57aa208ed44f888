"""The TRL-shaped Python API: EGSPOTrainer with a user's model, dataset and reward callables."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from egspo import EGSPOConfig, EGSPOTrainer
from egspo.config import ConfigError
from egspo.rl.rewards import RewardError
from egspo.tasks.data import DataError


def sevens(prompts, completions, **kwargs):
    return [min(1.0, text.count("7") / 8) for text in completions]


def small_args(out, **overrides):
    """Only TRL-named fields (plus d1's block_length / diffusion_steps)."""
    fields = dict(output_dir=str(out), max_steps=2, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=8, block_length=8, diffusion_steps=4, learning_rate=1e-3, save_steps=2,
                  seed=0)
    return EGSPOConfig(**{**fields, **overrides})


ROWS = [{"prompt": f"say {i}", "label": str(i)} for i in range(8)]


def test_train_checkpoint_resume_and_generate(tmp_path):
    import egspo

    out = tmp_path / "run"
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS, args=small_args(out))
    result = trainer.train()
    assert result.global_step == 2
    adapter = out / "checkpoint-2" / "adapter"
    assert (adapter / "adapter_model.safetensors").exists()
    # the adapter names its base as given (built in or a hub id), not where it was installed
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "builtin:tiny"
    assert (out / "report.md").exists() and (out / "training_curve.png").stat().st_size > 1000
    samples = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1] * 4 + [2] * 4
    assert set(samples[0]) == {"step", "prompt", "completion", "reward"} and samples[0]["prompt"].startswith("say")

    resumed = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                           args=small_args(out, max_steps=3))
    assert resumed.train(resume_from_checkpoint=True).global_step == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (out / "checkpoint-3").is_dir()
    texts = egspo.generate(resumed.model, resumed.processing_class, ["say 1", "say 2"], gen_length=8,
                           block_length=8, steps=4)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_resume_equals_uninterrupted(tmp_path):
    straight = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                            args=small_args(tmp_path / "a", max_steps=3, save_steps=3))
    straight.train()
    first = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                         args=small_args(tmp_path / "b", max_steps=2, save_steps=2))
    first.train()
    EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                 args=small_args(tmp_path / "b", max_steps=3, save_steps=3)).train(
                     resume_from_checkpoint=tmp_path / "b" / "checkpoint-2")
    a = load_file(str(tmp_path / "a" / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint-3" / "trainable.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


class Calls:
    """A reward object with __call__ that records what it was given."""

    def __init__(self):
        self.seen = []

    def __call__(self, prompts, completions, completion_ids, label, **kwargs):
        self.seen.append((prompts, completions, completion_ids, label))
        return [0.5] * len(completions)


def scaled(prompts, completions, scale, **kwargs):
    return [scale * len(text) for text in completions]


def test_reward_forms_and_the_arguments_they_get(tmp_path):
    calls = Calls()
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[calls, functools.partial(scaled, scale=0.1)],
                           train_dataset=ROWS, args=small_args(tmp_path / "r", max_steps=1, algorithm="egspo"))
    assert trainer.scorer.names == ["Calls", "scaled"]
    trainer.train()
    prompts, completions, ids, labels = calls.seen[0]
    assert len(prompts) == len(completions) == len(ids) == len(labels) == 8
    assert all(prompt == f"say {label}" for prompt, label in zip(prompts, labels)), "columns stay with their rows"
    assert all(isinstance(c, str) for c in completions)
    assert trainer.processing_class.decode(ids[0], skip_special_tokens=True) == completions[0]


def test_conversational_prompts_use_the_chat_template_and_get_messages_back(tmp_path):
    calls = Calls()
    rows = [{"prompt": [{"role": "user", "content": f"say {i}"}], "label": str(i)} for i in range(8)]
    trainer = EGSPOTrainer(model="builtin:sudoku-tiny", reward_funcs=[calls], train_dataset=rows,
                           args=small_args(tmp_path / "c", max_steps=1, algorithm="egspo"))
    trainer.train()
    prompts, completions, _, labels = calls.seen[0]
    assert all(prompt == [{"role": "user", "content": f"say {label}"}] for prompt, label in zip(prompts, labels))
    assert completions[0][0]["role"] == "assistant" and isinstance(completions[0][0]["content"], str)


def no_kwargs(prompts, completions):
    return [0.0] * len(completions)


def needs_answer(prompts, completions, answer, **kwargs):
    return [0.0] * len(completions)


@pytest.mark.parametrize("bad, message", [
    (no_kwargs, "add \\*\\*kwargs"),
    (needs_answer, "needs argument\\(s\\) \\['answer'\\]"),
    ("no_such_module_xyz:fn", "cannot import module 'no_such_module_xyz'"),
    (42, "neither callable"),
])
def test_bad_reward_functions_fail_before_any_rollout(tmp_path, bad, message):
    with pytest.raises(RewardError, match=message):
        EGSPOTrainer(model="builtin:tiny", reward_funcs=[bad], train_dataset=ROWS, args=small_args(tmp_path / "x"))
    assert not (tmp_path / "x").exists(), "nothing half-made"


def test_bad_datasets_and_configs_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="row 1 has no 'prompt' column"):
        EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=[{"prompt": "a"}, {"text": "b"}],
                     args=small_args(tmp_path / "x"))
    with pytest.raises(DataError, match="neither a string nor a list"):
        EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=[{"prompt": 5}],
                     args=small_args(tmp_path / "x"))
    with pytest.raises(ConfigError, match="Did you mean learning_rate"):
        EGSPOConfig(learnig_rate=1e-3)
    with pytest.raises(TypeError, match="egspo.EGSPOConfig"):
        EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS, args={"max_steps": 1})
    assert not (tmp_path / "x").exists()


def test_a_model_that_is_not_a_masked_diffusion_lm_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from egspo.models.loading import ModelLoadError
    from egspo.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    tokenizer.mask_token = None
    gpt = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=len(tokenizer)))
    with pytest.raises(ModelLoadError, match="no mask token"):
        EGSPOTrainer(model=gpt, processing_class=tokenizer, reward_funcs=[sevens], train_dataset=ROWS,
                     args=small_args(tmp_path / "x"))


def test_peft_config_callbacks_and_save_model_with_a_card(tmp_path):
    from peft import LoraConfig
    from transformers import TrainerCallback

    class StopAfterOne(TrainerCallback):
        def __init__(self):
            self.logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logged.append(state.global_step)
            control.should_training_stop = True

    stop = StopAfterOne()
    out = tmp_path / "p"
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                           args=small_args(out, max_steps=5, save_steps=0),
                           peft_config=LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
                           callbacks=[stop])
    assert trainer.train().global_step == 1 and stop.logged == [1]
    assert (out / "checkpoint-1").is_dir(), "a stop requested by a callback saves a checkpoint"
    config = json.loads((out / "checkpoint-1" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    saved = trainer.save_model(tmp_path / "final")
    card = (saved / "README.md").read_text()
    assert "builtin:tiny" in card and "egspo_sa" in card and "training curve" in card.lower()
    assert (saved / "adapter_config.json").exists()


def test_push_to_hub_offline_fails_at_once_but_writes_the_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    from egspo.hub import HubError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "h"
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                           args=small_args(out, max_steps=1, save_steps=0, hub_model_id="me/x"))
    trainer.train()
    with pytest.raises(HubError, match="Cannot push to the hub: HF_HUB_OFFLINE"):
        trainer.push_to_hub()
    assert (out / "README.md").exists() and (out / "adapter_model.safetensors").exists()


def test_evaluation_during_training_and_the_best_checkpoint(tmp_path):
    out = tmp_path / "e"
    args = small_args(out, max_steps=4, save_steps=0, eval_strategy="steps", eval_steps=2,
                      eval_completion_lengths=[8], eval_block_length=8, load_best_model_at_end=True,
                      save_total_limit=1)
    eval_rows = [{"prompt": "say 7", "label": "7"}] * 3
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS, eval_dataset=eval_rows,
                           args=args)
    trainer.train()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {m["step"]: m["eval_reward"] for m in lines if "eval_reward" in m}
    assert sorted(evals) == [2, 4]
    assert trainer.best is not None and trainer.best[1].is_dir(), "the best checkpoint survives pruning"
    assert "eval_reward" in (out / "report.md").read_text()


def test_an_adapter_on_the_wrong_base_is_refused_with_its_recorded_base(tmp_path):
    from egspo.evaluate import load_variant

    out = tmp_path / "a"
    EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS,
                 args=small_args(out, max_steps=1, save_steps=0)).train()
    with pytest.raises(ConfigError, match="was trained on 'builtin:tiny' and does not fit the base model "
                                          "'builtin:small'.*--model builtin:tiny"):
        load_variant("builtin:small", out / "checkpoint-1" / "adapter")


def test_a_selected_step_count_that_does_not_fill_whole_optimizer_steps_is_padded(tmp_path, monkeypatch):
    """K = 3 selected steps with accumulation 2: the batch's second optimizer step is completed with a
    zero-weight micro-batch, so exactly 2 optimizer steps run and no gradient is left for the next batch."""
    args = small_args(tmp_path / "k3", max_steps=1, diffusion_steps=3, save_steps=0)
    assert args.num_selected_steps == 3
    trainer = EGSPOTrainer(model="builtin:tiny", reward_funcs=[sevens], train_dataset=ROWS, args=args)
    steps = []
    step = trainer.optimizer.step
    monkeypatch.setattr(trainer.optimizer, "step", lambda *a, **k: (steps.append(1), step(*a, **k))[1])
    trainer.train()
    assert len(steps) == 2
    assert all(p.grad is None for p in trainer.model.parameters()), "nothing accumulated after the batch"
