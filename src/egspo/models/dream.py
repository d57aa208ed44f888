"""Native Dream (Dream-org/Dream-v0-Instruct-7B and -Base-7B) for transformers 5, weight-compatible.

Dream is Qwen2.5-7B turned into a masked diffusion LM: Qwen2 decoder layers (q/k/v with biases, GQA,
SwiGLU MLP, RMSNorm eps 1e-6, RoPE theta 1e6) run without a causal mask. Parameter names follow the
published ``modeling_dream.py``:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight / post_attention_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight                                      (tied to embed_tokens only if tie_word_embeddings)

Dream kept the autoregressive parent's alignment: the raw logits at position i predict token i + 1.
``DreamModel.forward`` returns those raw logits (and ``logits_positions`` indexes raw positions);
wrap it in ``DiffusionLM(..., shift=1, native=True)`` to get logits where position i predicts token i.
RoPE is applied in the activations' dtype, as the published (Qwen2) code does, and a 0/1
``attention_mask`` is a key-padding mask.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from egspo.models.kv_cache import KVCache, LayerKV
from egspo.models.llada import NativeDiffusionLM, RMSNorm, attend, run_blocks


class DreamConfig(PretrainedConfig):
    """The ``config.json`` of the published Dream checkpoints; defaults are Dream-v0-7B's values.

    Unknown fields are kept as attributes and saved back. Only plain RoPE and full attention are
    implemented, so a scaled ``rope_scaling`` or ``use_sliding_window=True`` is rejected here rather
    than ignored; ``rope_scaling`` always reads None.
    """

    model_type = "Dream"

    def __init__(
        self,
        vocab_size: int = 152064,
        hidden_size: int = 3584,
        intermediate_size: int = 18944,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 28,
        num_key_value_heads: int | None = 4,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = False,
        tie_word_embeddings: bool = False,
        rope_theta: float = 1000000.0,
        rope_scaling: dict[str, Any] | None = None,
        use_sliding_window: bool = False,
        sliding_window: int | None = None,
        max_window_layers: int = 28,
        attention_dropout: float = 0.0,
        mask_token_id: int | None = 151666,
        pad_token_id: int | None = 151643,
        bos_token_id: int | None = 151643,
        eos_token_id: int | None = 151643,
        **kwargs: Any,
    ) -> None:
        _check_rope_scaling(rope_scaling)
        if use_sliding_window:
            raise NotImplementedError(
                "use_sliding_window=True: egspo's native Dream implements full bidirectional attention only."
            )
        if num_key_value_heads is None:  # Qwen2 convention
            num_key_value_heads = num_attention_heads
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.attention_dropout = attention_dropout
        self.tie_word_embeddings = tie_word_embeddings
        super().__init__(**kwargs)
        # Set after the base __init__, which drops token ids and use_cache as "generation parameters".
        self.use_cache = use_cache
        self.mask_token_id = mask_token_id
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # The transformers 5 base config turns `rope_scaling` into a deprecated alias of
    # `rope_parameters`; Dream only has plain RoPE, so it reads None as in the published config.
    @property
    def rope_scaling(self) -> None:
        return None

    @rope_scaling.setter
    def rope_scaling(self, value: dict[str, Any] | None) -> None:
        _check_rope_scaling(value)


def _check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(
            f"rope_scaling={rope_scaling!r}: egspo's native Dream implements plain RoPE only."
        )


class DreamAttention(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.head_dim = hd
        self.attention_dropout = config.attention_dropout
        self.q_proj = nn.Linear(d, config.num_attention_heads * hd, bias=True)
        self.k_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=True)
        self.v_proj = nn.Linear(d, config.num_key_value_heads * hd, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * hd, d, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        past_kv: LayerKV | None = None,
        kv_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, LayerKV]:
        """The attention output and this call's keys/values (see :func:`~egspo.models.llada.attend`)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        dropout_p = self.attention_dropout if self.training else 0.0
        # RoPE in the activations' dtype (rope_full_precision=False), as the published Qwen2 code.
        att, kv = attend(x, projections, self.head_dim, (cos, sin), mask, False, dropout_p, past_kv, kv_positions)
        return self.o_proj(att), kv


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm Qwen2 layer without a causal mask (name kept from the published code for FSDP)."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

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
        """``x`` after the layer; with ``return_kv`` also this layer's keys/values."""
        att, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv, kv_positions)
        x = x + att
        x = x + self.mlp(self.post_attention_layernorm(x))
        return (x, kv) if return_kv else x


class DreamBaseModel(nn.Module):
    """The ``model`` submodule: ``embed_tokens``, ``layers`` and ``norm`` as in the checkpoints."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        pad = config.pad_token_id
        # The published model passes pad_token_id as padding_idx, which freezes that embedding row
        # in full fine-tuning; kept for identical training behaviour.
        padding_idx = pad if pad is not None and 0 <= pad < config.vocab_size else None
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx)
        self.layers = nn.ModuleList(DreamDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        past_kv: KVCache | None = None,
        kv_positions: torch.Tensor | None = None,
        return_kv: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, KVCache]:
        """Final-layer hidden states (B, L, hidden_size), before ``norm`` (cache arguments:
        :func:`~egspo.models.llada.run_blocks`)."""
        x = self.embed_tokens(input_ids)
        return run_blocks(x, self.layers, self.config.head_dim, self.config.rope_theta, attention_mask,
                          past_kv, kv_positions, return_kv)


class DreamModel(NativeDiffusionLM):
    """Dream masked diffusion LM; raw logits at position i predict token i + 1 (``shift=1``).

    ``forward(input_ids, attention_mask=None, logits_positions=None, return_hidden=False)`` (see
    :meth:`~egspo.models.llada.NativeDiffusionLM.forward`), ``logits_positions`` indexing raw positions.
    """

    config_class = DreamConfig
    _no_split_modules = ["DreamDecoderLayer"]
    # Only active when config.tie_word_embeddings is true (false for the published 7B models).
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig) -> None:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if config.hidden_size % heads or heads % kv_heads:
            raise ValueError(
                f"hidden_size={config.hidden_size} must be a multiple of num_attention_heads={heads}, "
                f"and that a multiple of num_key_value_heads={kv_heads}."
            )
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def final_norm(self) -> nn.Module:
        return self.model.norm

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value
