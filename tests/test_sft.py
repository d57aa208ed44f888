"""Masked-diffusion SFT: data encoding, the loss, training, exact resume and bad data."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from egspo.checkpoint import list_checkpoints
from egspo.config import ConfigError, config_from_dict
from egspo.models.tiny import random_model
from egspo.sft import SFTData, masked_diffusion_loss, sft


@pytest.fixture(scope="module")
def tokenizer():
    return random_model("tiny", 0, d_model=16, n_layers=1, n_heads=1, n_kv_heads=1, mlp_hidden_size=16)[1]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_sft_data_batches_are_left_padded_prompts_and_end_filled_completions(tokenizer, caplog):
    pairs = [("ab", "xyz"), ("abcdef", "x"), ("a", "uvwxyz0123")]
    eos = tokenizer.eos_token_id
    with caplog.at_level(logging.WARNING, logger="egspo.sft"):
        data = SFTData.encode(tokenizer, pairs, max_prompt_length=4, gen_length=6, eos_id=eos)
    assert "1 completion(s) fill all 6 positions" in caplog.text  # the third completion is cut, once
    assert len(data) == 3

    ids, mask, completions = data.batch(torch.tensor([2, 0]), torch.device("cpu"))
    # the batch is as wide as its longest prompt (2 tokens), not the data's longest (4, truncated)
    assert ids.shape == mask.shape == (2, 2)
    assert mask.tolist() == [[0, 1], [1, 1]]
    assert ids[0, 1:].tolist() == _ids(tokenizer, "a") and ids[1].tolist() == _ids(tokenizer, "ab")
    assert completions[0].tolist() == _ids(tokenizer, "uvwxyz0123")[:6]
    assert completions[1].tolist() == _ids(tokenizer, "xyz") + [eos] * 3

    ids, mask, _ = data.batch(torch.tensor([1]), torch.device("cpu"))
    assert ids.tolist() == [_ids(tokenizer, "abcdef")[-4:]] and mask.tolist() == [[1, 1, 1, 1]]  # keeps the end


def test_masked_diffusion_loss_is_inverse_mask_prob_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, 0, 1]])
    masked = torch.tensor([[True, False, True], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    ce = -torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    expected = ((ce[0, 0] + ce[0, 2]) / 0.5 / 3 + ce[1, 2] / 0.25 / 3) / 2
    torch.testing.assert_close(masked_diffusion_loss(logits, targets, masked, t), expected)
    # unmasked positions do not matter
    changed = logits.clone()
    changed[0, 1] += 100.0
    torch.testing.assert_close(masked_diffusion_loss(changed, targets, masked, t), expected)


def _config(tmp_path: Path, model: Path, data: Path, out: Path, steps: int, lora: bool = False):
    return config_from_dict({
        "model": {"name_or_path": str(model), "lora": lora, "lora_r": 4, "lora_alpha": 8},
        "sampler": {"gen_length": 8, "block_length": 8, "steps": 8},
        "task": {"name": "custom", "train_file": str(data), "max_prompt_length": 16},
        "train": {"output_dir": str(out), "per_device_batch_size": 4, "gradient_accumulation_steps": 2,
                  "max_steps": steps, "save_every": 2, "learning_rate": 3e-3, "warmup_steps": 0,
                  "log_every": 1, "max_grad_norm": 1.0, "seed": 3},
    })


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": str(i) * 3}) + "\n" for i in range(10)))
    return path


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sft_learns_and_a_resumed_run_equals_an_uninterrupted_one(micro_model, pairs_file, tmp_path):
    straight = tmp_path / "straight"
    sft(_config(tmp_path, micro_model, pairs_file, straight, steps=12))
    losses = _losses(straight)
    assert len(losses) == 12
    assert sum(losses[-3:]) < sum(losses[:3])  # it learns the pairs
    assert [p.name for p in list_checkpoints(straight)][-1] == "checkpoint-12"
    assert (straight / "checkpoint-12" / "model" / "config.json").is_file()

    # interrupted after 6 steps (checkpoint-6), then resumed to 12: same losses, same weights
    resumed = tmp_path / "resumed"
    sft(_config(tmp_path, micro_model, pairs_file, resumed, steps=6))
    sft(_config(tmp_path, micro_model, pairs_file, resumed, steps=12), resume=True)
    assert _losses(resumed) == pytest.approx(losses, rel=1e-6)
    a = load_file(str(straight / "checkpoint-12" / "trainable.safetensors"))
    b = load_file(str(resumed / "checkpoint-12" / "trainable.safetensors"))
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_sft_refuses_a_new_run_over_old_checkpoints(micro_model, pairs_file, tmp_path):
    run = tmp_path / "run"
    sft(_config(tmp_path, micro_model, pairs_file, run, steps=2))
    with pytest.raises(Exception, match="resume"):
        sft(_config(tmp_path, micro_model, pairs_file, run, steps=2))


def test_sft_names_the_row_without_a_completion(micro_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    with pytest.raises(ConfigError, match=r"SFT row 1 .*no 'completion' field"):
        sft(_config(tmp_path, micro_model, data, tmp_path / "run", steps=1))
