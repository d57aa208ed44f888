"""The record of a batch of diffusion rollouts, the states/actions rebuilt from it, and the recorder
the sampler fills while it runs (docs/algorithm.md#diffusion-mdp).

Only integers per (row, step, position) and floats per (row, step) or (row, position) are kept; the
state ``s_t`` of any row at any step is rebuilt from ``step_of_position``: position ``p`` of the
completion holds its final token in ``s_t`` when it was committed before ``t`` (``step_of_position <
t``), the mask token otherwise. The action ``a_t`` is the set of positions with ``step_of_position ==
t`` and their final tokens.

:class:`TrajectoryRecorder` is the sampler's side: the current sequences plus one buffer per recorded
field, written by :meth:`~TrajectoryRecorder.commit` (a model step), :meth:`~TrajectoryRecorder.
commit_end` (a row that has ended) and :meth:`~TrajectoryRecorder.record_greedy`, and turned into a
:class:`Trajectory` at the end. A new recorded field is a buffer here, its writes in these methods and a
field of :class:`Trajectory`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

#: Rows of a batch: a long index tensor or a bool mask over the batch.
Rows = torch.Tensor


@dataclass
class Trajectory:
    """B rollouts of T denoising steps over a completion of L_c tokens after an L_p-token prompt."""

    sequences: torch.Tensor  # (B, L_p + L_c) final tokens, prompt left-padded
    attention_mask: torch.Tensor  # (B, L_p + L_c) 1 for real tokens, 0 for prompt padding
    prompt_length: int  # L_p (including padding)
    mask_id: int
    step_of_position: torch.Tensor  # (B, L_c) long: step at which each completion position was committed
    position_logps: torch.Tensor  # (B, L_c) float: untempered log-prob of each token when committed
    position_entropy: torch.Tensor  # (B, L_c) float: entropy (nats) at each position when committed
    step_logps: torch.Tensor  # (B, T) float: sum of position_logps committed at each step
    step_entropy: torch.Tensor  # (B, T) float: mean entropy over the positions committed at each step
    greedy: torch.Tensor | None  # (B, T, L_c) long: one-step greedy completion from s_t (None if not recorded)
    tokens_per_step: torch.Tensor  # (B, T) long: tokens committed at each step
    forced: torch.Tensor  # (B, T) bool: step committed end tokens without the model (row had ended)
    last_content_step: torch.Tensor  # (B,) long: last step that committed a non-end token (0 if none)

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def num_steps(self) -> int:
        return self.step_logps.shape[1]

    @property
    def completion_length(self) -> int:
        return self.step_of_position.shape[1]

    @property
    def completions(self) -> torch.Tensor:
        """(B, L_c) final completion tokens."""
        return self.sequences[:, self.prompt_length :]

    @property
    def valid_steps(self) -> torch.Tensor:
        """(B, T) bool: steps whose action came from the model (eligible for training)."""
        return ~self.forced

    def states(self, steps: torch.Tensor) -> torch.Tensor:
        """Input ids of ``s_t`` for ``steps`` of shape (B,) (one step per row) -> (B, L_p + L_c)."""
        committed = self.step_of_position < steps.unsqueeze(-1)
        completion = torch.where(committed, self.completions, torch.full_like(self.completions, self.mask_id))
        return torch.cat([self.sequences[:, : self.prompt_length], completion], dim=1)

    def actions(self, steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The action of ``steps`` (B,): (positions (B, P) in the full sequence, tokens (B, P), valid (B, P)).

        P is the largest number of tokens committed at these steps; shorter actions are padded with
        ``valid=False`` (their positions point at a real committed position, so gathers stay in range).
        """
        hit = self.step_of_position == steps.unsqueeze(-1)  # (B, L_c)
        width = int(self.tokens_per_step.gather(1, steps.unsqueeze(-1)).max().item())
        width = max(width, 1)
        # stable sort puts the hit positions first, in left-to-right order
        order = torch.sort(hit.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]
        valid = hit.gather(1, order)
        tokens = self.completions.gather(1, order)
        return order + self.prompt_length, tokens, valid

    def greedy_completions(self, steps: torch.Tensor) -> torch.Tensor:
        """One-step greedy completions at ``steps`` (B, K) -> (B, K, L_c)."""
        if self.greedy is None:
            raise ValueError("This trajectory was sampled with record_greedy=False.")
        index = steps.unsqueeze(-1).expand(-1, -1, self.completion_length)
        return self.greedy.gather(1, index)

    def to(self, device: torch.device | str) -> Trajectory:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        moved: dict[str, Any] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return Trajectory(**moved)

    @staticmethod
    def concat(parts: list[Trajectory]) -> Trajectory:
        """The rows of ``parts`` (same prompt length, steps and completion length) in one trajectory."""
        first = parts[0]
        for part in parts[1:]:
            if (part.prompt_length, part.num_steps, part.completion_length) != (
                    first.prompt_length, first.num_steps, first.completion_length):
                raise ValueError("Trajectory.concat needs parts of equal prompt length, steps and completion length.")
        values = {}
        for f in fields(first):
            value = getattr(first, f.name)
            if isinstance(value, torch.Tensor):
                value = torch.cat([getattr(part, f.name) for part in parts])
            values[f.name] = value
        return Trajectory(**values)

    def select_rows(self, rows: torch.Tensor) -> Trajectory:
        """A trajectory of a subset of rows (e.g. this process's shard)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        picked: dict[str, Any] = {k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in values.items()}
        return Trajectory(**picked)


def stop_token_mask(tokens: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """Bool mask of the end tokens (eos / eot / pad) in ``tokens``."""
    return torch.isin(tokens, torch.tensor(tuple(stop_ids), device=tokens.device))


@dataclass
class TrajectoryRecorder:
    """The state and record of a batch being rolled out; :meth:`to_trajectory` when it is done.

    ``sequences`` is the current state s_t (prompt, then the partly unmasked completion), updated in
    place by the commits. Each method updates the given ``rows`` only (a long index or a bool mask over
    the batch), so a step may run on the rows still decoding. ``block`` is the slice of sequence
    positions of the block being decoded; ``chosen`` and the per-position tensors are over that block.
    """

    sequences: torch.Tensor  # (B, L_p + L_c) the current state s_t
    attention_mask: torch.Tensor  # (B, L_p + L_c) 1 for real tokens, 0 for prompt padding
    prompt_length: int
    mask_id: int
    stop_ids: tuple[int, ...]
    tokens_per_step: torch.Tensor  # (T,) long: the transfer schedule
    step_of_position: torch.Tensor  # (B, L_c) long, -1 until committed
    position_logps: torch.Tensor  # (B, L_c)
    position_entropy: torch.Tensor  # (B, L_c)
    step_logps: torch.Tensor  # (B, T)
    step_entropy: torch.Tensor  # (B, T)
    greedy: torch.Tensor | None  # (B, T, L_c), None when not recorded
    forced: torch.Tensor  # (B, T) bool
    _counts: list[int] = field(init=False, repr=False)  # tokens_per_step as ints (no device sync per step)

    def __post_init__(self) -> None:
        self._counts = self.tokens_per_step.tolist()

    @classmethod
    def start(
        cls,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor | None,
        tokens_per_step: torch.Tensor,
        *,
        mask_id: int,
        stop_ids: Sequence[int],
        record_greedy: bool = True,
    ) -> TrajectoryRecorder:
        """s_0 for left-padded ``prompt_ids`` (B, L_p): the prompt followed by ``sum(tokens_per_step)``
        mask tokens, and empty buffers. ``prompt_mask`` (B, L_p) marks real prompt tokens (None: all)."""
        device = prompt_ids.device
        batch, prompt_len = prompt_ids.shape
        gen_len, steps = int(tokens_per_step.sum()), tokens_per_step.shape[0]
        completion = torch.full((batch, gen_len), mask_id, dtype=torch.long, device=device)
        sequences = torch.cat([prompt_ids, completion], dim=1)
        if prompt_mask is None:
            attention_mask = torch.ones_like(sequences)
        else:
            attention_mask = torch.cat([prompt_mask.to(device=device, dtype=torch.long),
                                        torch.ones(batch, gen_len, dtype=torch.long, device=device)], dim=1)
        return cls(
            sequences=sequences,
            attention_mask=attention_mask,
            prompt_length=prompt_len,
            mask_id=mask_id,
            stop_ids=tuple(stop_ids),
            tokens_per_step=tokens_per_step.to(device),
            step_of_position=torch.full((batch, gen_len), -1, dtype=torch.long, device=device),
            position_logps=torch.zeros(batch, gen_len, device=device),
            position_entropy=torch.zeros(batch, gen_len, device=device),
            step_logps=torch.zeros(batch, steps, device=device),
            step_entropy=torch.zeros(batch, steps, device=device),
            greedy=torch.empty(batch, steps, gen_len, dtype=torch.long, device=device) if record_greedy else None,
            forced=torch.zeros(batch, steps, dtype=torch.bool, device=device),
        )

    def _completion_slice(self, block: slice) -> slice:
        return slice(block.start - self.prompt_length, block.stop - self.prompt_length)

    def record_greedy(
        self, rows: Rows, t: int, block: slice, block_greedy: torch.Tensor, tail_greedy: torch.Tensor
    ) -> None:
        """The one-step greedy completion of s_t, recorded BEFORE step t commits: committed tokens kept,
        the block's masked positions take ``block_greedy`` (R, block) and every position after the block
        (all still masked: blocks are decoded left to right) takes ``tail_greedy`` (R, after)."""
        if self.greedy is None:
            return
        rel = self._completion_slice(block)
        completion = self.sequences[rows, self.prompt_length :].clone()
        masked = self.sequences[rows, block] == self.mask_id
        completion[:, rel] = torch.where(masked, block_greedy, completion[:, rel])
        completion[:, rel.stop :] = tail_greedy
        self.greedy[rows, t] = completion

    def commit(
        self,
        rows: Rows,
        t: int,
        block: slice,
        chosen: torch.Tensor,
        tokens: torch.Tensor,
        logps: torch.Tensor,
        entropies: torch.Tensor,
    ) -> None:
        """Step t of a model step: the ``chosen`` (R, block) positions take ``tokens``; their untempered
        log-probs and entropies are recorded per position, summed (log-probs) and averaged (entropy)
        per step."""
        rel = self._completion_slice(block)
        block_steps = self.step_of_position[rows, rel]
        self.step_of_position[rows, rel] = torch.where(chosen, torch.full_like(block_steps, t), block_steps)
        chosen_f = chosen.float()
        self.position_logps[rows, rel] = torch.where(chosen, logps, self.position_logps[rows, rel])
        self.position_entropy[rows, rel] = torch.where(chosen, entropies, self.position_entropy[rows, rel])
        self.step_logps[rows, t] = (logps * chosen_f).sum(1)
        self.step_entropy[rows, t] = (entropies * chosen_f).sum(1) / self._counts[t]
        self.sequences[rows, block] = torch.where(chosen, tokens, self.sequences[rows, block])

    def commit_end(self, rows: Rows, t: int, block: slice, chosen: torch.Tensor, end_id: int) -> None:
        """Step t of rows that have ended: the ``chosen`` positions take ``end_id`` without the model (the
        step is marked forced; its log-prob and entropy stay 0), and the greedy completion of s_t is
        the state with every masked position set to ``end_id``."""
        completion = self.sequences[rows, self.prompt_length :]
        if self.greedy is not None:
            self.greedy[rows, t] = torch.where(completion == self.mask_id, end_id, completion)
        rel = self._completion_slice(block)
        self.step_of_position[rows, rel] = torch.where(chosen, t, self.step_of_position[rows, rel])
        self.sequences[rows, block] = torch.where(chosen, end_id, self.sequences[rows, block])
        self.forced[rows, t] = True

    def scratch(self) -> TrajectoryRecorder:
        """A throwaway copy with the same state and empty buffers, for steps whose results are discarded
        (a sharded model's idle steps run the same forwards as the other processes)."""
        return TrajectoryRecorder(
            sequences=self.sequences.clone(),
            attention_mask=self.attention_mask,
            prompt_length=self.prompt_length,
            mask_id=self.mask_id,
            stop_ids=self.stop_ids,
            tokens_per_step=self.tokens_per_step,
            step_of_position=self.step_of_position.clone(),
            position_logps=torch.zeros_like(self.position_logps),
            position_entropy=torch.zeros_like(self.position_entropy),
            step_logps=torch.zeros_like(self.step_logps),
            step_entropy=torch.zeros_like(self.step_entropy),
            greedy=None if self.greedy is None else torch.empty_like(self.greedy),
            forced=torch.zeros_like(self.forced),
        )

    def to_trajectory(self) -> Trajectory:
        """The finished record; ``last_content_step`` is the last step that committed a non-end token."""
        content = ~stop_token_mask(self.sequences[:, self.prompt_length :], self.stop_ids)
        steps = self.step_of_position
        batch = steps.shape[0]
        return Trajectory(
            sequences=self.sequences,
            attention_mask=self.attention_mask,
            prompt_length=self.prompt_length,
            mask_id=self.mask_id,
            step_of_position=steps,
            position_logps=self.position_logps,
            position_entropy=self.position_entropy,
            step_logps=self.step_logps,
            step_entropy=self.step_entropy,
            greedy=self.greedy,
            tokens_per_step=self.tokens_per_step.unsqueeze(0).expand(batch, -1).clone(),
            forced=self.forced,
            last_content_step=torch.where(content, steps, torch.zeros_like(steps)).amax(dim=1),
        )
