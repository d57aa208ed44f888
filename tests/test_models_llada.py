"""Native LLaDA: published key layout and config, Auto-class loading, masking, positions, RoPE."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

import egspo  # registers the native models with the Auto classes
from egspo.models import LLaDAConfig, LLaDAModelLM
from egspo.models.llada import apply_rotary, rotary_cos_sin

VOCAB, EMBED, MASK, EOS = 100, 128, 99, 98

# Every field of the published GSAI-ML/LLaDA-8B-Instruct config.json, with tiny sizes.
PUBLISHED_CONFIG = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 64,
    "embedding_dropout": 0.0,
    "embedding_size": EMBED,
    "eos_token_id": EOS,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": MASK,
    "max_sequence_length": 64,
    "mlp_hidden_size": 96,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "pad_token_id": EOS,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": VOCAB,
    "weight_tying": False,
}


def published_keys(n_layers: int, tied: bool) -> set[str]:
    """Tensor names of the published checkpoint, written out independently of our modules."""
    per_block = ["attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"]
    keys = {"model.transformer.wte.weight", "model.transformer.ln_f.weight"}
    keys |= {f"model.transformer.blocks.{i}.{name}.weight" for i in range(n_layers) for name in per_block}
    if not tied:
        keys.add("model.transformer.ff_out.weight")
    return keys


def write_sharded_checkpoint(directory: Path, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Two safetensors shards + index + config.json, the way the hub checkpoints are laid out."""
    directory.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for filename, shard_names in shards.items():
        save_file({n: tensors[n].contiguous() for n in shard_names}, str(directory / filename), {"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(config))


def poison_remote_code(directory: Path, modules: tuple[str, ...]) -> None:
    """Write the auto_map's modules so that executing them fails: loading must never run them."""
    for module in modules:
        (directory / f"{module}.py").write_text("raise RuntimeError('remote code was executed')\n")


def assert_loads_like(directory: Path, model_class: type, reference: torch.nn.Module, x: torch.Tensor) -> None:
    """Both Auto classes load ``directory`` into ``model_class`` with every key matched and the
    reference's exact logits."""
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        model, info = auto_class.from_pretrained(directory, output_loading_info=True)
        assert type(model) is model_class
        assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
        assert model.dtype == reference.dtype
        torch.testing.assert_close(model.eval()(x).logits, reference(x).logits, rtol=0, atol=0)


def assert_checkpointing_keeps_gradients(make_model, x: torch.Tensor, **forward_kwargs) -> None:
    """``gradient_checkpointing_enable()`` recomputes activations without changing any gradient."""

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = make_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(x, **forward_kwargs).logits.logsumexp(-1).sum().backward()
        return {n: p.grad for n, p in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, msg=name)


def assert_padding_is_masked(model: torch.nn.Module, pad_id: int, pad: int = 3) -> None:
    """A left-padded row under the attention mask gives the unpadded row's logits on its real tokens,
    the unpadded row next to it is unaffected, and without the mask the padding would leak."""
    x, other = ids(batch=1, length=10), ids(batch=1, length=10 + pad, seed=7)
    batch = torch.cat([torch.cat([torch.full((1, pad), pad_id), x], dim=1), other])
    mask = torch.ones_like(batch)
    mask[0, :pad] = 0
    out = model(batch, attention_mask=mask).logits
    torch.testing.assert_close(out[0, pad:], model(x).logits[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1], model(other).logits[0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(model(batch[:1]).logits[0, pad:], out[0, pad:], atol=1e-4)
    torch.testing.assert_close(model(x, attention_mask=torch.ones_like(x)).logits, model(x).logits)


def assert_config_without_weights_fails(directory: Path, config: dict) -> None:
    """A directory with config.json but no weights is an error, never a silently random model."""
    (directory / "config.json").write_text(json.dumps(config))
    for auto_class in (AutoModel, AutoModelForMaskedLM):
        with pytest.raises(OSError, match="safetensors|pytorch_model"):
            auto_class.from_pretrained(directory)


def tiny_config(**overrides) -> LLaDAConfig:
    fields = {k: v for k, v in PUBLISHED_CONFIG.items() if k not in ("architectures", "auto_map", "torch_dtype")}
    return LLaDAConfig(**{**fields, **overrides})


def tiny_model(seed: int = 0, **overrides) -> LLaDAModelLM:
    torch.manual_seed(seed)
    return LLaDAModelLM(tiny_config(**overrides)).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_registration_is_idempotent():
    egspo.models._register()
    egspo.models._register()
    assert type(AutoConfig.for_model("llada")) is LLaDAConfig
    assert type(AutoModel.from_config(tiny_config())) is LLaDAModelLM


def test_parameter_names_are_the_published_ones():
    assert set(tiny_model().state_dict()) == published_keys(2, tied=False)


def test_random_init_is_sane():
    model = tiny_model()
    logits = model(ids()).logits
    assert logits.shape == (2, 12, EMBED) and torch.isfinite(logits).all()
    assert 0.01 < logits.std() < 2.0
    assert torch.equal(model.model.transformer.ln_f.weight, torch.ones(64))
    assert abs(model.model.transformer.wte.weight.std().item() - 0.02) < 0.005


def test_config_keeps_published_and_unknown_fields(tmp_path):
    config = LLaDAConfig.from_dict({**PUBLISHED_CONFIG, "some_future_field": [1, 2]})
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (64, 4, 2)
    assert (config.mask_token_id, config.eos_token_id, config.pad_token_id) == (MASK, EOS, EOS)
    assert config.effective_n_kv_heads == 2 and config.head_dim == 16
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    for key, value in PUBLISHED_CONFIG.items():
        if key not in ("transformers_version", "torch_dtype", "auto_map", "architectures"):
            assert saved[key] == value, key
    assert saved["some_future_field"] == [1, 2]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), LLaDAConfig)


@pytest.mark.parametrize("field, value", [("block_type", "sequential"), ("alibi", True), ("scale_logits", True)])
def test_unsupported_variants_are_refused(field, value):
    with pytest.raises(NotImplementedError, match=field):
        LLaDAModelLM(tiny_config(**{field: value}))


def test_save_pretrained_roundtrip(tmp_path):
    model, x = tiny_model(), ids()
    model.save_pretrained(tmp_path)
    assert_loads_like(tmp_path, LLaDAModelLM, model, x)
    torch.testing.assert_close(LLaDAModelLM.from_pretrained(tmp_path)(x).logits, model(x).logits, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_published_checkpoint_loads_without_remote_code(tmp_path, tied):
    source = tiny_model(weight_tying=tied).to(torch.bfloat16)
    tensors = {k: v for k, v in source.state_dict().items() if k in published_keys(2, tied)}
    assert set(tensors) == published_keys(2, tied)
    write_sharded_checkpoint(tmp_path, {**PUBLISHED_CONFIG, "weight_tying": tied}, tensors)
    poison_remote_code(tmp_path, ("configuration_llada", "modeling_llada"))
    assert_loads_like(tmp_path, LLaDAModelLM, source, ids())  # in bf16, the config.json's torch_dtype
    if tied:
        model = AutoModel.from_pretrained(tmp_path)
        assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def test_directory_without_weights_fails_loudly(tmp_path):
    assert_config_without_weights_fails(tmp_path, PUBLISHED_CONFIG)


def test_left_padding_with_mask_matches_unpadded():
    assert_padding_is_masked(tiny_model(), pad_id=EOS)


def test_logits_positions_and_hidden_states():
    model, x = tiny_model(), ids(batch=3)
    full = model(x).logits
    shared = torch.tensor([0, 5, 11])
    torch.testing.assert_close(model(x, logits_positions=shared).logits, full[:, shared])
    per_row = torch.tensor([[1, 2], [7, 0], [11, 11]])
    expected = torch.stack([full[b, per_row[b]] for b in range(3)])
    torch.testing.assert_close(model(x, logits_positions=per_row).logits, expected)
    out = model(x, return_hidden=True)
    assert out.logits is None and out.hidden_states.shape == (3, 12, 64)
    torch.testing.assert_close(model.get_output_embeddings()(out.hidden_states), full)


@pytest.mark.parametrize("argument", ["labels", "position_ids"])
def test_unsupported_forward_arguments_are_rejected(argument):
    with pytest.raises(TypeError, match=argument):
        tiny_model()(ids(), **{argument: ids()})


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.model.transformer.blocks)
    assert_checkpointing_keeps_gradients(tiny_model, ids(), logits_positions=torch.tensor([1, 4]))


def test_rope_matches_an_independent_complex_reference():
    head_dim, length, theta = 8, 6, 500000.0
    cos, sin = rotary_cos_sin(length, head_dim, theta, torch.device("cpu"))
    x = torch.randn(2, 3, length, head_dim)
    rotated = apply_rotary(x, cos, sin, full_precision=True)
    # Reference: dims (j, j + head_dim/2) form a complex number rotated by angle pos * theta^(-2j/head_dim).
    half = head_dim // 2
    freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / head_dim)
    angle = torch.arange(length, dtype=torch.float64)[:, None] * freq
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(rotated, torch.cat([z.real, z.imag], dim=-1).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1))


def test_rope_scores_depend_only_on_relative_position():
    head_dim, theta = 16, 500000.0
    cos, sin = rotary_cos_sin(40, head_dim, theta, torch.device("cpu"))
    q, k = torch.randn(head_dim), torch.randn(head_dim)

    def score(i: int, j: int) -> float:
        qi = apply_rotary(q[None], cos[i : i + 1], sin[i : i + 1], True)
        kj = apply_rotary(k[None], cos[j : j + 1], sin[j : j + 1], True)
        return (qi * kj).sum().item()

    for offset in (-5, 0, 3):
        assert math.isclose(score(10, 10 + offset), score(30, 30 + offset), rel_tol=1e-4, abs_tol=1e-5)
    assert not math.isclose(score(10, 13), score(10, 17), rel_tol=1e-3)


def test_bf16_forward_runs():
    model = tiny_model().to(torch.bfloat16)
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    out = model(x, attention_mask=mask).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), tiny_model()(x, attention_mask=mask).logits, rtol=0.1, atol=0.05)


def assert_cuda_bf16_matches_cpu(make_model, autocast: bool) -> None:
    """On CUDA in bf16 (autocast over fp32 weights, or bf16 weights with gradient checkpointing) a
    padded batch gives the CPU fp32 logits up to bf16 rounding, and finite gradients."""
    x = ids()
    mask = torch.ones_like(x)
    mask[1, :4] = 0
    expected = make_model()(x, attention_mask=mask).logits
    model = make_model().cuda().train()
    if not autocast:
        model.to(torch.bfloat16).gradient_checkpointing_enable()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(x.cuda(), attention_mask=mask.cuda()).logits
    out.float().logsumexp(-1).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    torch.testing.assert_close(out.float().cpu(), expected, rtol=0.1, atol=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("autocast", [True, False])
def test_cuda_bf16_matches_cpu(autocast):
    assert_cuda_bf16_matches_cpu(tiny_model, autocast)


@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_backends_agree(padded):
    """The fused CPU attention kernel and the math kernel compute the same logits in float32 (the GPU
    benchmark's bf16 comparison of the two is dominated by rounding; docs/benchmarks.md)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, x = tiny_model(), ids(batch=3, length=16)
    mask = torch.ones_like(x)
    if padded:
        mask[0, :5] = 0
    with torch.no_grad():
        with sdpa_kernel([SDPBackend.MATH]):
            math_logits = model(x, attention_mask=mask).logits
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            fused_logits = model(x, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(fused_logits[keep], math_logits[keep], rtol=1e-5, atol=1e-5)
