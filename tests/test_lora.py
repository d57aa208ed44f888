import pytest
import torch
from peft import PeftModel

from egspo.config import ConfigError, ModelConfig
from egspo.models.adapter import DiffusionLM
from egspo.models.dream import DreamConfig, DreamModel
from egspo.models.lora import (
    DEFAULT_LORA_TARGETS,
    PUBLISHED_LORA_TARGETS,
    apply_lora,
    make_reference,
    prepare_for_training,
)
from egspo.models.tiny import random_model

LLADA_BLOCK_LINEARS = DEFAULT_LORA_TARGETS["llada"]


def _tiny_dlm() -> DiffusionLM:
    model, tokenizer = random_model(seed=0, n_layers=2, d_model=64, n_heads=2, mlp_hidden_size=128)
    return DiffusionLM(model=model, mask_id=tokenizer.mask_token_id, stop_ids=(2, 0), native=True)


def _tiny_dream() -> DreamModel:
    return DreamModel(DreamConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64, mask_token_id=3, pad_token_id=0, eos_token_id=2,
    ))


def _lora_cfg(**kwargs) -> ModelConfig:
    return ModelConfig(name_or_path="builtin:tiny", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, **kwargs)


def _batch():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(4, 100, (2, 12), generator=gen)


def _lora_module_names(model):
    return {name.removeprefix("base_model.model.") for name, m in model.named_modules() if hasattr(m, "lora_A")}


def test_lora_default_targets_are_every_block_linear_and_the_head():
    dlm = _tiny_dlm()
    peft_model = apply_lora(dlm.model, _lora_cfg())
    assert isinstance(peft_model, PeftModel)
    expected = {f"model.transformer.blocks.{i}.{n}" for i in range(2) for n in LLADA_BLOCK_LINEARS}
    # the blocks' "ff_out" also matches the LM head model.transformer.ff_out (peft matches by suffix)
    assert _lora_module_names(peft_model) == expected | {"model.transformer.ff_out"}
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_published_preset_adapts_only_the_llama_names_llada_has():
    names = _lora_module_names(apply_lora(_tiny_dlm().model, _lora_cfg(lora_target_modules=["published"])))
    llama_names_llada_has = ("q_proj", "k_proj", "v_proj", "up_proj")
    assert names == {f"model.transformer.blocks.{i}.{n}" for i in range(2) for n in llama_names_llada_has}
    dream = _lora_module_names(apply_lora(_tiny_dream(), _lora_cfg(lora_target_modules=["published"])))
    assert {n.rsplit(".", 1)[1] for n in dream} == set(PUBLISHED_LORA_TARGETS) and len(dream) == 7


def test_explicit_and_all_linear_targets():
    assert _lora_module_names(apply_lora(_tiny_dlm().model, _lora_cfg(lora_target_modules=["q_proj"]))) == {
        f"model.transformer.blocks.{i}.q_proj" for i in range(2)
    }
    names = _lora_module_names(apply_lora(_tiny_dlm().model, _lora_cfg(lora_target_modules=["all-linear"])))
    assert len(names) == 2 * len(LLADA_BLOCK_LINEARS) and "model.transformer.ff_out" not in names
    with pytest.raises(ConfigError, match="lora_target_modules"):
        apply_lora(_tiny_dlm().model, _lora_cfg(lora_target_modules=["no_such_layer"]))


def test_dream_default_targets():
    names = _lora_module_names(apply_lora(_tiny_dream(), _lora_cfg()))
    assert {n.rsplit(".", 1)[1] for n in names} == set(DEFAULT_LORA_TARGETS["Dream"])
    assert "lm_head" not in names


def test_lora_step_changes_only_adapter_and_reference_is_base():
    dlm = _tiny_dlm()
    ids = _batch()
    with torch.no_grad():
        base_logits = dlm.logits(ids)
    base_state = {k: v.clone() for k, v in dlm.model.state_dict().items()}
    dlm = prepare_for_training(dlm, _lora_cfg(), need_reference=True)
    assert dlm.reference is None
    with torch.no_grad(), dlm.reference_model() as ref:
        torch.testing.assert_close(dlm.logits(ids, model=ref), base_logits)
        torch.testing.assert_close(dlm.logits(ids), base_logits)  # lora_B starts at zero

    # Positions through the peft wrapper (native fast path).
    positions = torch.tensor([[1, 5], [0, 11]])
    with torch.no_grad():
        full = dlm.logits(ids)
        expected = full.gather(1, positions[..., None].expand(-1, -1, full.shape[-1]))
        torch.testing.assert_close(dlm.logits(ids, positions=positions), expected)

    dlm.model.train()
    optimizer = torch.optim.SGD([p for p in dlm.model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # the first step moves lora_B off zero, the second also moves lora_A
        optimizer.zero_grad()
        dlm.logits(ids, positions=torch.tensor([2, 3])).logsumexp(-1).mean().backward()
        optimizer.step()
    dlm.model.eval()

    after = {
        k.removeprefix("base_model.model.").replace(".base_layer", ""): v for k, v in dlm.model.state_dict().items()
    }
    assert base_state.keys() <= after.keys()
    changed = {k for k, v in base_state.items() if not torch.equal(v, after[k])}
    assert not changed, f"base weights changed: {changed}"
    lora_changed = [k for k, v in dlm.model.named_parameters() if "lora_" in k and v.abs().sum() > 0]
    assert any("lora_B" in k for k in lora_changed)
    with torch.no_grad():
        assert not torch.allclose(dlm.logits(ids), base_logits)
        with dlm.reference_model() as ref:
            torch.testing.assert_close(dlm.logits(ids, model=ref), base_logits)


def test_full_finetuning_reference_is_frozen_copy():
    dlm = _tiny_dlm()
    for p in dlm.model.parameters():
        p.requires_grad_(False)  # prepare_for_training must turn full training back on
    ids = _batch()
    dlm = prepare_for_training(dlm, ModelConfig(lora=False), need_reference=True)
    ref = dlm.reference
    assert ref is not None and ref is not dlm.model and not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert all(p.requires_grad for p in dlm.model.parameters())
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    optimizer = torch.optim.SGD(dlm.model.parameters(), lr=0.1)
    dlm.model.train()
    dlm.logits(ids).logsumexp(-1).mean().backward()
    optimizer.step()
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_state.items())
    assert not all(torch.equal(v, dlm.model.state_dict()[k]) for k, v in ref_state.items())
    with torch.no_grad(), dlm.reference_model() as reference:
        assert reference is ref
    assert prepare_for_training(_tiny_dlm(), ModelConfig(lora=False), need_reference=False).reference is None
    frozen = make_reference(_tiny_dlm().model)
    assert not frozen.training and not any(p.requires_grad for p in frozen.parameters())


def test_gradient_checkpointing_with_lora_keeps_adapter_gradients():
    dlm = prepare_for_training(_tiny_dlm(), _lora_cfg(gradient_checkpointing=True), need_reference=False)
    assert any(getattr(m, "gradient_checkpointing", False) for m in dlm.core.modules())
    dlm.model.train()
    dlm.logits(_batch()).logsumexp(-1).mean().backward()
    grads = [p.grad for n, p in dlm.model.named_parameters() if "lora_B" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
