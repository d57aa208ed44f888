"""The record of a batch of diffusion rollouts, and the states/actions rebuilt from it (SPEC §1).

Only integers per (row, step, position) and floats per (row, step) or (row, position) are kept; the
state ``s_t`` of any row at any step is rebuilt from ``step_of_position``: position ``p`` of the
completion holds its final token in ``s_t`` when it was committed before ``t`` (``step_of_position <
t``), the mask token otherwise. The action ``a_t`` is the set of positions with ``step_of_position ==
t`` and their final tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


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
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in values.items()}
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
        return Trajectory(**{k: v[rows] if isinstance(v, torch.Tensor) else v for k, v in values.items()})
