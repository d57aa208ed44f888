"""A merged copy of a LoRA model for rollouts (docs/algorithm.md#merged-lora-rollouts).

A peft LoRA layer computes ``W x + s B A x``: two extra small matrix products per adapted linear, which
a rollout of 128 denoising steps pays 128 times. :class:`MergedLoRA` keeps a plain copy of the model whose
adapted linears hold ``W + s B A`` (computed in float32, stored in the weights' dtype) and shares every
other parameter and buffer with the training model, so the rollout costs what the base model costs.

- The training model is never touched: its base weights stay bit-exact (no merge/unmerge in place).
- :meth:`MergedLoRA.sync` recomputes the merged weights when the adapter changed since the last call:
  the trainer says so after every optimizer step and checkpoint load (:meth:`MergedLoRA.invalidate`), and
  the adapter tensors' in-place version counters catch changes made elsewhere, so a rollout always runs
  the current policy.
- The copy costs one extra set of the adapted weights (all of a block's linears by default: about 14 GB
  for LLaDA-8B in bf16), counted by :mod:`egspo.memory`.
- Only plain ``nn.Linear`` bases with LoRA (not DoRA) adapters can be merged; a quantised (bitsandbytes)
  or sharded (FSDP / ZeRO-3) model, or any other adapter type, keeps the adapter in the forward
  (:func:`merge_blocker` says why).

In bf16 the merged weight is rounded once more than the two-product forward: the rollout's log-probs
are those of the merged weights, and the update's ratio is taken against them (the behaviour policy).
"""

from __future__ import annotations

import copy
import logging
from typing import Any, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)


def lora_layers(model: nn.Module) -> list[tuple[str, Any]]:
    """peft's tuner layers in ``model`` (found by duck typing: a ``base_layer`` and ``lora_A`` adapters; typed
    Any: their attributes are peft's, which nn.Module's typing does not know)."""
    return [(name, m) for name, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "lora_A") and hasattr(m, "get_delta_weight")]


def merge_blocker(core: nn.Module) -> str | None:
    """Why ``core`` (the model under the peft wrapper, its LoRA layers injected) cannot get a merged copy,
    or None when it can."""
    layers = lora_layers(core)
    if not layers:
        return "the model has no LoRA layers"
    for name, layer in layers:
        base = layer.base_layer
        if type(base) is not nn.Linear or not base.weight.is_floating_point():
            return f"{name} adapts a {type(base).__name__}, not a plain floating-point nn.Linear (quantised base?)"
        if any(getattr(layer, "use_dora", {}).get(a, False) for a in layer.lora_A):
            return f"{name} is a DoRA adapter"
        if getattr(layer, "fan_in_fan_out", False):
            return f"{name} stores its weight transposed (fan_in_fan_out)"
    return None


class MergedLoRA:
    """A plain module equal to ``core`` with its active LoRA adapters merged; see the module docstring."""

    def __init__(self, core: nn.Module) -> None:
        blocker = merge_blocker(core)
        if blocker is not None:
            raise ValueError(f"Cannot merge the LoRA adapter for rollouts: {blocker}.")
        layers = lora_layers(core)
        # deepcopy with every tensor except the adapted base weights (and the adapters) pre-seeded in the memo:
        # the copy shares them with the training model and owns only the weights that will hold W + s B A
        adapted = {id(layer.base_layer.weight) for _, layer in layers}
        adapter_tensors = {id(t) for _, layer in layers for t in _adapter_tensors(layer)}
        memo: dict[int, Any] = {}
        for tensor in [*core.parameters(), *core.buffers()]:
            if id(tensor) not in adapted and id(tensor) not in adapter_tensors:
                memo[id(tensor)] = tensor
        copied = copy.deepcopy(core, memo)
        # each tuner layer of the copy becomes its own (copied) base linear
        for name, _ in layers:
            parent_name, _, child = name.rpartition(".")
            parent = copied.get_submodule(parent_name) if parent_name else copied
            setattr(parent, child, getattr(parent, child).base_layer)
        copied.eval()
        copied.requires_grad_(False)
        self.module: nn.Module = copied
        self._targets: list[tuple[Any, torch.Tensor]] = [
            (layer, cast(torch.Tensor, copied.get_submodule(name).weight)) for name, layer in layers]
        self._version: tuple[int, ...] | None = None
        extra = sum(w.numel() * w.element_size() for _, w in self._targets)
        logger.info("Merged LoRA copy for rollouts: %d linears, %.2f GB of merged weights.",
                    len(self._targets), extra / 1e9)

    def _current_version(self) -> tuple[int, ...]:
        """The in-place version counters of every adapter tensor and base weight, plus which adapters are on."""
        counters: list[int] = []
        for layer, _ in self._targets:
            counters.extend(t._version for t in (*_adapter_tensors(layer), layer.base_layer.weight))
            counters.append(hash((tuple(layer.active_adapters), bool(layer.disable_adapters))))
        return tuple(counters)

    def invalidate(self) -> None:
        """Recompute the merged weights at the next :meth:`sync` whatever the version counters say: engines that
        update parameters through other tensors (DeepSpeed's flat buffers) leave the parameters' counters alone."""
        self._version = None

    @torch.no_grad()
    def sync(self) -> nn.Module:
        """The merged module, its weights recomputed if the adapter changed since the last call."""
        version = self._current_version()
        if version != self._version:
            for layer, target in self._targets:
                merged = layer.base_layer.weight.detach().float()
                if not layer.disable_adapters:
                    for name in layer.active_adapters:
                        if name in layer.lora_A:
                            merged = merged + layer.get_delta_weight(name).float()
                target.copy_(merged)
            self._version = version
        return self.module


def _adapter_tensors(layer: Any) -> list[torch.Tensor]:
    return [p for name, p in layer.named_parameters() if "lora_" in name]
