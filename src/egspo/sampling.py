"""The LLaDA block low-confidence sampler, recording the diffusion MDP (SPEC §1).

    traj = sample(dlm, prompt_ids, SamplerConfig(gen_length=256, block_length=32, steps=128),
                  attention_mask=prompt_mask, generator=torch.Generator(device).manual_seed(0))

The completion is decoded block by block, left to right; each block gets ``steps / num_blocks``
steps, and each step commits the most confident masked positions of the current block (the numbers
per step spread as evenly as possible, earlier steps taking the remainder). Candidates are drawn by
Gumbel-max at ``temperature`` (0 = argmax); confidence is the candidate's probability under the
untempered softmax (or a uniform draw for ``remasking="random"``).

Per step the LM head runs on the current block (candidates, log-probs, entropies) and, for the
one-step greedy completion, on the remaining masked positions in chunks whose size bounds the memory
of the logits; nothing of vocabulary size outlives the step.
"""

from __future__ import annotations

import logging

import torch

from egspo.config import SamplerConfig
from egspo.models.adapter import DiffusionLM
from egspo.ops import gumbel_argmax, logprobs_and_entropy
from egspo.trajectory import Trajectory

logger = logging.getLogger(__name__)

#: Upper bound on the elements of one chunk of greedy-completion logits (about 256 MB in bf16).
GREEDY_CHUNK_ELEMENTS = 1 << 27


def transfer_schedule(config: SamplerConfig) -> torch.Tensor:
    """(T,) tokens committed at each step: a block's length spread over its steps, remainder first."""
    per_block = config.steps_per_block
    base, rem = divmod(config.block_length, per_block)
    block = torch.full((per_block,), base, dtype=torch.long)
    block[:rem] += 1
    return block.repeat(config.num_blocks)


def _is_stop(tokens: torch.Tensor, stop_ids: tuple[int, ...]) -> torch.Tensor:
    return torch.isin(tokens, torch.tensor(stop_ids, device=tokens.device))


def _without_mask(logits: torch.Tensor, mask_id: int) -> torch.Tensor:
    """Logits with the mask token's entry set to -inf (a copy; the input is left as it is)."""
    out = logits.clone()
    out[..., mask_id] = float("-inf")
    return out


def _top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the ``n`` largest scores per row (ties broken as torch.topk does)."""
    chosen = torch.zeros_like(scores, dtype=torch.bool)
    return chosen.scatter_(1, torch.topk(scores, n, dim=1).indices, True)


@torch.no_grad()
def sample(
    dlm: DiffusionLM,
    prompt_ids: torch.Tensor,
    config: SamplerConfig,
    attention_mask: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    record_greedy: bool = True,
) -> Trajectory:
    """Roll out completions for left-padded ``prompt_ids`` (B, L_p) and record the trajectory.

    ``record_greedy=False`` skips the one-step greedy completions (``traj.greedy`` is then None): they
    cost an LM-head pass over the masked tail per step and only EGSPO-SA's step rewards use them.
    """
    device = prompt_ids.device
    batch, prompt_len = prompt_ids.shape
    gen_len, block_len, steps = config.gen_length, config.block_length, config.steps
    mask_id, eos_id = dlm.mask_id, dlm.eos_id

    x = torch.cat([prompt_ids, torch.full((batch, gen_len), mask_id, dtype=torch.long, device=device)], dim=1)
    if attention_mask is not None:
        attention_mask = torch.cat([attention_mask.to(device=device, dtype=torch.long),
                                    torch.ones(batch, gen_len, dtype=torch.long, device=device)], dim=1)
        full_mask = attention_mask
        if bool(attention_mask.all()):
            attention_mask = None  # nothing to mask: let attention take its fastest path
    else:
        full_mask = torch.ones_like(x)

    schedule = transfer_schedule(config).to(device)
    step_of_position = torch.full((batch, gen_len), -1, dtype=torch.long, device=device)
    position_logps = torch.zeros(batch, gen_len, device=device)
    position_entropy = torch.zeros(batch, gen_len, device=device)
    step_logps = torch.zeros(batch, steps, device=device)
    step_entropy = torch.zeros(batch, steps, device=device)
    greedy = torch.empty(batch, steps, gen_len, dtype=torch.long, device=device) if record_greedy else None
    forced = torch.zeros(batch, steps, dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    rows = torch.arange(batch, device=device)

    # FSDP / ZeRO-3 gather weights in every forward: all processes must run the same forwards, even
    # one whose rows have all ended (it runs them on scratch copies).
    lockstep = dlm.sharded
    was_training = dlm.model.training
    dlm.model.eval()
    try:
        t = 0
        for block in range(config.num_blocks):
            lo, hi = prompt_len + block * block_len, prompt_len + (block + 1) * block_len
            if config.stop_at_eos and block > 0:
                done = _is_stop(x[:, prompt_len:lo], dlm.stop_ids).any(dim=1)
            active = rows[~done]
            for _ in range(config.steps_per_block):
                n = int(schedule[t])
                if done.any():
                    _force_end(x, done, lo, hi, n, t, eos_id, mask_id, step_of_position, greedy, forced, prompt_len)
                if active.numel():
                    _model_step(
                        dlm, x, attention_mask, active, lo, hi, n, t, config, generator,
                        step_of_position, position_logps, position_entropy, step_logps, step_entropy, greedy,
                    )
                elif lockstep:
                    _idle_step(dlm, x, attention_mask, lo, hi, n, t, config, step_of_position, greedy)
                t += 1
    finally:
        dlm.model.train(was_training)

    completion = x[:, prompt_len:]
    content = ~_is_stop(completion, dlm.stop_ids)
    last_content = torch.where(content, step_of_position, torch.zeros_like(step_of_position)).amax(dim=1)
    return Trajectory(
        sequences=x,
        attention_mask=full_mask,
        prompt_length=prompt_len,
        mask_id=mask_id,
        step_of_position=step_of_position,
        position_logps=position_logps,
        position_entropy=position_entropy,
        step_logps=step_logps,
        step_entropy=step_entropy,
        greedy=greedy,
        tokens_per_step=schedule.unsqueeze(0).expand(batch, -1).clone(),
        forced=forced,
        last_content_step=last_content,
    )


def _model_step(
    dlm: DiffusionLM,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    active: torch.Tensor,
    lo: int,
    hi: int,
    n: int,
    t: int,
    config: SamplerConfig,
    generator: torch.Generator | None,
    step_of_position: torch.Tensor,
    position_logps: torch.Tensor,
    position_entropy: torch.Tensor,
    step_logps: torch.Tensor,
    step_entropy: torch.Tensor,
    greedy: torch.Tensor | None,
) -> None:
    """One denoising step for the ``active`` rows: commit ``n`` tokens of block [lo, hi) and record it."""
    everyone = active.numel() == x.shape[0]
    xa = x if everyone else x[active]
    mask_a = None if attention_mask is None else (attention_mask if everyone else attention_mask[active])
    prompt_len = x.shape[1] - step_of_position.shape[1]

    features = dlm.encode(xa, mask_a)
    block_logits = dlm.head(features[:, lo:hi])  # (B_a, block, V)
    # the mask token is never a candidate: committing it would leave the position masked
    allowed = _without_mask(block_logits, dlm.mask_id)
    candidates = gumbel_argmax(allowed, config.temperature, generator)
    logps, entropies = logprobs_and_entropy(block_logits, candidates)
    # the untempered argmax for this block doubles as the greedy completion there
    block_greedy = allowed.argmax(-1)
    del allowed
    vocab = block_logits.shape[-1]
    if config.remasking == "low_confidence":
        # rank in the logits' dtype, as the published sampler does with its softmax
        confidence = logps.exp().to(block_logits.dtype).float()
    else:
        confidence = torch.rand(candidates.shape, generator=generator, device=x.device)
    del block_logits

    eligible = xa[:, lo:hi] == dlm.mask_id
    chosen = _top_n(torch.where(eligible, confidence, torch.full_like(confidence, float("-inf"))), n)

    rel_lo, rel_hi = lo - prompt_len, hi - prompt_len
    if greedy is not None:
        # one-step greedy completion of s_t: argmax at every masked completion position, chunked
        greedy_a = xa[:, prompt_len:].clone()
        greedy_a[:, rel_lo:rel_hi] = torch.where(eligible, block_greedy, greedy_a[:, rel_lo:rel_hi])
        # sized by the whole batch, not the active rows: the number of head calls is then the same on
        # every process (FSDP / ZeRO-3 need that)
        chunk = max(1, GREEDY_CHUNK_ELEMENTS // max(1, x.shape[0] * vocab))
        for start in range(hi, x.shape[1], chunk):
            stop = min(start + chunk, x.shape[1])
            chunk_logits = _without_mask(dlm.head(features[:, start:stop]), dlm.mask_id)
            greedy_a[:, start - prompt_len : stop - prompt_len] = chunk_logits.argmax(-1)
        greedy[active, t] = greedy_a
    del features

    new_block = torch.where(chosen, candidates, xa[:, lo:hi])
    block_steps = step_of_position[active, rel_lo:rel_hi]
    step_of_position[active, rel_lo:rel_hi] = torch.where(chosen, torch.full_like(block_steps, t), block_steps)
    chosen_f = chosen.float()
    pos_lp = position_logps[active, rel_lo:rel_hi]
    pos_ent = position_entropy[active, rel_lo:rel_hi]
    position_logps[active, rel_lo:rel_hi] = torch.where(chosen, logps, pos_lp)
    position_entropy[active, rel_lo:rel_hi] = torch.where(chosen, entropies, pos_ent)
    step_logps[active, t] = (logps * chosen_f).sum(1)
    step_entropy[active, t] = (entropies * chosen_f).sum(1) / n
    x[active, lo:hi] = new_block


def _idle_step(
    dlm: DiffusionLM,
    x: torch.Tensor,
    attention_mask: torch.Tensor | None,
    lo: int,
    hi: int,
    n: int,
    t: int,
    config: SamplerConfig,
    step_of_position: torch.Tensor,
    greedy: torch.Tensor | None,
) -> None:
    """The forwards of :func:`_model_step` on scratch copies, results discarded (lockstep, all rows ended).

    All rows, so that the number of head calls (chunks sized by the batch) matches the other processes.
    """
    batch, steps = x.shape[0], config.steps
    rows = torch.arange(batch, device=x.device)
    scratch = torch.zeros(step_of_position.shape, device=x.device)
    _model_step(
        dlm, x.clone(), attention_mask, rows, lo, hi, n, t, config, None, step_of_position.clone(),
        scratch, scratch.clone(), torch.zeros(batch, steps, device=x.device), torch.zeros(batch, steps, device=x.device),
        None if greedy is None else torch.empty_like(greedy),
    )


def _force_end(
    x: torch.Tensor,
    done: torch.Tensor,
    lo: int,
    hi: int,
    n: int,
    t: int,
    eos_id: int,
    mask_id: int,
    step_of_position: torch.Tensor,
    greedy: torch.Tensor | None,
    forced: torch.Tensor,
    prompt_len: int,
) -> None:
    """Rows that have ended commit the ``n`` leftmost masked positions of the block as end tokens."""
    block = x[done, lo:hi]
    masked = block == mask_id
    # leftmost first: score masked positions by descending index order
    position_score = torch.arange(hi - lo, 0, -1, device=x.device, dtype=torch.float).expand_as(block)
    chosen = _top_n(torch.where(masked, position_score, torch.full_like(position_score, float("-inf"))), n)
    if greedy is not None:
        greedy[done, t] = torch.where(x[done, prompt_len:] == mask_id, eos_id, x[done, prompt_len:])
    block_steps = step_of_position[done, lo - prompt_len : hi - prompt_len]
    step_of_position[done, lo - prompt_len : hi - prompt_len] = torch.where(chosen, t, block_steps)
    x[done, lo:hi] = torch.where(chosen, eos_id, block)
    forced[done, t] = True
