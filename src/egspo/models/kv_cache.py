"""Per-layer keys/values of a whole sequence, for the approximate (Fast-dLLM style) cached rollout.

A native model's forward with ``return_kv=True`` returns one :class:`LayerKV` per layer: the keys
(after RoPE) and values of every position, before any GQA head repetition. A later forward given that
cache as ``past_kv`` runs only a window of positions (``kv_positions``): the window's fresh keys and
values replace the cached ones at those positions, every other position's come from the cache, and
attention stays bidirectional over the whole sequence. This is exact only while the tokens outside the
window are what they were when the cache was made, which is why the cached rollout is approximate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class LayerKV(NamedTuple):
    """One layer's keys and values over the whole sequence, each (B, kv_heads, L, head_dim)."""

    keys: torch.Tensor
    values: torch.Tensor


#: One :class:`LayerKV` per layer, in layer order.
KVCache = tuple[LayerKV, ...]


def splice(cached: LayerKV, fresh: LayerKV, positions: torch.Tensor) -> LayerKV:
    """``cached`` with the window's ``fresh`` keys/values written at ``positions`` (W,) (out of place).

    ``index_copy`` with a position tensor keeps every shape fixed whatever the window's offset, so a
    compiled forward is not specialised on it. The result has the fresh keys/values' dtype: CUDA's
    ``index_copy`` takes no mixed dtypes (a cache made outside the window's autocast would differ).
    """
    keys, values = cached.keys.to(fresh.keys.dtype), cached.values.to(fresh.values.dtype)
    return LayerKV(keys.index_copy(2, positions, fresh.keys), values.index_copy(2, positions, fresh.values))
