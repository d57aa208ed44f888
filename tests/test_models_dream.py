"""Native Dream: published key layout and config, Auto-class loading, the shift=1 alignment."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig

import egspo  # noqa: F401  (registers the native models with the Auto classes)
from egspo.models import DreamConfig, DreamModel
from egspo.models.adapter import DiffusionLM
from egspo.models.llada import apply_rotary, rotary_cos_sin
from tests.test_models_llada import (
    assert_checkpointing_keeps_gradients,
    assert_config_without_weights_fails,
    assert_cuda_bf16_matches_cpu,
    assert_loads_like,
    assert_padding_is_masked,
    poison_remote_code,
    write_sharded_checkpoint,
)

VOCAB, MASK, EOS, HIDDEN = 100, 99, 98, 64

# Every field of the published Dream-org/Dream-v0-Instruct-7B config.json, with tiny sizes.
PUBLISHED_CONFIG = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": EOS,
    "eos_token_id": EOS,
    "hidden_act": "silu",
    "hidden_size": HIDDEN,
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "mask_token_id": MASK,
    "max_position_embeddings": 128,
    "max_window_layers": 2,
    "model_type": "Dream",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "pad_token_id": EOS,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": VOCAB,
}


def published_keys(n_layers: int) -> set[str]:
    """Tensor names of the published checkpoint, written out independently of our modules."""
    per_layer = [
        "input_layernorm.weight", "post_attention_layernorm.weight",
        "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.weight", "self_attn.k_proj.bias",
        "self_attn.v_proj.weight", "self_attn.v_proj.bias", "self_attn.o_proj.weight",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    ]  # fmt: skip
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    return keys | {f"model.layers.{i}.{name}" for i in range(n_layers) for name in per_layer}


def tiny_model(seed: int = 0, **overrides) -> DreamModel:
    fields = {k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("architectures", "auto_map", "torch_dtype")}
    torch.manual_seed(seed)
    return DreamModel(DreamConfig(**{**fields, **overrides})).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_parameter_names_are_the_published_ones():
    model = tiny_model()
    assert set(model.state_dict()) == published_keys(2)
    assert model.model.embed_tokens.padding_idx == EOS  # as the published model
    assert torch.equal(model.model.embed_tokens.weight[EOS], torch.zeros(HIDDEN))
    logits = model(ids()).logits
    assert logits.shape == (2, 12, VOCAB) and torch.isfinite(logits).all() and 0.01 < logits.std() < 2.0


def test_config_keeps_published_and_unknown_fields(tmp_path):
    config = DreamConfig.from_dict({**PUBLISHED_CONFIG, "some_future_field": "x"})
    token_ids = (config.mask_token_id, config.pad_token_id, config.bos_token_id, config.eos_token_id)
    assert token_ids == (MASK, EOS, EOS, EOS)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key in ("hidden_size", "num_key_value_heads", "rope_theta", "rms_norm_eps", "mask_token_id", "use_cache"):
        assert saved[key] == PUBLISHED_CONFIG[key], key
    assert saved["some_future_field"] == "x" and saved["model_type"] == "Dream"
    assert isinstance(AutoConfig.from_pretrained(tmp_path), DreamConfig)
    assert config.rope_scaling is None
    with pytest.raises(NotImplementedError, match="rope_scaling"):
        DreamConfig.from_dict({**PUBLISHED_CONFIG, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_save_pretrained_roundtrip(tmp_path):
    model, x = tiny_model(), ids()
    model.save_pretrained(tmp_path)
    assert_loads_like(tmp_path, DreamModel, model, x)
    torch.testing.assert_close(DreamModel.from_pretrained(tmp_path)(x).logits, model(x).logits, rtol=0, atol=0)


def test_published_checkpoint_loads_without_remote_code(tmp_path):
    source = tiny_model().to(torch.bfloat16)
    write_sharded_checkpoint(tmp_path, PUBLISHED_CONFIG, dict(source.state_dict()))
    poison_remote_code(tmp_path, ("configuration_dream", "modeling_dream"))
    assert_loads_like(tmp_path, DreamModel, source, ids())  # in bf16, the config.json's torch_dtype


def test_tied_embeddings_share_the_head(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(tmp_path)
    loaded, info = DreamModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"]
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def test_directory_without_weights_fails_loudly(tmp_path):
    assert_config_without_weights_fails(tmp_path, PUBLISHED_CONFIG)


def test_left_padding_with_mask_matches_unpadded():
    assert_padding_is_masked(tiny_model(), pad_id=EOS, pad=4)


def test_logits_positions_and_hidden_states():
    model, x = tiny_model(), ids(batch=3)
    full = model(x).logits
    torch.testing.assert_close(model(x, logits_positions=torch.tensor([2, 0])).logits, full[:, [2, 0]])
    per_row = torch.tensor([[3], [0], [11]])
    torch.testing.assert_close(model(x, logits_positions=per_row).logits, full[torch.arange(3)[:, None], per_row])
    hidden = model(x, return_hidden=True).hidden_states
    torch.testing.assert_close(model.get_output_embeddings()(hidden), full)


def test_diffusion_adapter_shifts_by_one():
    model, x = tiny_model(), ids()
    raw = model(x).logits
    dlm = DiffusionLM(model=model, mask_id=MASK, stop_ids=(EOS,), shift=1, native=True)
    aligned = dlm.logits(x)
    torch.testing.assert_close(aligned[:, 1:], raw[:, :-1], rtol=0, atol=0)
    positions = torch.tensor([[1, 5, 11], [2, 3, 4]])
    torch.testing.assert_close(dlm.logits(x, positions=positions), aligned[torch.arange(2)[:, None], positions])
    torch.testing.assert_close(dlm.head(dlm.encode(x))[:, 1:], raw[:, :-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    assert_checkpointing_keeps_gradients(tiny_model, ids(), attention_mask=torch.tensor([[0] * 3 + [1] * 9] * 2))


def test_rope_in_activation_dtype_and_bf16_forward():
    # Dream rotates in the activations' dtype (Qwen2); in fp32 that equals the full-precision path.
    cos, sin = rotary_cos_sin(10, 16, 1e6, torch.device("cpu"))
    q = torch.randn(1, 2, 10, 16)
    torch.testing.assert_close(apply_rotary(q, cos, sin, False), apply_rotary(q, cos, sin, True))
    model, x = tiny_model(), ids()
    out = model.to(torch.bfloat16)(x, attention_mask=torch.ones_like(x)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), tiny_model()(x).logits, rtol=0.1, atol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [True, False])
def test_cuda_bf16_matches_cpu(autocast):
    assert_cuda_bf16_matches_cpu(tiny_model, autocast)
