import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

import egspo  # noqa: F401  (registers the native architectures)
from egspo.cli import main
from egspo.models.llada import LLaDAModelLM
from egspo.models.tiny import new_model, preset_config, random_model, tiny_config


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_tiny_config_is_small_untied_llada():
    config = tiny_config(vocab_size=107, mask_token_id=3, eos_token_id=2, pad_token_id=0)
    assert config.model_type == "llada" and not config.weight_tying
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (256, 4, 4, 4)
    assert config.embedding_size == config.vocab_size == 107
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (3, 2, 0)
    assert tiny_config(107, 3, 2, 0, n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="presets: tiny, small"):
        preset_config("huge", 107, 3, 2, 0)


def test_random_model_sizes_and_determinism():
    model, tokenizer = random_model("tiny", seed=0)
    assert 2e6 < _n_params(model) < 6e6
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.mask_token_id == tokenizer.mask_token_id
    state = torch.random.get_rng_state()
    same, _ = random_model("tiny", seed=0)
    other, _ = random_model("tiny", seed=1)
    assert torch.equal(torch.random.get_rng_state(), state), "the global RNG must not be touched"
    pairs = list(zip(model.parameters(), same.parameters(), other.parameters()))
    assert all(torch.equal(a, b) for a, b, _ in pairs)
    assert not all(torch.equal(a, c) for a, _, c in pairs)
    small = preset_config("small", 107, 3, 2, 0)
    assert (small.d_model, small.n_layers) == (512, 8)


def test_new_model_loads_with_auto_classes(tmp_path):
    out = new_model(tmp_path / "tiny", seed=0, n_layers=2)
    assert (out / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(out)
    assert isinstance(model, LLaDAModelLM) and model.config.n_layers == 2
    assert isinstance(AutoModelForMaskedLM.from_pretrained(out), LLaDAModelLM)
    reference, tokenizer = random_model(seed=0, n_layers=2)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids = loaded_tokenizer(["12+3", "<answer>7</answer>"], padding=True, return_tensors="pt")
    logits = model(**ids, logits_positions=torch.tensor([1, 2])).logits
    assert logits.shape == (2, 2, len(tokenizer))


def test_cli_new_model(tmp_path):
    out = tmp_path / "cli"
    assert main(["new-model", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    model = AutoModel.from_pretrained(out)
    reference, _ = random_model(seed=3)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters()))
    assert (out / "tokenizer.json").is_file()
