"""Generation on the native LLaDA and Dream classes: ``diffusion_generate`` and a ``generation_config.json``.

    model = AutoModel.from_pretrained("models/sudoku")          # after `import egspo`
    texts = model.diffusion_generate(prompts=["..."], tokenizer=tokenizer)
    ids = model.diffusion_generate(input_ids, attention_mask, gen_length=64, steps=32)

Both call :func:`egspo.generation.generate`, the trainer's own sampler. The sampler defaults a model
carries live in its ``generation_config`` (a plain transformers :class:`~transformers.GenerationConfig`,
saved as ``generation_config.json`` by ``save_pretrained`` and read back by ``from_pretrained``):

    max_new_tokens   completion length (gen_length)
    block_length     semi-autoregressive block length        (egspo key)
    steps            denoising steps over the completion     (egspo key)
    remasking        low_confidence or random                (egspo key)
    mask_token_id    the mask token                          (egspo key)
    do_sample / temperature   greedy is do_sample=false (no temperature), else do_sample=true with it

Greedy is written as ``do_sample=false`` rather than ``temperature=0`` because transformers refuses to
save a config whose temperature is set while ``do_sample`` is false. A config counts as egspo's when it
has ``block_length`` and ``steps``; others (e.g. a published checkpoint's) are ignored.

``model.generate()`` raises a :class:`NotImplementedError` that names these entry points rather than
routing to them: transformers' ``generate`` arguments (``do_sample``, ``top_p``, ``num_beams``,
streamers, logits processors, ...) describe autoregressive decoding, and silently accepting a subset of
them would mislead more than a clear refusal.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

import torch
from torch import nn
from transformers import GenerationConfig

from egspo.config import Remasking, SamplerConfig

logger = logging.getLogger(__name__)

#: Sampler defaults of a model whose generation_config has none of egspo's fields.
DEFAULT_GEN_LENGTH = 128
DEFAULT_BLOCK_LENGTH = 32
#: Denoising steps per completion token (steps = gen_length / 2, as in LLaDA's and d1's evaluations).
DEFAULT_STEPS_RATIO = 0.5
DEFAULT_TEMPERATURE = 0.0
DEFAULT_REMASKING: Remasking = "low_confidence"
#: The keys of ``GenerationConfig.from_pretrained`` that locate the file (the rest of the loading kwargs
#: would be taken as config overrides).
_DOWNLOAD_KEYS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def sampler_defaults(generation_config: GenerationConfig | None) -> dict[str, Any]:
    """egspo's sampler fields stored in ``generation_config`` (empty when it is not egspo's)."""
    if generation_config is None:
        return {}
    # the egspo keys are extra attributes of a GenerationConfig, hence getattr
    found = {
        "gen_length": generation_config.max_new_tokens,
        "block_length": getattr(generation_config, "block_length", None),
        "steps": getattr(generation_config, "steps", None),
        "remasking": getattr(generation_config, "remasking", None),
    }
    if found["block_length"] is None or found["steps"] is None:
        return {}
    if generation_config.do_sample:
        found["temperature"] = 1.0 if generation_config.temperature is None else generation_config.temperature
    elif generation_config.do_sample is False:
        found["temperature"] = 0.0
    return {k: v for k, v in found.items() if v is not None}


def diffusion_generation_config(
    sampler: SamplerConfig, mask_token_id: int | None = None, base: GenerationConfig | None = None
) -> GenerationConfig:
    """``base``'s fields (token ids, ...) and ``sampler``'s settings as the model's defaults, in a new config."""
    fields: dict[str, Any] = {
        "max_new_tokens": sampler.gen_length,
        "block_length": sampler.block_length,
        "steps": sampler.steps,
        "remasking": sampler.remasking,
        "do_sample": sampler.temperature > 0,
        "temperature": sampler.temperature if sampler.temperature > 0 else None,
        # a config marked as derived from the model config would drop the extra (egspo) keys, now and on load
        "_from_model_config": False,
    }
    if mask_token_id is not None:
        fields["mask_token_id"] = int(mask_token_id)
    inherited = base.to_diff_dict() if base is not None else {}
    inherited.pop("transformers_version", None)
    return GenerationConfig(**{**inherited, **fields})


class DiffusionGenerationMixin:
    """``diffusion_generate`` and the ``generation_config`` plumbing for :class:`NativeDiffusionLM`.

    Listed before ``PreTrainedModel`` in the bases, so that :meth:`can_generate` (which makes
    transformers create, save and load a ``generation_config``) wins.
    """

    config: Any  # set by PreTrainedModel

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def adjust_generation_fn(
        self,
        generation_config: GenerationConfig | None,
        from_auto_class: bool,
        from_pipeline: str | None,
        pretrained_model_name_or_path: str | None,
        **kwargs: Any,
    ) -> None:
        """Called by ``from_pretrained`` (it calls ``GenerationMixin``'s hook of this name, which these
        models do not inherit): take the ``generation_config`` argument, else the checkpoint's
        ``generation_config.json`` when it has one."""
        if generation_config is not None:
            self.generation_config = copy.deepcopy(generation_config)
            return
        if pretrained_model_name_or_path is None:
            return
        where = {key: kwargs[key] for key in _DOWNLOAD_KEYS if kwargs.get(key) is not None}
        try:
            self.generation_config = GenerationConfig.from_pretrained(
                pretrained_model_name_or_path, _from_auto=from_auto_class, _from_pipeline=from_pipeline, **where
            )
        except OSError:
            logger.debug("No generation_config.json in %s; the model config's token ids are used.",
                         pretrained_model_name_or_path)

    def set_diffusion_defaults(
        self,
        *,
        gen_length: int,
        block_length: int,
        steps: int,
        temperature: float = DEFAULT_TEMPERATURE,
        remasking: Remasking = DEFAULT_REMASKING,
    ) -> None:
        """Store sampler defaults in ``generation_config`` (checked now, written by ``save_pretrained``)."""
        sampler = SamplerConfig(gen_length=gen_length, block_length=block_length, steps=steps,
                                temperature=temperature, remasking=remasking)
        self.generation_config = diffusion_generation_config(
            sampler, getattr(self.config, "mask_token_id", None), getattr(self, "generation_config", None)
        )

    def diffusion_generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        *,
        prompts: Any = None,
        tokenizer: Any = None,
        **options: Any,
    ) -> Any:
        """Decode with egspo's block sampler; unset options come from ``generation_config``.

        ``input_ids`` (B, L_p), left-padded, with their ``attention_mask``: returns the token ids
        (B, L_p + gen_length), prompt included, as transformers' ``generate`` does. ``prompts`` (str,
        list of str, or chat message lists) with ``tokenizer``: returns the completion texts. Options:
        those of :func:`egspo.generation.generate` (gen_length, block_length, steps, temperature,
        remasking, seed, batch_size, return_trajectory, and chat_template for ``prompts``).
        """
        from egspo.generation import generate, generate_ids

        if (input_ids is None) == (prompts is None):
            raise TypeError("diffusion_generate takes either input_ids (token ids) or prompts= (texts), not both "
                            "or neither.")
        if input_ids is None:
            if tokenizer is None:
                raise TypeError("diffusion_generate(prompts=...) needs tokenizer= to encode and decode the texts.")
            return generate(cast(nn.Module, self), tokenizer, prompts, **options)
        return generate_ids(cast(nn.Module, self), input_ids, attention_mask, tokenizer=tokenizer, **options)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} is a masked diffusion LM: transformers' autoregressive generate() does not "
            "apply to it. Use model.diffusion_generate(input_ids, attention_mask, gen_length=..., steps=...) "
            "or egspo.generate(model, tokenizer, prompts)."
        )
