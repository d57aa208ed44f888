"""Native LLaDA (GSAI-ML/LLaDA-8B-Instruct and -Base) for transformers 5, weight-compatible.

The published checkpoint ships OLMo-derived remote code (``modeling_llada.py``); this module is a
small re-implementation of the one variant the checkpoints use, the bidirectional "llama" block,
with the same parameter names so ``from_pretrained`` reads the published safetensors directly:

    model.transformer.wte.weight                       (embedding_size, d_model)
    model.transformer.blocks.{i}.attn_norm.weight      RMSNorm before attention
    model.transformer.blocks.{i}.{q,k,v}_proj.weight   q: d_model -> d_model, k/v: -> n_kv_heads * head_dim
    model.transformer.blocks.{i}.attn_out.weight       attention output projection
    model.transformer.blocks.{i}.ff_norm.weight        RMSNorm before the MLP
    model.transformer.blocks.{i}.ff_proj.weight        gate branch (SiLU applied)
    model.transformer.blocks.{i}.up_proj.weight        linear branch
    model.transformer.blocks.{i}.ff_out.weight         MLP output projection
    model.transformer.ln_f.weight                      final RMSNorm
    model.transformer.ff_out.weight                    LM head (tied to ``wte`` when ``weight_tying``)

Block: ``x + attn_out(attn(attn_norm(x)))`` then ``x + ff_out(silu(ff_proj(h)) * up_proj(h))`` with
``h = ff_norm(x)``. Attention has no causal mask; RoPE is the rotate-half variant computed in fp32.
Unlike the published code, a 0/1 ``attention_mask`` is honoured as a key-padding mask, so padded
prompts do not leak into real tokens.

The helpers at the top (RMSNorm, RoPE, bidirectional SDPA, the block loop) and the
:class:`NativeDiffusionLM` base (forward contract, initialization) are shared with
:mod:`egspo.models.dream`, which is the same computation with Qwen2 names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from egspo.models.adapter import gather_positions
from egspo.models.diffusion_generation import DiffusionGenerationMixin
from egspo.models.kv_cache import KVCache, LayerKV, splice

# Keyword arguments that generic callers (Trainer, peft) pass and that do not change what a
# bidirectional, cache-free model computes. Anything else that is not None/False is an error, so that
# e.g. labels or position_ids are never silently ignored (positions are always 0..L-1: RoPE is
# relative, so left padding under a key-padding mask needs no position ids).
_IGNORED_FORWARD_KWARGS = frozenset({"use_cache", "return_dict", "num_items_in_batch"})


# -- shared layers -------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm normalized in fp32, cast back to the input dtype, then scaled (LLaDA and Qwen2 agree)."""

    def __init__(self, size: int, eps: float, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(dtype)
        return h if self.bias is None else h + self.bias


def rotary_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``(cos, sin)`` of shape (seq_len, head_dim) for positions 0..seq_len-1, rotate-half layout.

    Computed per forward instead of cached in buffers: it costs L x head_dim/2 flops, and buffers
    would have to be re-created after transformers 5 builds the model on the meta device.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((freqs, freqs), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, full_precision: bool) -> torch.Tensor:
    """Rotate ``x`` (..., L, head_dim) by position. ``full_precision`` rotates in fp32 (LLaDA); otherwise
    cos/sin are cast to ``x.dtype`` first, as Qwen2/Dream do."""
    if full_precision:
        xf = x.float()
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def key_padding_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Boolean SDPA mask (B, 1, 1, L) that hides padded keys, or None when nothing is padded.

    A row with no real token at all keeps every key visible so SDPA does not return NaN for it.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    # one host sync; saves the masked (slower) SDPA kernel in the common case. Skipped under
    # torch.compile, where it would break the graph (the sampler drops all-ones masks itself).
    if not torch.compiler.is_compiling() and bool(keep.all()):
        return None
    keep = keep | ~keep.any(dim=-1, keepdim=True)
    return keep[:, None, None, :]


def attend(
    x: torch.Tensor,
    projections: tuple[nn.Module, nn.Module, nn.Module],
    head_dim: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor | None,
    rope_full_precision: bool,
    dropout_p: float,
    past_kv: LayerKV | None = None,
    kv_positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LayerKV]:
    """Bidirectional multi-head attention up to (not including) the output projection.

    ``projections`` are the q, k, v linears; the head counts follow from their output sizes (k/v may
    have fewer heads: GQA). Returns (B, L, n_heads * head_dim) and this call's own keys/values (after
    RoPE, before head repetition). With ``past_kv`` (the whole sequence's cached keys/values) ``x`` is a
    window at ``kv_positions`` and ``rope`` its rows: the queries attend to the cache with the window's
    fresh keys/values written in (see :mod:`egspo.models.kv_cache`).
    """
    b, length, _ = x.shape
    q, k, v = (proj(x).view(b, length, -1, head_dim).transpose(1, 2) for proj in projections)
    q, k = (apply_rotary(t, *rope, rope_full_precision) for t in (q, k))
    fresh = LayerKV(k, v)
    if past_kv is not None:
        if kv_positions is None:
            raise ValueError("attend: past_kv needs kv_positions, the window's positions in the sequence.")
        k, v = splice(past_kv, fresh, kv_positions)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        # Explicit repeat rather than SDPA's enable_gqa: with a padding mask the fused CUDA kernels
        # that accept a mask do not all support GQA, and the fallback is the slow math kernel.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=False)
    return out.transpose(1, 2).reshape(b, length, -1), fresh


def run_blocks(
    x: torch.Tensor,
    blocks: nn.ModuleList,
    head_dim: int,
    rope_theta: float,
    attention_mask: torch.Tensor | None,
    past_kv: KVCache | None = None,
    kv_positions: torch.Tensor | None = None,
    return_kv: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
    """Embedded tokens through every block; RoPE tables and the padding mask are built once here.

    ``return_kv=True`` also returns every layer's keys/values (the cache); ``past_kv`` with
    ``kv_positions`` (W,) runs ``x`` (B, W, d) as a window of the cached sequence, whose length (and
    that of ``attention_mask``) is the cache's.
    """
    if past_kv is not None:
        if kv_positions is None or len(past_kv) != len(blocks):
            raise ValueError(f"A windowed forward needs kv_positions and one cached layer per block ({len(blocks)}).")
        cos, sin = rotary_cos_sin(past_kv[0].keys.shape[2], head_dim, rope_theta, x.device)
        cos, sin = cos.index_select(0, kv_positions), sin.index_select(0, kv_positions)
    else:
        cos, sin = rotary_cos_sin(x.shape[1], head_dim, rope_theta, x.device)
    mask = key_padding_mask(attention_mask)
    if past_kv is None and not return_kv:
        for block in blocks:
            x = block(x, cos, sin, mask)  # positional, as gradient checkpointing requires
        return x
    layers: list[LayerKV] = []
    for i, block in enumerate(blocks):
        x, kv = block(x, cos, sin, mask, None if past_kv is None else past_kv[i], kv_positions, True)
        layers.append(kv)
    return (x, tuple(layers)) if return_kv else x


@dataclass
class NativeDiffusionOutput(MaskedLMOutput):
    """:class:`MaskedLMOutput` plus ``key_values``: every layer's keys/values when ``return_kv=True``."""

    key_values: KVCache | None = None


class NativeDiffusionLM(DiffusionGenerationMixin, PreTrainedModel):
    """What LLaDA and Dream share: the forward contract of :class:`~egspo.models.adapter.DiffusionLM`
    native models, a plain normal/ones initialization, and ``diffusion_generate`` with sampler defaults
    in ``generation_config`` (:mod:`egspo.models.diffusion_generation`).

    Subclasses build ``self.model`` (embedded tokens -> final-block hidden states, before the final
    norm), implement the embedding accessors and :meth:`final_norm`.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def final_norm(self) -> nn.Module:
        raise NotImplementedError

    def _init_weights(self, module: nn.Module) -> None:
        # Plain normal(initializer_range): random models only serve tests and tiny runs, where
        # well-scaled logits are all that matters (the published LLaDA trained with "mitchell" init).
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            bias = getattr(module, "bias", None)  # Embedding has none
            if bias is not None:
                init.zeros_(bias)
            # The slice loses the "already loaded" flag, so check it on the full weight.
            loaded = getattr(module.weight, "_is_hf_initialized", False)
            padding_idx = getattr(module, "padding_idx", None)  # Linear has none
            if padding_idx is not None and not loaded:
                init.zeros_(module.weight[padding_idx])
        elif isinstance(module, RMSNorm):
            init.ones_(module.weight)
            if module.bias is not None:
                init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        logits_positions: torch.Tensor | None = None,
        return_hidden: bool = False,
        return_kv: bool = False,
        past_kv: KVCache | None = None,
        kv_positions: torch.Tensor | None = None,
        head_inputs: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> NativeDiffusionOutput:
        """``attention_mask`` (B, L) of 1/0 hides padded keys; ``logits_positions`` (P,) or (B, P) runs
        the LM head only there, giving logits (B, P, V); ``return_hidden=True`` returns the final
        normed hidden states (B, L, H) as ``.hidden_states`` and no logits.

        Cached (approximate) rollouts, :mod:`egspo.models.kv_cache`: ``return_kv=True`` adds every
        layer's keys/values as ``.key_values``; ``past_kv`` with ``kv_positions`` (W,) runs only the
        window ``input_ids`` (B, W) at those positions against the cache (``attention_mask`` and
        ``logits_positions`` then refer to the whole sequence and to the window respectively).

        ``head_inputs`` (..., H), hidden states from ``return_hidden=True``, skips the blocks and
        returns only the LM head's logits of them: the way to run the head of a model whose weights
        are whole only inside its wrapped forward (FSDP, ZeRO-3)."""
        for key, value in kwargs.items():
            if key not in _IGNORED_FORWARD_KWARGS and value is not None and value is not False:
                raise TypeError(
                    f"{type(self).__name__}.forward does not support {key}={value!r}: it takes input_ids, "
                    "attention_mask, logits_positions, return_hidden and head_inputs."
                )
        if head_inputs is not None:
            return NativeDiffusionOutput(logits=self.get_output_embeddings()(head_inputs))
        if input_ids is None:
            raise TypeError(f"{type(self).__name__}.forward needs input_ids (or head_inputs).")
        key_values = None
        if return_kv or past_kv is not None:
            hidden = self.model(input_ids, attention_mask, past_kv, kv_positions, return_kv)
            if return_kv:
                hidden, key_values = hidden
        else:
            hidden = self.model(input_ids, attention_mask)
        if return_hidden:
            return NativeDiffusionOutput(hidden_states=self.final_norm()(hidden), key_values=key_values)
        if logits_positions is not None:
            # The norm is per position, so gathering first is exact and skips L - P positions.
            hidden = gather_positions(hidden, logits_positions.to(hidden.device))
        logits = self.get_output_embeddings()(self.final_norm()(hidden))
        return NativeDiffusionOutput(logits=logits, key_values=key_values)


# -- config ----------------------------------------------------------------------------------------


class LLaDAConfig(PretrainedConfig):
    """The ``config.json`` of the published LLaDA checkpoints; defaults are LLaDA-8B-Instruct's values.

    Every published field is accepted and saved back; fields of OLMo variants the checkpoints do not
    use (alibi, sequential blocks, QK-norm, ...) are kept as data and rejected by the model with a
    message, not by the config. ``hidden_size``/``num_attention_heads``/``num_hidden_layers``/
    ``max_position_embeddings``/``initializer_range`` alias the OLMo names for generic tooling.
    """

    model_type = "llada"
    attribute_map = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "initializer_range": "init_std",
    }

    def __init__(
        self,
        d_model: int = 4096,
        n_heads: int = 32,
        n_kv_heads: int | None = 32,
        n_layers: int = 32,
        mlp_ratio: int = 4,
        mlp_hidden_size: int | None = 12288,
        activation_type: str = "silu",
        block_type: str = "llama",
        block_group_size: int = 1,
        alibi: bool = False,
        alibi_bias_max: float = 8.0,
        rope: bool = True,
        rope_full_precision: bool = True,
        rope_theta: float = 500000.0,
        flash_attention: bool = False,
        attention_dropout: float = 0.0,
        multi_query_attention: bool | None = None,
        attention_layer_norm: bool = False,
        attention_layer_norm_with_affine: bool = True,
        residual_dropout: float = 0.0,
        embedding_dropout: float = 0.0,
        input_emb_norm: bool = False,
        layer_norm_type: str = "rms",
        layer_norm_with_affine: bool = True,
        rms_norm_eps: float = 1e-5,
        max_sequence_length: int = 4096,
        include_qkv_bias: bool | None = False,
        include_bias: bool = False,
        bias_for_layer_norm: bool | None = False,
        scale_logits: bool = False,
        vocab_size: int = 126464,
        embedding_size: int | None = 126464,
        weight_tying: bool = False,
        eos_token_id: int | None = 126081,
        pad_token_id: int | None = 126081,
        mask_token_id: int | None = 126336,
        init_device: str | None = "meta",
        init_fn: str = "mitchell",
        init_std: float = 0.02,
        init_cutoff_factor: float | None = None,
        precision: str | None = "amp_bf16",
        use_cache: bool = False,
        **kwargs: Any,
    ) -> None:
        self.d_model = d_model
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.n_layers = n_layers
        self.mlp_ratio = mlp_ratio
        self.mlp_hidden_size = mlp_hidden_size
        self.activation_type = activation_type
        self.block_type = block_type
        self.block_group_size = block_group_size
        self.alibi = alibi
        self.alibi_bias_max = alibi_bias_max
        self.rope = rope
        self.rope_full_precision = rope_full_precision
        self.rope_theta = rope_theta
        self.flash_attention = flash_attention
        self.attention_dropout = attention_dropout
        self.multi_query_attention = multi_query_attention
        self.attention_layer_norm = attention_layer_norm
        self.attention_layer_norm_with_affine = attention_layer_norm_with_affine
        self.residual_dropout = residual_dropout
        self.embedding_dropout = embedding_dropout
        self.input_emb_norm = input_emb_norm
        self.layer_norm_type = layer_norm_type
        self.layer_norm_with_affine = layer_norm_with_affine
        self.rms_norm_eps = rms_norm_eps
        self.max_sequence_length = max_sequence_length
        self.include_qkv_bias = include_qkv_bias
        self.include_bias = include_bias
        self.bias_for_layer_norm = bias_for_layer_norm
        self.scale_logits = scale_logits
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.weight_tying = weight_tying
        self.init_device = init_device
        self.init_fn = init_fn
        self.init_std = init_std
        self.init_cutoff_factor = init_cutoff_factor
        self.precision = precision
        # transformers ties the head through `tie_word_embeddings`; LLaDA says `weight_tying`.
        kwargs.pop("tie_word_embeddings", None)
        self.tie_word_embeddings = weight_tying
        super().__init__(**kwargs)
        # Set after the base __init__, which drops token ids and use_cache as "generation parameters".
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        """Key/value heads as the published code resolves them (``multi_query_attention`` means 1)."""
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if self.multi_query_attention else self.n_heads

    @property
    def effective_mlp_hidden_size(self) -> int:
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def effective_embedding_size(self) -> int:
        return self.embedding_size if self.embedding_size is not None else self.vocab_size

    @property
    def effective_norm_bias(self) -> bool:
        return self.include_bias if self.bias_for_layer_norm is None else bool(self.bias_for_layer_norm)


def _check_supported(config: LLaDAConfig) -> None:
    """Refuse OLMo variants that the LLaDA checkpoints do not use instead of computing something else."""
    expected = {
        "block_type": "llama",
        "layer_norm_type": "rms",
        "activation_type": "silu",
        "rope": True,
        "alibi": False,
        "attention_layer_norm": False,
        "scale_logits": False,
        "input_emb_norm": False,
        "layer_norm_with_affine": True,
        "block_group_size": 1,
    }
    wrong = {k: getattr(config, k) for k, v in expected.items() if getattr(config, k) != v}
    if wrong:
        raise NotImplementedError(
            f"egspo's native LLaDA implements the architecture of the published checkpoints ({expected}); "
            f"this config differs in {wrong}, which it does not implement."
        )
    if config.d_model % config.n_heads or config.n_heads % config.effective_n_kv_heads:
        raise ValueError(
            f"d_model={config.d_model} must be a multiple of n_heads={config.n_heads}, and n_heads a multiple "
            f"of the key/value heads ({config.effective_n_kv_heads})."
        )
    if config.effective_embedding_size < config.vocab_size:
        raise ValueError(
            f"embedding_size={config.embedding_size} is smaller than vocab_size={config.vocab_size}; "
            "the embedding must have a row for every token."
        )


# -- model -----------------------------------------------------------------------------------------


class LLaDALlamaBlock(GradientCheckpointingLayer):
    """One bidirectional pre-norm block (name kept from the published code for FSDP wrap policies)."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        d, kv_dim = config.d_model, config.effective_n_kv_heads * config.head_dim
        bias, qkv_bias = config.include_bias, bool(config.include_bias or config.include_qkv_bias)
        hidden = config.effective_mlp_hidden_size
        self.head_dim = config.head_dim
        self.rope_full_precision = config.rope_full_precision
        self.attention_dropout = config.attention_dropout
        self.attn_norm = RMSNorm(d, config.rms_norm_eps, bias=config.effective_norm_bias)
        self.q_proj = nn.Linear(d, d, bias=qkv_bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(d, d, bias=bias)
        self.ff_norm = RMSNorm(d, config.rms_norm_eps, bias=config.effective_norm_bias)
        self.ff_proj = nn.Linear(d, hidden, bias=bias)
        self.up_proj = nn.Linear(d, hidden, bias=bias)
        self.ff_out = nn.Linear(hidden, d, bias=bias)
        self.dropout = nn.Dropout(config.residual_dropout)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_kv: LayerKV | None = None,
        kv_positions: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, LayerKV]:
        """``x`` after the block; with ``return_kv`` also this layer's keys/values (see :func:`attend`)."""
        projections, rope = (self.q_proj, self.k_proj, self.v_proj), (cos, sin)
        dropout_p = self.attention_dropout if self.training else 0.0
        att, kv = attend(self.attn_norm(x), projections, self.head_dim, rope, mask, self.rope_full_precision,
                         dropout_p, past_kv, kv_positions)
        x = x + self.dropout(self.attn_out(att))
        h = self.ff_norm(x)
        x = x + self.dropout(self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h)))
        return (x, kv) if return_kv else x


class LLaDAModel(nn.Module):
    """The ``model`` submodule: ``transformer.{wte, blocks, ln_f, ff_out}`` as in the checkpoints."""

    def __init__(self, config: LLaDAConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.effective_embedding_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, config.d_model),
                "emb_drop": nn.Dropout(config.embedding_dropout),
                "blocks": nn.ModuleList(LLaDALlamaBlock(config) for _ in range(config.n_layers)),
                "ln_f": RMSNorm(config.d_model, config.rms_norm_eps, bias=config.effective_norm_bias),
                # With weight_tying this Linear's weight is tied to wte by transformers (no bias, as the
                # published code's F.linear(x, wte.weight)); it exists so the head is always a module.
                "ff_out": nn.Linear(config.d_model, vocab, bias=config.include_bias and not config.weight_tying),
            }
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_kv: KVCache | None = None,
        kv_positions: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Final-block hidden states (B, L, d_model), before ``ln_f`` (cache arguments: :func:`run_blocks`)."""
        x = self.transformer["emb_drop"](self.transformer["wte"](input_ids))
        blocks = cast(nn.ModuleList, self.transformer["blocks"])
        return run_blocks(x, blocks, self.config.head_dim, self.config.rope_theta, attention_mask,
                          past_kv, kv_positions, return_kv)


class LLaDAModelLM(NativeDiffusionLM):
    """LLaDA masked diffusion LM: logits at position i predict token i (no shift).

    ``forward(input_ids, attention_mask=None, logits_positions=None, return_hidden=False)`` (see
    :meth:`NativeDiffusionLM.forward`); the vocabulary dimension V is ``embedding_size``.
    """

    config_class = LLaDAConfig
    _no_split_modules = ["LLaDALlamaBlock"]
    # Only active when config.tie_word_embeddings (= weight_tying) is true.
    _tied_weights_keys = {"model.transformer.ff_out.weight": "model.transformer.wte.weight"}

    def __init__(self, config: LLaDAConfig) -> None:
        _check_supported(config)
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def get_input_embeddings(self) -> nn.Module:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Module:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.model.transformer.ff_out = value
