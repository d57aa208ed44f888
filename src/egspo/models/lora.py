"""Trainable setup of a loaded model: a LoRA adapter or full fine-tuning, and the KL reference policy.

- LoRA (``use_peft=true``, the paper's setting): the base weights stay frozen and the reference policy
  is the same model with the adapter disabled (:meth:`DiffusionLM.reference_model`), so no second copy
  of an 8B model is held.
- Full fine-tuning: every weight trains and, when the objective has a KL term, the reference policy is a
  frozen deep copy taken before training (:func:`make_reference`).
- A base loaded quantised by bitsandbytes (``load_in_4bit`` / ``load_in_8bit``, QLoRA) trains a LoRA adapter
  only (full fine-tuning is refused); its reference is the adapter-disabled quantised base, never a copy.
  :func:`prepare_quantized_base` readies it; gradient checkpointing stays :func:`enable_gradient_checkpointing`.

    dlm = prepare_for_training(dlm, cfg.model_config(), need_reference=cfg.beta > 0)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from egspo.config import ConfigError, ModelConfig
from egspo.models.adapter import DiffusionLM, unwrap
from egspo.models.loading import quantized_bits

logger = logging.getLogger(__name__)

#: The linear layers of one transformer block, under each architecture's own names
#: (docs/algorithm.md#reference-settings). Other architectures get peft's "all-linear".
DEFAULT_LORA_TARGETS: dict[str, list[str]] = {
    "llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
    "Dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
#: The list the published EGSPO/d1 code passes (Llama names): on LLaDA only q, k, v and up match
#: (``lora_target_modules: [published]``); on Dream every projection does.
PUBLISHED_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_target_modules(model: nn.Module, cfg: ModelConfig) -> list[str] | str:
    """``cfg.lora_target_modules`` if set (``["all-linear"]`` means peft's "all-linear", ``["published"]`` the
    published code's list), else the defaults."""
    if cfg.lora_target_modules == ["published"]:
        return list(PUBLISHED_LORA_TARGETS)
    if cfg.lora_target_modules:
        return "all-linear" if cfg.lora_target_modules == ["all-linear"] else list(cfg.lora_target_modules)
    model_type = getattr(getattr(unwrap(model), "config", None), "model_type", None)
    return DEFAULT_LORA_TARGETS.get(model_type or "", "all-linear")


def apply_lora(model: nn.Module, cfg: ModelConfig, peft_config: LoraConfig | None = None) -> PeftModel:
    """Wrap ``model`` in a LoRA adapter (r, alpha, dropout and targets from ``cfg``, or the user's
    ``peft_config`` as it is); base weights frozen.

    LLaDA names its LM head ``ff_out`` like the blocks' MLP output, so the default name list adapts the
    head too (peft matches names by suffix); list the targets explicitly to leave it out. peft's
    "all-linear" never adapts the head, nor does the ``published`` preset, which on LLaDA adapts only
    q, k, v and up (docs/algorithm.md#deliberate-differences-from-the-published-code).
    """
    core = unwrap(model)
    if peft_config is not None:
        lora_config, targets = peft_config, peft_config.target_modules
    else:
        targets = lora_target_modules(core, cfg)
        lora_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            task_type=None,
        )
    try:
        peft_model = get_peft_model(core, lora_config)
    except ValueError as exc:
        raise ConfigError(
            f"lora_target_modules={targets!r} does not match the linear layers of "
            f"{type(core).__name__}: {exc}"
        ) from exc
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    logger.info("LoRA r=%d on %s: %d trainable of %d parameters", lora_config.r, targets, trainable, total)
    return peft_model


def make_reference(model: nn.Module) -> nn.Module:
    """A frozen copy of ``model`` (eval mode, no gradients): the KL reference for full fine-tuning.

    Under DeepSpeed ZeRO-3 the loaded model is already partitioned: accelerate registers its DeepSpeed
    config with transformers whatever ``zero3_init_flag`` says, so ``from_pretrained`` builds it under
    ``deepspeed.zero.Init`` and each parameter's ``data`` is an empty placeholder (the values are in
    its ``ds_tensor`` shard). A plain deep copy would copy the placeholders; the values are gathered
    into the copy one parameter at a time instead. The copy is whole until
    :func:`egspo.run_setup.prepare_reference` gives it its own ZeRO-3 engine.
    """
    core = unwrap(model)
    reference = copy.deepcopy(core)
    partitioned = [(source, copied) for source, copied in zip(core.parameters(), reference.parameters(), strict=True)
                   if hasattr(source, "ds_id")]
    if partitioned:
        import deepspeed  # only partitioned parameters come here, so deepspeed is installed

        logger.info("Copying the KL reference from %d ZeRO-3 partitioned parameters.", len(partitioned))
        for source, copied in partitioned:
            with deepspeed.zero.GatheredParameters([source], modifier_rank=None):  # a collective
                copied.data = source.data.detach().clone()
    reference.eval()
    reference.requires_grad_(False)
    return reference


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute block activations in the backward pass (non-reentrant, so frozen inputs work with LoRA)."""
    core: Any = unwrap(model)  # a transformers model; its checkpointing methods differ between versions
    if not getattr(core, "supports_gradient_checkpointing", False):
        raise ConfigError(
            f"gradient_checkpointing=true but {type(core).__name__} does not support gradient "
            "checkpointing; set it to false."
        )
    kwargs = {"use_reentrant": False}
    if hasattr(core, "activation_checkpointing_enable"):  # the new name; the old one warns where both exist
        core.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        core.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_quantized_base(model: nn.Module) -> None:
    """Ready a bitsandbytes-quantised base for LoRA training: every base weight frozen and, where float16 is
    involved (the load dtype or the 4-bit compute dtype), peft's ``prepare_model_for_kbit_training``, which
    keeps norms, embedding and LM head in float32 so that float16 does not overflow there.

    With bf16 (the default) that upcast is skipped: bf16 has float32's range, and the float32 copies would
    cost 4 bytes per embedding and head parameter (about 2 GB on LLaDA-8B). peft's own gradient
    checkpointing is never switched on here: ``gradient_checkpointing`` goes through
    :func:`enable_gradient_checkpointing` (non-reentrant, so no input-gradient hook is needed).
    """
    core: Any = unwrap(model)  # a transformers model (get_input_embeddings)
    quantizer = getattr(core, "hf_quantizer", None)  # transformers' record of the BitsAndBytesConfig
    compute = getattr(getattr(quantizer, "quantization_config", None), "bnb_4bit_compute_dtype", None)
    load_dtype = core.get_input_embeddings().weight.dtype
    if torch.float16 in (compute, load_dtype):
        from peft import prepare_model_for_kbit_training

        prepare_model_for_kbit_training(core, use_gradient_checkpointing=False)
        logger.info("Quantised base in float16: norms, embedding and LM head kept in float32 for training.")
    else:
        core.requires_grad_(False)


def prepare_for_training(dlm: DiffusionLM, cfg: ModelConfig, *, need_reference: bool,
                         peft_config: LoraConfig | None = None) -> DiffusionLM:
    """``dlm`` with its model made trainable as ``cfg`` says (LoRA or full) and the reference policy wired.

    ``need_reference`` (the trainer's call, e.g. ``beta > 0``) only matters for full fine-tuning: with
    LoRA the reference is the adapter-disabled model at no extra memory.
    """
    model = dlm.model
    reference = None
    already_peft = isinstance(model, PeftModel)
    quantized = quantized_bits(model) is not None
    if quantized and not (cfg.lora or already_peft):
        raise ConfigError(
            "The model is quantised (bitsandbytes 4-/8-bit) and use_peft=false: quantised weights cannot be "
            "trained (they have no gradients); set use_peft=true to train a LoRA adapter on top.")
    if already_peft:  # the user's own adapter: train it, the reference is the adapter-disabled model
        cfg = dataclasses.replace(cfg, lora=True)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
    if not cfg.lora:
        unwrap(model).requires_grad_(True)
        # Copied before gradient checkpointing is switched on: the reference never runs a backward pass.
        reference = make_reference(model) if need_reference else None
    if quantized and not already_peft:
        prepare_quantized_base(model)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora and not already_peft:
        model = apply_lora(model, cfg, peft_config)
    return dataclasses.replace(dlm, model=model, reference=reference)
