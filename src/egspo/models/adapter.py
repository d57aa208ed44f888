"""``DiffusionLM``: one interface over every masked diffusion LM egspo can train.

Logits are aligned so that position ``i`` predicts token ``i`` (Dream predicts ``i`` from ``i - 1``;
the shift is handled here). ``positions`` restricts the LM head to the positions that are needed,
which is where most of the memory and time of a 126k-vocabulary model goes:

- native models (our LLaDA and Dream) accept ``logits_positions=`` in ``forward`` and slice hidden
  states before the head, and ``return_hidden=True`` to get the final hidden states so that callers
  can run the head in chunks (:meth:`DiffusionLM.encode` / :meth:`DiffusionLM.head`);
- any other ``AutoModelForMaskedLM`` (BERT, ModernBERT, remote code) computes full logits that are
  then gathered: correct, but without the saving.

``positions`` is a LongTensor of shape (P,) (the same positions in every row) or (B, P) (per row);
the result has shape (B, P, V).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from egspo.models.kv_cache import KVCache, LayerKV
from egspo.models.merged import MergedLoRA, merge_blocker

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


def gather_positions(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Select ``positions`` (shape (P,) or (B, P)) along dim 1 of ``x`` (B, L, ...)."""
    if positions.dim() == 1:
        return x.index_select(1, positions)
    index = positions.reshape(*positions.shape, *([1] * (x.dim() - 2)))
    index = index.expand(*positions.shape, *x.shape[2:])
    return x.gather(1, index)


def strip_parallel(model: nn.Module) -> nn.Module:
    """The module under DDP/DeepSpeed and torch.compile wrappers (a peft wrapper is kept)."""
    while True:
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module):  # DDP, DeepSpeed
            model = inner
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = cast(nn.Module, model._orig_mod)
        else:
            return model


def weights_sharded(model: nn.Module) -> bool:
    """Whether ``model`` is prepared so that its weights are whole only inside its forward: FSDP
    (``FullyShardedDataParallel`` or FSDP2 ``fully_shard``) or a DeepSpeed ZeRO-3 engine.

    Such a model's submodules must not be called directly (they would see shards), and every process
    must run the same sequence of forwards, since each one gathers weights collectively.
    """
    while hasattr(model, "_orig_mod"):  # torch.compile
        model = cast(nn.Module, model._orig_mod)
    from torch.distributed import fsdp

    fsdp_module = getattr(fsdp, "FSDPModule", None)  # FSDP2 (torch >= 2.6 exports it here)
    if isinstance(model, (fsdp.FullyShardedDataParallel, *([fsdp_module] if fsdp_module else []))):
        return True
    stage = getattr(model, "zero_optimization_stage", None)  # a DeepSpeed engine
    return callable(stage) and stage() == 3


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP/FSDP/compile and peft wrappers."""
    model = strip_parallel(model)
    while hasattr(model, "get_base_model") and callable(model.get_base_model):  # peft
        model = strip_parallel(model.get_base_model())
    return model


@dataclass
class DiffusionLM:
    """A masked diffusion LM with its mask and stop tokens.

    ``model`` is what training steps through (possibly wrapped by peft and accelerate); ``shift`` is 1
    for models whose output at ``i`` predicts token ``i + 1`` (Dream), 0 otherwise. ``reference`` is a
    frozen copy used as the KL reference for full fine-tuning; with LoRA it stays None and the
    reference policy is the same model with the adapter disabled.
    """

    model: nn.Module
    mask_id: int
    stop_ids: tuple[int, ...]
    shift: int = 0
    reference: nn.Module | None = None
    native: bool = field(default=False)
    # torch.compile of ``model`` for rollouts, made on first use (:meth:`compiled_model`); not copied
    # by dataclasses.replace, whose new model needs its own.
    _compiled: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    _compiled_source: nn.Module | None = field(default=None, init=False, repr=False, compare=False)
    # the merged LoRA copy for rollouts (:meth:`for_rollout`), made on first use for ``_merged_source``
    _merged: MergedLoRA | None = field(default=None, init=False, repr=False, compare=False)
    _merged_view: DiffusionLM | None = field(default=None, init=False, repr=False, compare=False)
    _merged_source: nn.Module | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def core(self) -> nn.Module:
        return unwrap(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.core.parameters()).device

    @property
    def eos_id(self) -> int:
        """The token used to fill a completion after it has ended."""
        return self.stop_ids[0]

    # -- logits ---------------------------------------------------------------------------------

    def logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """Aligned logits, (B, L, V) or (B, P, V) at ``positions``. ``model`` overrides the module run."""
        model = self.model if model is None else model
        if self.native:
            raw_positions = None
            if positions is not None:
                raw_positions = (positions - self.shift).clamp_min(0)
            out = model(input_ids=input_ids, attention_mask=attention_mask, logits_positions=raw_positions)
            logits = out.logits
            if positions is None and self.shift:
                logits = self._shift(logits)
            return logits
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        if self.shift:
            logits = self._shift(logits)
        return logits if positions is None else gather_positions(logits, positions)

    def encode(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model: nn.Module | None = None
    ) -> torch.Tensor:
        """Aligned features for :meth:`head`: final hidden states (native) or full logits (others)."""
        model = self.model if model is None else model
        if self.native:
            hidden = model(input_ids=input_ids, attention_mask=attention_mask, return_hidden=True).hidden_states
            return self._shift(hidden) if self.shift else hidden
        return self.logits(input_ids, attention_mask, model=model)

    # -- KV-cached (approximate) forwards -------------------------------------------------------

    def _require_native(self) -> None:
        if not self.native:
            raise ValueError(
                "The KV-cached rollout (rollout_cache=prefix/dual) needs the native LLaDA or Dream models "
                f"(egspo.models); {type(self.core).__name__} is a generic masked LM: use rollout_cache=none."
            )

    def encode_cached(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, model: nn.Module | None = None
    ) -> tuple[torch.Tensor, KVCache]:
        """:meth:`encode` (the same computation, so the same features) plus every layer's keys/values."""
        self._require_native()
        model = self.model if model is None else model
        out = model(input_ids=input_ids, attention_mask=attention_mask, return_hidden=True, return_kv=True)
        hidden = out.hidden_states
        # accelerate's mixed-precision wrapper returns every output in fp32, the cache included: put it
        # back in the dtype it was computed in (exact), which is also what the windows splice into it
        dtype = _activation_dtype(input_ids.device, self.core)
        cache = tuple(LayerKV(kv.keys.to(dtype), kv.values.to(dtype)) for kv in out.key_values)
        return (self._shift(hidden) if self.shift else hidden), cache

    def encode_window(
        self,
        input_ids: torch.Tensor,
        lo: int,
        hi: int,
        cache: KVCache,
        attention_mask: torch.Tensor | None = None,
        model: nn.Module | None = None,
    ) -> torch.Tensor:
        """Aligned features (B, hi - lo, H) of positions [lo, hi) of ``input_ids`` (B, L), running only
        those positions (and the one before for a shifted model, whose output there predicts ``lo``)
        against ``cache`` (from :meth:`encode_cached` on the same rows): an approximation wherever the
        tokens outside the window changed since the cache was made."""
        self._require_native()
        model = self.model if model is None else model
        start = lo - self.shift
        if start < 0:
            raise ValueError(f"encode_window: a shifted model needs a position before lo={lo}.")
        positions = torch.arange(start, hi, device=input_ids.device)
        out = model(input_ids=input_ids[:, start:hi], attention_mask=attention_mask, return_hidden=True,
                    past_kv=cache, kv_positions=positions)
        # raw output at start + i predicts start + i + shift: the first hi - lo rows are [lo, hi)
        return out.hidden_states[:, : hi - lo]

    def compiled_model(self, backend: str = "inductor") -> nn.Module:
        """``torch.compile(self.model, dynamic=False)``, made once and kept while ``model`` is the same
        object (a peft wrapper included); ``backend`` applies when it is made. The compiled module shares
        the parameters, so training updates are seen; each new input shape compiles once."""
        if self._compiled is None or self._compiled_source is not self.model:
            logger.info("Compiling the rollout forward of %s (backend %s).", type(self.core).__name__, backend)
            # torch.compile of a module is a module (OptimizedModule); torch types it as a callable
            self._compiled = cast(nn.Module, torch.compile(self.model, dynamic=False, backend=backend))
            self._compiled_source = self.model
        return self._compiled

    def for_rollout(self, merge_lora: bool) -> DiffusionLM:
        """The model a rollout runs: ``self``, or with ``merge_lora`` and a mergeable LoRA model a view whose
        model is the merged copy (:class:`~egspo.models.merged.MergedLoRA`), synced to the current adapter.

        Not merged (and ``self`` returned): full fine-tuning, a sharded model (FSDP / ZeRO-3), and LoRA layers
        that cannot be merged (a quantised base, DoRA), said once in the log."""
        if not merge_lora or _find_peft(self.model) is None or self.sharded:
            return self
        if self._merged_source is not self.model:
            self._merged_source = self.model
            self._merged = self._merged_view = None
            blocker = merge_blocker(self.core)
            if blocker is not None:
                logger.info("Rollouts run through the LoRA adapter (not merged): %s.", blocker)
            else:
                self._merged = MergedLoRA(self.core)
                self._merged_view = DiffusionLM(model=self._merged.module, mask_id=self.mask_id,
                                                stop_ids=self.stop_ids, shift=self.shift, native=self.native)
        if self._merged is None or self._merged_view is None:
            return self
        self._merged.sync()
        return self._merged_view

    def rollout_weights_changed(self) -> None:
        """The weights changed (an optimizer step, a loaded checkpoint): the merged rollout copy resyncs at the
        next rollout."""
        if self._merged is not None:
            self._merged.invalidate()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """``model`` in eval mode (dropout off) inside the block, its previous mode restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    @property
    def sharded(self) -> bool:
        """True under FSDP / ZeRO-3 (:func:`weights_sharded`): every process must run the same forwards."""
        return weights_sharded(self.model)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from :meth:`encode` features (any leading shape)."""
        if self.native:
            if self.sharded:  # the head's weight is whole only inside the wrapped forward
                return self.model(head_inputs=features).logits
            return cast("PreTrainedModel", self.core).get_output_embeddings()(features)
        return features

    @staticmethod
    def _shift(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], x[:, :-1]], dim=1)

    # -- reference policy -----------------------------------------------------------------------

    @contextlib.contextmanager
    def reference_model(self) -> Iterator[nn.Module]:
        """The module that computes the KL reference policy (no gradients are taken through it)."""
        if self.reference is not None:
            yield self.reference
            return
        peft_model = _find_peft(self.model)
        if peft_model is None:
            raise RuntimeError(
                "No reference policy: full fine-tuning needs a frozen copy (DiffusionLM.reference) "
                "and LoRA training a peft model; set beta=0 to train without KL."
            )
        if self.sharded:
            with _adapters_bypassed(peft_model):
                yield self.model
            return
        with peft_model.disable_adapter():
            yield self.model


def _activation_dtype(device: torch.device, core: nn.Module) -> torch.dtype:
    """The dtype a forward's projections produce on ``device``: autocast's when it is on, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p.dtype for p in core.parameters() if p.is_floating_point())


@contextlib.contextmanager
def _adapters_bypassed(peft_model: nn.Module) -> Iterator[None]:
    """The adapter layers skipped in the forward, their weights' ``requires_grad`` left alone.

    peft's ``disable_adapter`` also switches the adapter weights' ``requires_grad`` off and on. Under
    FSDP2 the switch lands on whichever parameters are registered at that moment: after a forward
    that did not reshard (accelerate keeps the LM head's group gathered), those are temporary
    unsharded copies, and the sharded weights the optimizer updates stay frozen for good.
    """
    # peft's tuner layers, found by duck typing: their flag is a plain attribute that nn.Module does not declare
    layers: list[Any] = [
        m for m in peft_model.modules() if hasattr(m, "_disable_adapters") and hasattr(m, "adapter_layer_names")
    ]
    previous = [m._disable_adapters for m in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer._disable_adapters = was


def _find_peft(model: nn.Module) -> PeftModel | None:
    model = strip_parallel(model)
    return cast("PeftModel", model) if hasattr(model, "disable_adapter") and hasattr(model, "peft_config") else None
