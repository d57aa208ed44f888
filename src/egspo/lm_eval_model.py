"""The lm-evaluation-harness model ``egspo``: egspo's diffusion LMs under lm-eval's tasks.

    pip install 'egspo[eval]'
    egspo lm-eval --model egspo --model_args pretrained=GSAI-ML/LLaDA-8B-Instruct,gen_length=256 \\
        --tasks gsm8k --apply_chat_template --device cuda

    import lm_eval, egspo.lm_eval_model                     # the import registers the model
    lm_eval.simple_evaluate(model="egspo", model_args="pretrained=builtin:tiny", tasks=[...])

lm-eval 0.4.13 has no way for another package to add a model to its ``lm_eval`` command, so ``egspo
lm-eval ARGS`` imports this module and then runs lm-eval's command line with ARGS. lm-eval releases that
discover the ``lm_eval.models`` entry point (declared in egspo's pyproject) find it without that.

- ``generate_until``: egspo's block sampler (:func:`egspo.sampling.sample`), greedy unless asked
  otherwise. A request's ``max_gen_toks`` is rounded up to a multiple of ``block_length`` for
  the sampler and the completion is then cut to ``max_gen_toks`` tokens, at its first end token (eos,
  end-of-turn, pad) and at the first of the request's ``until`` strings.
- ``loglikelihood``: the masked-diffusion Monte Carlo estimate of LLaDA's evaluation (of a lower bound
  on the log-likelihood). Each of ``mc_num`` samples masks part of the continuation (never the
  context) and sums the cross-entropy of the masked tokens, weighted by the inverse masking fraction;
  minus the mean over samples is an unbiased estimate of the bound. ``is_greedy`` is a one-step check (see
  :func:`masked_loglikelihood`).
- ``loglikelihood_rolling`` (perplexity tasks) is not supported.
"""

from __future__ import annotations

import hashlib
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

try:
    import lm_eval.models  # noqa: F401  (lm-eval's own models, registered lazily before ours)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import MODEL_REGISTRY, register_model
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "egspo's lm-evaluation-harness model needs lm-eval: pip install 'egspo[eval]' (or pip install lm-eval)."
    ) from exc
from tqdm import tqdm

from egspo.config import ConfigError, Dtype, ModelConfig, SamplerConfig
from egspo.evaluate import load_variant, plan_batches
from egspo.generation import autocast_for
from egspo.models.adapter import DiffusionLM
from egspo.ops import token_logprobs
from egspo.rl.batching import encode_prompts
from egspo.sampling import sample

logger = logging.getLogger(__name__)

MODEL_NAME = "egspo"
#: How the Monte Carlo samples of :func:`masked_loglikelihood` choose what to mask.
MC_SAMPLERS = ("count", "ratio")
#: Generation keys of a request that this model reads; any other is ignored (logged once).
_GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")


def load_for_eval(
    pretrained: str, adapter: str | None, *, dtype: str, device: torch.device, trust_remote_code: bool
) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """The model (with ``adapter`` applied: a peft adapter, ``checkpoint-N`` or full-model directory).

    The only place that builds egspo's model config from lm-eval's ``model_args``.
    """
    # lm-eval's model_args are plain strings; ModelConfig rejects a dtype outside Dtype's choices
    cfg = ModelConfig(name_or_path=pretrained, dtype=cast(Dtype, dtype), trust_remote_code=trust_remote_code)
    return load_variant(cfg, adapter, device=device)


# -- the Monte Carlo log-likelihood -------------------------------------------------------------


def draw_masks(
    num: int, length: int, sampler: str, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` masks over ``length`` continuation tokens, (num, length) bool, and their weights (num,).

    Both samplers are stratified over the ``num`` samples (one random offset shared by all) and give
    every sample the marginal law below, so the weighted sums are unbiased for the same bound:

    - ``count`` (LLaDA's evaluation): mask exactly l tokens, l uniform on 1..length; weight length / l;
    - ``ratio``: t uniform on (0, 1], mask each token with probability t; weight 1 / t.
    """
    if sampler == "count":
        offset = torch.randint(length, (1,), generator=generator, device=device)
        counts = (offset + torch.arange(num, device=device) * length // num) % length + 1
        ranks = torch.rand(num, length, generator=generator, device=device).argsort(1).argsort(1)
        return ranks < counts[:, None], length / counts.double()
    if sampler == "ratio":
        # 1 - u is in (0, 1]: sample j's ratio lies in (j / num, (j + 1) / num]
        u = torch.rand(1, generator=generator, device=device, dtype=torch.float64)
        ratios = (torch.arange(num, device=device, dtype=torch.float64) + 1 - u) / num
        masks = torch.rand(num, length, generator=generator, device=device, dtype=torch.float64) < ratios[:, None]
        return masks, 1 / ratios
    raise ValueError(f"mc_sampler={sampler!r} is not one of {', '.join(MC_SAMPLERS)}.")


@torch.no_grad()
def masked_loglikelihood(
    dlm: DiffusionLM,
    context: Sequence[int],
    continuation: Sequence[int],
    *,
    mc_num: int,
    mc_batch_size: int,
    sampler: str = "count",
    generator: torch.Generator,
) -> tuple[float, bool]:
    """(log-likelihood estimate, is_greedy) of ``continuation`` after ``context`` (token ids).

    The estimate is minus the mean over ``mc_num`` samples of the weighted cross-entropy of the masked
    continuation tokens (:func:`draw_masks`), the context never masked; forwards run ``mc_batch_size``
    samples at a time. ``is_greedy``: whether the argmax (mask token excluded) at every position of the
    fully masked continuation is the continuation's token, a one-step stand-in for "greedy decoding
    reproduces it" that costs one extra row in the first forward instead of a whole sampler run.
    """
    if not continuation:
        return 0.0, True
    device = dlm.device
    ctx_len, length = len(context), len(continuation)
    target = torch.tensor(list(continuation), dtype=torch.long, device=device)
    sequence = torch.cat([torch.tensor(list(context), dtype=torch.long, device=device), target])
    positions = torch.arange(ctx_len, ctx_len + length, device=device)
    masks, weights = draw_masks(mc_num, length, sampler, generator, device)
    total = torch.zeros((), dtype=torch.float64, device=device)
    is_greedy = False
    for start in range(0, mc_num, mc_batch_size):
        mask, weight = masks[start : start + mc_batch_size], weights[start : start + mc_batch_size]
        first = start == 0
        if first:  # the extra fully masked row for is_greedy
            mask = torch.cat([mask, torch.ones(1, length, dtype=torch.bool, device=device)])
        rows = sequence.repeat(mask.shape[0], 1)
        rows[:, ctx_len:] = torch.where(mask, dlm.mask_id, target)
        with autocast_for(device):
            logits = dlm.logits(rows, positions=positions)
        if first:
            greedy_logits = logits[-1].clone()
            greedy_logits[:, dlm.mask_id] = float("-inf")
            is_greedy = bool((greedy_logits.argmax(-1) == target).all())
            logits, mask = logits[:-1], mask[:-1]
        logp = token_logprobs(logits, target.expand(mask.shape[0], -1)).double()
        total += ((logp * mask).sum(1) * weight).sum()
    return float(total) / mc_num, is_greedy


# -- the lm-eval model --------------------------------------------------------------------------


class EgspoLM(TemplateLM):
    """lm-eval's ``LM`` over an egspo :class:`DiffusionLM`; ``model_args`` are the constructor's arguments.

    ``gen_length`` / ``steps`` apply to requests without ``max_gen_toks``; other lengths keep the ratio
    steps / gen_length. ``temperature`` given here overrides every request; when it is not, a request's
    own ``temperature`` applies if it asks for ``do_sample``, else decoding is greedy.
    """

    def __init__(
        self,
        pretrained: str,
        adapter: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
        gen_length: int = 256,
        block_length: int = 32,
        steps: int | None = None,
        temperature: float | None = None,
        batch_size: int | str = 16,
        max_batch_size: int | None = None,
        mc_num: int = 128,
        mc_batch_size: int = 32,
        mc_sampler: str = "count",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.pretrained = str(pretrained)
        self._device = _resolve_device(device)
        self.gen_length, self.block_length = int(gen_length), int(block_length)
        self.steps = int(steps) if steps is not None else self.gen_length // 2
        self.temperature = None if temperature is None else float(temperature)
        self.batch_size = _resolve_batch_size(batch_size, max_batch_size)
        self.mc_num, self.mc_batch_size, self.mc_sampler = int(mc_num), int(mc_batch_size), str(mc_sampler)
        self.seed = int(seed)
        if self.mc_num < 1 or self.mc_batch_size < 1:
            raise ValueError(f"model_args mc_num={mc_num} and mc_batch_size={mc_batch_size} must be at least 1.")
        if self.mc_sampler not in MC_SAMPLERS:
            raise ValueError(f"model_args mc_sampler={mc_sampler!r} is not one of {', '.join(MC_SAMPLERS)}.")
        self._sampler_config(self.gen_length, 0.0)  # reject bad gen_length/block_length/steps before loading
        self.dlm, self.tokenizer = load_for_eval(
            self.pretrained, adapter, dtype=str(dtype), device=self._device, trust_remote_code=bool(trust_remote_code)
        )
        self._ignored_keys: set[str] = set()

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> EgspoLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> EgspoLM:
        # lm-eval always passes its --batch_size / --device; model_args name them more specifically and win
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**{**extra, **arg_dict})

    # -- what TemplateLM needs ------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.dlm.eos_id

    @property
    def prefix_token_id(self) -> int:
        """The context of a request whose context is empty: BOS when the tokenizer has one."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else int(bos)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # egspo encodes prompts without added specials (chat templates carry their own BOS)
        ids: list[int] = self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]
        return ids

    @property
    def tokenizer_name(self) -> str:
        return (self.tokenizer.name_or_path or self.pretrained).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(
                f"The tokenizer of {self.pretrained} has no chat template: run without --apply_chat_template."
            )
        text = self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )
        return cast(str, text)  # tokenize=False gives the text

    # -- requests -------------------------------------------------------------------------------

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str], list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        results = []
        with self.dlm.evaluating():
            for (context, continuation), context_ids, continuation_ids in tqdm(
                requests, desc="egspo loglikelihood", disable=disable_tqdm
            ):
                result = masked_loglikelihood(
                    self.dlm, context_ids, continuation_ids, mc_num=self.mc_num, mc_batch_size=self.mc_batch_size,
                    sampler=self.mc_sampler, generator=self._context_generator(context),
                )
                results.append(result)
                self.cache_hook.add_partial("loglikelihood", (context, continuation), result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "The egspo model does not support loglikelihood_rolling (perplexity tasks such as wikitext): a "
            "masked diffusion LM has no left-to-right token probabilities, and its Monte Carlo bound is "
            "computed per (context, continuation) pair. Use generate_until or multiple-choice tasks."
        )

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        contexts = [req.args[0] for req in requests]
        settings = [self._request_settings(req.args[1]) for req in requests]
        lengths = [len(self.tok_encode(c)) for c in contexts]
        groups: dict[tuple[int, float], list[int]] = {}
        for i, (max_tokens, temperature, _) in enumerate(settings):
            groups.setdefault((self._sampler_length(max_tokens), temperature), []).append(i)
        outputs: list[str] = [""] * len(requests)
        progress = tqdm(total=len(requests), desc="egspo generate_until", disable=disable_tqdm)
        for (length, temperature), members in groups.items():
            config = self._sampler_config(length, temperature)
            for batch in plan_batches([lengths[i] for i in members], self.batch_size):
                indices = [members[j] for j in batch]
                texts = self._generate([contexts[i] for i in indices], config, [settings[i] for i in indices],
                                       first=indices[0])
                for i, text in zip(indices, texts, strict=True):
                    outputs[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(indices))
        progress.close()
        return outputs

    # -- generation internals -------------------------------------------------------------------

    def _request_settings(self, gen_kwargs: dict[str, Any]) -> tuple[int | None, float, list[str]]:
        """(max_gen_toks or None, temperature, until strings) of one request."""
        ignored = set(gen_kwargs) - set(_GEN_KEYS) - self._ignored_keys
        if ignored:
            logger.warning("The egspo model ignores the generation arguments %s.", sorted(ignored))
            self._ignored_keys |= ignored
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = gen_kwargs.get("max_gen_toks")
        if self.temperature is not None:
            temperature = self.temperature
        elif gen_kwargs.get("do_sample"):
            temperature = float(gen_kwargs.get("temperature", 1.0))
        else:
            temperature = 0.0
        return (None if max_tokens is None else int(max_tokens)), temperature, until

    def _sampler_length(self, max_tokens: int | None) -> int:
        if max_tokens is None:
            return self.gen_length
        return max(1, math.ceil(max_tokens / self.block_length)) * self.block_length

    def _sampler_config(self, length: int, temperature: float) -> SamplerConfig:
        """The sampler for completions of ``length`` tokens: ``steps`` scaled from ``gen_length``."""
        num_blocks = length // self.block_length
        steps = self.steps if length == self.gen_length else \
            min(length, max(num_blocks, round(length * self.steps / self.gen_length / num_blocks) * num_blocks))
        try:
            return SamplerConfig(gen_length=length, block_length=self.block_length, steps=steps,
                                 temperature=temperature, remasking="low_confidence")
        except ConfigError as exc:
            raise ValueError(f"egspo model_args (gen_length, block_length, steps, temperature): {exc}") from exc

    def _generate(
        self, prompts: list[str], config: SamplerConfig, settings: list[tuple[int | None, float, list[str]]], first: int
    ) -> list[str]:
        """Completions of one batch, cut to each request's max_gen_toks, first end token and until strings."""
        device = self.dlm.device
        width = max(1, *(len(self.tok_encode(p)) for p in prompts))
        ids, mask = encode_prompts(self.tokenizer, prompts, width, device)
        generator = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + first)
        with autocast_for(device):
            traj = sample(self.dlm, ids, config, attention_mask=mask, generator=generator, record_greedy=False)
        return decode_completions(self.tokenizer, traj.completions, self.dlm.stop_ids,
                                  [max_tokens for max_tokens, _, _ in settings], [until for _, _, until in settings])

    def _context_generator(self, context: str) -> torch.Generator:
        # Seeded by the context, so the choices of one question share their mask counts (a lower-variance
        # comparison) and an estimate does not depend on the order or batching of the requests.
        digest = hashlib.sha256(f"{self.seed}\0{context}".encode()).digest()
        return torch.Generator(device=self.dlm.device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def decode_completions(
    tokenizer: PreTrainedTokenizerBase,
    completions: torch.Tensor,
    stop_ids: Sequence[int],
    max_tokens: Sequence[int | None],
    until: Sequence[Sequence[str]],
) -> list[str]:
    """Each completion row (B, L) cut at its first token of ``stop_ids``, after its ``max_tokens``
    tokens, decoded (special tokens skipped) and cut at the first of its ``until`` strings."""
    stops = torch.isin(completions, torch.tensor(list(stop_ids), device=completions.device))
    # the first end token, or the full length: argmax finds the first True of a row ending in True
    ends = torch.cat([stops, torch.ones_like(stops[:, :1])], dim=1).int().argmax(1).tolist()
    texts = []
    for row, end, limit, strings in zip(completions.tolist(), ends, max_tokens, until, strict=True):
        end = end if limit is None else min(end, limit)
        text = cast(str, tokenizer.decode(row[:end], skip_special_tokens=True))  # one row decodes to a str
        texts.append(cut_at_stop_strings(text, strings))
    return texts


def cut_at_stop_strings(text: str, until: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any of ``until`` (empty strings ignored)."""
    cut = min((i for s in until if s and (i := text.find(s)) >= 0), default=len(text))
    return text[:cut]


def _resolve_device(device: str | None) -> torch.device:
    """lm-eval's command line asks for cuda:0 by default: without CUDA, run on the CPU instead."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        if device is not None:
            logger.warning("device=%s was asked for but CUDA is not available: using the CPU.", device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _resolve_batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """Prompts per generation batch; lm-eval's "auto" has no probe here: max_batch_size, else 16."""
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        size = int(max_batch_size) if max_batch_size else 16
        logger.info("batch_size=%s: the egspo model does not probe batch sizes; using %d.", batch_size, size)
        return size
    size = int(batch_size)
    if size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    return size


def _register() -> None:
    # lm-eval releases that read the "lm_eval.models" entry point may have recorded this class already
    if MODEL_NAME not in MODEL_REGISTRY:
        register_model(MODEL_NAME)(EgspoLM)


_register()


def run_cli(argv: Sequence[str]) -> int:
    """lm-eval's command line with ``argv`` (as after ``lm_eval``), the ``egspo`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm-eval", *argv]  # lm-eval's parser reads sys.argv itself
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
