"""Generation from Python: the trainer's block sampler on prompts, decoded to text.

    import egspo
    text = egspo.generate(model, tokenizer, "Solve this 4x4 Sudoku (0 = empty): 0000420003242430")
    texts = egspo.generate(model, tokenizer, [[{"role": "user", "content": "Hi"}]], gen_length=64, steps=32)
    texts, traj = egspo.generate(model, tokenizer, ["a", "b"], temperature=0.9, seed=0, return_trajectory=True)

``model`` is a :class:`~egspo.models.adapter.DiffusionLM`, a native LLaDA/Dream ``PreTrainedModel``, any
masked LM :func:`~egspo.models.loading.as_diffusion_lm` accepts, or a peft wrapper of one. Sampling is
:func:`egspo.sampling.sample` (what training rollouts and ``egspo eval`` run): left-padded prompts, eval
mode, no gradients, bf16 autocast on CUDA. Unset sampler options come from the model's
``generation_config`` when it holds egspo's fields (:mod:`egspo.models.diffusion_generation`), else from
egspo's defaults: gen_length 128, block_length 32 (at most gen_length), steps gen_length / 2 (rounded
to a multiple of the number of blocks), temperature 0, low_confidence remasking.

Completions are decoded as ``egspo eval`` and the trainer decode them (special tokens skipped), so the
texts are the ones those would score. :func:`denoising_frames` renders a trajectory step by step.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from egspo.config import ConfigError, SamplerConfig
from egspo.models.adapter import DiffusionLM
from egspo.models.diffusion_generation import (
    DEFAULT_BLOCK_LENGTH,
    DEFAULT_GEN_LENGTH,
    DEFAULT_REMASKING,
    DEFAULT_STEPS_RATIO,
    DEFAULT_TEMPERATURE,
    sampler_defaults,
)
from egspo.models.loading import as_diffusion_lm
from egspo.rl.batching import encode_prompts
from egspo.sampling import sample
from egspo.tasks import format_prompt
from egspo.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: The sampler settings generation takes (unset ones come from the model's generation_config or defaults).
SAMPLER_OPTIONS = ("gen_length", "block_length", "steps", "temperature", "remasking")
#: One prompt: a text, or a chat conversation (a list of {"role": ..., "content": ...} messages).
Prompt = str | Sequence[dict[str, str]]


def generate(
    model: DiffusionLM | nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Prompt | Sequence[Prompt],
    gen_length: int | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    remasking: str | None = None,
    return_trajectory: bool = False,
    chat_template: bool | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
) -> Any:
    """Completion texts of ``prompts``: a str for one prompt (a str or one conversation), else a list.

    ``chat_template``: None (default) formats conversations with the tokenizer's chat template and
    passes texts as they are; True also wraps each text as a user message and formats it (the tokenizer
    must have a template); False passes texts as they are and refuses conversations. ``seed`` seeds the
    draws of temperature > 0 (None: torch's global RNG); ``batch_size`` splits the prompts into batches
    run one after another (one generator runs through them, so sampled texts depend on it). With
    ``return_trajectory`` the result is ``(texts, trajectory)``, the :class:`Trajectory` of all prompts
    (padded to a common prompt width).
    """
    dlm = diffusion_lm(model, tokenizer)
    texts, single = format_prompts(tokenizer, prompts, chat_template)
    config = resolve_sampler(dlm.core, gen_length, block_length, steps, temperature, remasking)
    ids, mask = encode_texts(tokenizer, texts, dlm.device)
    logger.info("Generating %d completion(s): %s", len(texts), _describe(config))
    traj = sample_batches(dlm, ids, mask, config, _generator(dlm.device, seed), _checked_batch_size(batch_size))
    completions = tokenizer.batch_decode(traj.completions, skip_special_tokens=True)
    out: str | list[str] = completions[0] if single else completions
    return (out, traj) if return_trajectory else out


def generate_ids(
    model: DiffusionLM | nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    return_trajectory: bool = False,
    seed: int | None = None,
    batch_size: int | None = None,
    **sampler: Any,
) -> Any:
    """:func:`generate` on token ids: left-padded ``input_ids`` (B, L_p) -> ids (B, L_p + gen_length),
    or ``(ids, trajectory)``. ``sampler``: gen_length, block_length, steps, temperature, remasking (see
    :func:`resolve_sampler`). Without ``tokenizer`` the mask and end tokens come from the model config."""
    dlm = diffusion_lm(model, tokenizer)
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be a (batch, length) tensor of token ids; got shape "
                         f"{tuple(input_ids.shape)} and dtype {input_ids.dtype}.")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
                             f"{tuple(input_ids.shape)}: they must match.")
        # left padding: once a row's real tokens start, they run to the end
        if bool((attention_mask[:, 1:] < attention_mask[:, :-1]).any()):
            raise ValueError("attention_mask has padding after real tokens: pad prompts on the left "
                             "(tokenizer.padding_side = 'left').")
    unknown = sorted(set(sampler) - set(SAMPLER_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown generation option(s) {', '.join(unknown)} for token ids; the sampler options are "
                        f"{', '.join(SAMPLER_OPTIONS)}.")
    config = resolve_sampler(dlm.core, **sampler)
    device = dlm.device
    ids = input_ids.to(device=device, dtype=torch.long)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    logger.info("Generating %d completion(s): %s", ids.shape[0], _describe(config))
    traj = sample_batches(dlm, ids, mask, config, _generator(device, seed), _checked_batch_size(batch_size))
    return (traj.sequences, traj) if return_trajectory else traj.sequences


# -- pieces (also used by egspo eval and the CLI) ---------------------------------------------------


def diffusion_lm(model: DiffusionLM | nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> DiffusionLM:
    """``model`` as a :class:`DiffusionLM` (wrapped as :func:`~egspo.models.loading.load_model` does)."""
    if isinstance(model, DiffusionLM):
        return model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a DiffusionLM or a torch model (a transformers PreTrainedModel, possibly "
                        f"peft-wrapped); got {type(model).__name__}.")
    return as_diffusion_lm(model, tokenizer)


def resolve_sampler(
    core: nn.Module,
    gen_length: int | None = None,
    block_length: int | None = None,
    steps: int | None = None,
    temperature: float | None = None,
    remasking: str | None = None,
) -> SamplerConfig:
    """The sampler settings: the arguments given, then ``core.generation_config``'s egspo fields, then
    egspo's defaults. block_length defaults to at most gen_length, and steps to the stored (or default)
    steps-per-token ratio, rounded to a multiple of the number of blocks."""
    for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ConfigError(f"{name}={value!r} must be an integer.")
    stored = sampler_defaults(getattr(core, "generation_config", None))
    gen = gen_length if gen_length is not None else stored.get("gen_length", DEFAULT_GEN_LENGTH)
    block = block_length if block_length is not None else min(stored.get("block_length", DEFAULT_BLOCK_LENGTH), gen)
    count = steps
    if count is None:
        ratio = stored["steps"] / stored["gen_length"] if "gen_length" in stored else DEFAULT_STEPS_RATIO
        num_blocks = max(1, gen // block) if block > 0 else 1
        count = max(num_blocks, round(gen * ratio / num_blocks) * num_blocks)
    values: dict[str, Any] = {
        "gen_length": gen,
        "block_length": block,
        "steps": count,
        "temperature": temperature if temperature is not None else stored.get("temperature", DEFAULT_TEMPERATURE),
        "remasking": remasking if remasking is not None else stored.get("remasking", DEFAULT_REMASKING),
    }
    try:
        return SamplerConfig(**values)
    except ConfigError as exc:
        given = {"gen_length": gen_length, "block_length": block_length, "steps": steps,
                 "temperature": temperature, "remasking": remasking}
        defaulted = [f"{k}={values[k]}" for k in ("gen_length", "block_length", "steps") if given[k] is None]
        source = "from the model's generation_config" if stored else "egspo's defaults"
        note = f" Not given, so defaulted ({source}): {', '.join(defaulted)}." if defaulted else ""
        raise ConfigError(str(exc).replace("sampler.", "") + note) from None


def format_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: Prompt | Sequence[Prompt], chat_template: bool | None = None
) -> tuple[list[str], bool]:
    """The prompt texts, and whether ``prompts`` was a single prompt (a str or one conversation)."""
    items: list[Any]
    if isinstance(prompts, str) or _is_conversation(prompts):
        items, single = [prompts], True
    elif isinstance(prompts, Sequence) and prompts:
        items, single = list(prompts), False
    else:
        raise ValueError(f"prompts must be a str, a non-empty list of str, or chat message lists; got {prompts!r}.")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template=True, but the tokenizer has no chat template: pass chat_template=None "
                         "to use the texts as they are.")
    texts = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            texts.append(format_prompt(tokenizer, [{"role": "user", "content": item}]) if chat_template else item)
        elif _is_conversation(item):
            if chat_template is False:
                raise ValueError(f"prompts[{index}] is a conversation, but chat_template=False: give plain texts.")
            texts.append(format_prompt(tokenizer, list(item)))
        else:
            raise ValueError(f"prompts[{index}] must be a str or a list of {{'role': ..., 'content': ...}} messages; "
                             f"got {item!r}.")
    return texts, single


def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (ids, attention mask) of ``texts``, none truncated: the widest sets the width."""
    width = max(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
    return encode_prompts(tokenizer, texts, max(width, 1), device)


def sample_batches(
    dlm: DiffusionLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Trajectory:
    """:func:`~egspo.sampling.sample` (no greedy recording) over rows in batches of ``batch_size``
    (all at once by default), bf16 autocast on CUDA; one trajectory of all rows."""
    size = batch_size or ids.shape[0]
    parts = []
    with autocast_for(dlm.device):
        for start in range(0, ids.shape[0], size):
            parts.append(sample(dlm, ids[start : start + size], config, attention_mask=mask[start : start + size],
                                generator=generator, record_greedy=False))
    return parts[0] if len(parts) == 1 else Trajectory.concat(parts)


def denoising_frames(
    tokenizer: PreTrainedTokenizerBase,
    traj: Trajectory,
    placeholder: str = "░",
    highlight: Callable[[str], str] | None = None,
) -> list[list[str]]:
    """``frames[t][row]``: the completion text of ``row`` after step ``t``, each still-masked token shown
    as ``placeholder``. With ``highlight``, the text committed at step ``t`` goes through it (e.g. ANSI
    bold). Runs of committed tokens are decoded together (special tokens skipped), so the last frame
    without ``highlight`` is the decoded completion."""
    step_of = traj.step_of_position.cpu()
    completions = traj.completions.cpu()
    frames: list[list[str]] = []
    for t in range(traj.num_steps):
        # 0: still masked, 1: committed earlier, 2: committed now (merged into 1 without highlighting)
        state = torch.where(step_of > t, 0, torch.where(step_of == t, 2 if highlight else 1, 1))
        frame = []
        for row in range(traj.batch_size):
            pieces = []
            position = 0
            for kind, run in itertools.groupby(state[row].tolist()):
                length = len(list(run))
                if kind == 0:
                    pieces.append(placeholder * length)
                else:
                    text = cast(str, tokenizer.decode(completions[row, position : position + length],
                                                      skip_special_tokens=True))
                    pieces.append(highlight(text) if kind == 2 and highlight and text else text)
                position += length
            frame.append("".join(pieces))
        frames.append(frame)
    return frames


def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """The prompts of a file, one row each: a ``.jsonl`` file's objects (each with a "prompt" text or a
    "messages" conversation, other fields kept), or any other file's non-empty lines as {"prompt": line}."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--input {file}: no such file.")
    lines = file.read_text(encoding="utf-8").splitlines()
    if file.suffix != ".jsonl":
        rows = [{"prompt": line} for line in lines if line.strip()]
    else:
        rows = []
        for number, line in enumerate(lines, 1):
            if line.strip():
                rows.append(_prompt_row(file, number, line))
    if not rows:
        raise ConfigError(f"{file} holds no prompts.")
    return rows


def row_prompt(row: dict[str, Any]) -> Prompt:
    """The prompt of a :func:`read_prompts` row: its conversation, else its text."""
    return row["messages"] if "messages" in row else row["prompt"]


# -- internals ----------------------------------------------------------------------------------


def _prompt_row(file: Path, number: int, line: str) -> dict[str, Any]:
    where = f"{file} line {number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where} is not valid JSON ({exc.msg}).") from None
    if not isinstance(row, dict):
        raise ConfigError(f"{where} must be a JSON object with a 'prompt' text or a 'messages' list.")
    if ("prompt" in row) == ("messages" in row):
        raise ConfigError(f"{where} needs exactly one of 'prompt' (a text) and 'messages' (a conversation).")
    if "prompt" in row and not isinstance(row["prompt"], str):
        raise ConfigError(f"{where}: 'prompt' must be a string.")
    if "messages" in row and not _is_conversation(row["messages"]):
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} "
                          "objects with string values.")
    return row


def _is_conversation(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str) and bool(value) and \
        all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value)


def _checked_batch_size(batch_size: int | None) -> int | None:
    if batch_size is not None and (not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1):
        raise ConfigError(f"batch_size={batch_size!r} must be a positive integer (or None: all prompts at once).")
    return batch_size


def _generator(device: torch.device, seed: int | None) -> torch.Generator | None:
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _describe(config: SamplerConfig) -> str:
    return (f"gen_length={config.gen_length}, block_length={config.block_length}, steps={config.steps}, "
            f"temperature={config.temperature}, remasking={config.remasking}")
