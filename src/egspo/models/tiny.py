"""Small random-init LLaDA-architecture models with the character tokenizer, for CPU tests and quick runs.

Presets (parameter counts with the 107-token character vocabulary):
- ``tiny``: d_model 256, 4 layers, 4 heads, MLP 768: about 3.4M parameters, trains on a laptop CPU;
- ``small``: d_model 512, 8 layers, 8 heads, MLP 1536: about 27M parameters, for GPU experiments.

Both are the real LLaDA block (bidirectional attention, RoPE, SwiGLU, RMSNorm, untied head), so every
code path exercised with them is the one LLaDA-8B takes. Write one to disk with

    egspo new-model --preset tiny --out models/tiny [--seed 0]

and load it back with ``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` (after
``import egspo``) or ``model_name_or_path=models/tiny``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerFast

from egspo.models.diffusion_generation import DEFAULT_BLOCK_LENGTH, DEFAULT_GEN_LENGTH, DEFAULT_STEPS_RATIO
from egspo.models.llada import LLaDAConfig, LLaDAModelLM
from egspo.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"d_model": 256, "n_layers": 4, "n_heads": 4, "mlp_hidden_size": 768, "max_sequence_length": 1024},
    "small": {"d_model": 512, "n_layers": 8, "n_heads": 8, "mlp_hidden_size": 1536, "max_sequence_length": 2048},
    # LLaDA-8B's blocks (7.5B parameters) with the character vocabulary: random weights, for timing runs
    # of the whole trainer at the 8B shape (scripts/scaling_8b_gpu.sh), never for training
    "llada-8b-blocks": {"d_model": 4096, "n_layers": 32, "n_heads": 32, "mlp_hidden_size": 12288,
                        "max_sequence_length": 4096, "rope_theta": 500000.0},
}


def preset_config(
    preset: str, vocab_size: int, mask_token_id: int, eos_token_id: int, pad_token_id: int, **overrides: Any
) -> LLaDAConfig:
    """The LLaDA config of a preset for a given vocabulary; ``overrides`` replace any LLaDAConfig field."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown model preset {preset!r}; presets: {', '.join(PRESETS)}.")
    fields: dict[str, Any] = {
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "weight_tying": False,  # untied, like LLaDA-8B
        **PRESETS[preset],
        "vocab_size": vocab_size,
        "embedding_size": vocab_size,  # no padding rows: every logit is a real token the sampler may pick
        "mask_token_id": mask_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        **overrides,
    }
    fields.setdefault("n_kv_heads", fields["n_heads"])
    return LLaDAConfig(**fields)


def tiny_config(
    vocab_size: int, mask_token_id: int, eos_token_id: int, pad_token_id: int, **overrides: Any
) -> LLaDAConfig:
    """The ``tiny`` preset (a few million parameters); see :func:`preset_config`."""
    return preset_config("tiny", vocab_size, mask_token_id, eos_token_id, pad_token_id, **overrides)


def random_model(
    preset: str = "tiny", seed: int = 0, **overrides: Any
) -> tuple[LLaDAModelLM, PreTrainedTokenizerFast]:
    """A random-init model of ``preset`` (eval mode, fp32) and the character tokenizer; its
    ``generation_config`` holds egspo's sampler defaults (saved as ``generation_config.json``).

    The weights depend only on ``seed``: they are drawn under a forked RNG, so the caller's global
    random state is neither used nor changed.
    """
    tokenizer = build_char_tokenizer()
    config = preset_config(
        preset, len(tokenizer), tokenizer.mask_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, **overrides
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LLaDAModelLM(config)
    model.set_diffusion_defaults(gen_length=DEFAULT_GEN_LENGTH, block_length=DEFAULT_BLOCK_LENGTH,
                                 steps=round(DEFAULT_GEN_LENGTH * DEFAULT_STEPS_RATIO))
    return model.eval(), tokenizer


def new_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0, **overrides: Any) -> Path:
    """Write a random-init model (safetensors + config) and its tokenizer to ``out_dir``; return the path."""
    out = Path(out_dir)
    model, tokenizer = random_model(preset, seed, **overrides)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("Wrote a random %s model (%.1fM parameters, seed %d) to %s", preset, n_params / 1e6, seed, out)
    return out
