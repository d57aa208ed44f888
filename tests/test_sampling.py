import pytest
import torch

from egspo.config import SamplerConfig
from egspo.ops import token_logprobs
from egspo.sampling import sample, transfer_schedule

from .conftest import TOY_EOS, TOY_MASK, TOY_VOCAB


def _prompts(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, TOY_VOCAB, (batch, length), generator=g)


def reference_generate(dlm, prompt, cfg: SamplerConfig) -> torch.Tensor:
    """A straightforward one-row greedy sampler with the published LLaDA semantics (loops and all)."""
    lp = prompt.shape[1]
    x = torch.full((1, lp + cfg.gen_length), TOY_MASK, dtype=torch.long)
    x[:, :lp] = prompt
    per_block = cfg.steps // (cfg.gen_length // cfg.block_length)
    for nb in range(cfg.gen_length // cfg.block_length):
        block_masks = int((x[0, lp + nb * cfg.block_length : lp + (nb + 1) * cfg.block_length] == TOY_MASK).sum())
        counts = [block_masks // per_block] * per_block
        for i in range(block_masks % per_block):
            counts[i] += 1
        for i in range(per_block):
            mask_index = x == TOY_MASK
            logits = dlm.logits(x)
            x0 = logits.clone().index_fill_(-1, torch.tensor([TOY_MASK]), float("-inf")).argmax(-1)
            p = torch.softmax(logits.float(), -1)
            x0_p = p.gather(-1, x0.unsqueeze(-1)).squeeze(-1)
            x0_p[:, lp + (nb + 1) * cfg.block_length :] = float("-inf")
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, torch.tensor(float("-inf")))
            select = torch.topk(confidence[0], k=counts[i]).indices
            x[0, select] = x0[0, select]
    return x


def test_schedule_spreads_remainder_first():
    assert transfer_schedule(SamplerConfig(gen_length=32, block_length=32, steps=16)).tolist() == [2] * 16
    sched = transfer_schedule(SamplerConfig(gen_length=16, block_length=8, steps=6))
    assert sched.tolist() == [3, 3, 2, 3, 3, 2]


@pytest.mark.parametrize("temperature, remasking", [(0.0, "low_confidence"), (0.9, "low_confidence"), (1.0, "random")])
def test_every_position_committed_once_with_schedule_counts(bert_dlm, temperature, remasking):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=6, temperature=temperature, remasking=remasking)
    traj = sample(bert_dlm, _prompts(3, 5), cfg, generator=torch.Generator().manual_seed(1))
    assert (traj.step_of_position >= 0).all() and (traj.step_of_position < cfg.steps).all()
    assert not (traj.completions == TOY_MASK).any()
    counts = torch.stack([(traj.step_of_position == t).sum(1) for t in range(cfg.steps)], dim=1)
    assert torch.equal(counts, traj.tokens_per_step)
    # block b's positions are committed during block b's steps
    block_of_pos = torch.arange(16) // 8
    assert torch.equal(traj.step_of_position // 3, block_of_pos.expand(3, -1))


def test_rebuilt_states_reproduce_recorded_logps_and_entropy(bert_dlm):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0)
    traj = sample(bert_dlm, _prompts(2, 4), cfg, generator=torch.Generator().manual_seed(2))
    for t in range(cfg.steps):
        steps = torch.full((2,), t)
        states = traj.states(steps)
        positions, tokens, valid = traj.actions(steps)
        assert valid.all() and (states.gather(1, positions) == TOY_MASK).all()
        logits = bert_dlm.logits(states, positions=positions)
        logp = token_logprobs(logits, tokens).sum(1)
        torch.testing.assert_close(logp, traj.step_logps[:, t], rtol=1e-5, atol=1e-5)
        probs = torch.softmax(logits.float(), -1)
        ent = -(probs * probs.log()).sum(-1).mean(1)
        torch.testing.assert_close(ent, traj.step_entropy[:, t], rtol=1e-5, atol=1e-5)
        # the recorded greedy completion is the argmax at every masked position of s_t
        full = bert_dlm.logits(states)[:, traj.prompt_length :]
        comp = states[:, traj.prompt_length :]
        full[..., TOY_MASK] = float("-inf")
        expected = torch.where(comp == TOY_MASK, full.argmax(-1), comp)
        assert torch.equal(traj.greedy[:, t], expected)


def test_greedy_matches_per_row_reference_and_is_deterministic(bert_dlm):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=0.0)
    prompts = _prompts(3, 6, seed=3)
    a = sample(bert_dlm, prompts, cfg)
    b = sample(bert_dlm, prompts, cfg)
    assert torch.equal(a.sequences, b.sequences)
    for row in range(3):
        ref = reference_generate(bert_dlm, prompts[row : row + 1], cfg)
        assert torch.equal(a.sequences[row], ref[0])


def test_same_seed_same_trajectory_different_seed_differs(bert_dlm):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0)
    prompts = _prompts(4, 4)
    runs = [sample(bert_dlm, prompts, cfg, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].step_logps, runs[1].step_logps)
    assert not torch.equal(runs[0].sequences, runs[2].sequences)


def test_sampler_leaves_global_rng_alone(bert_dlm):
    cfg = SamplerConfig(gen_length=8, block_length=8, steps=4, temperature=1.0, remasking="random")
    state = torch.random.get_rng_state()
    sample(bert_dlm, _prompts(2, 3), cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.random.get_rng_state())


def test_stop_at_eos_forces_end_tokens_consistently(bert_dlm):
    # make the end token the most likely everywhere so rows end in the first block
    bias = bert_dlm.model.cls.predictions.bias
    with torch.no_grad():
        bias[TOY_EOS] += 4.0
    cfg = SamplerConfig(gen_length=24, block_length=8, steps=6, temperature=0.0, stop_at_eos=True)
    traj = sample(bert_dlm, _prompts(2, 4), cfg)
    assert traj.forced[:, 2:].all(), "blocks after the one that produced the end token are forced"
    assert (traj.completions[:, 8:] == TOY_EOS).all()
    counts = torch.stack([(traj.step_of_position == t).sum(1) for t in range(cfg.steps)], dim=1)
    assert torch.equal(counts, traj.tokens_per_step)
    assert (traj.step_logps[traj.forced] == 0).all()
    assert (traj.last_content_step <= 1).all()


def test_greedy_recording_can_be_skipped_without_changing_the_rollout(bert_dlm):
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0)
    prompts = _prompts(2, 4)
    full = sample(bert_dlm, prompts, cfg, generator=torch.Generator().manual_seed(5))
    lean = sample(bert_dlm, prompts, cfg, generator=torch.Generator().manual_seed(5), record_greedy=False)
    assert lean.greedy is None
    assert torch.equal(full.sequences, lean.sequences) and torch.equal(full.step_logps, lean.step_logps)
    with pytest.raises(ValueError, match="record_greedy"):
        lean.greedy_completions(torch.zeros(2, 1, dtype=torch.long))


def test_recorder_commits_build_the_trajectory():
    """The recorder on its own: a model step, a forced end step and the greedy record of s_t."""
    from egspo.trajectory import TrajectoryRecorder

    mask, eos = TOY_MASK, TOY_EOS
    record = TrajectoryRecorder.start(torch.tensor([[5, 6], [0, 7]]), torch.tensor([[1, 1], [0, 1]]),
                                      torch.tensor([2, 2]), mask_id=mask, stop_ids=(eos,))
    block = slice(2, 6)
    assert (record.sequences[:, 2:] == mask).all() and record.attention_mask.tolist()[1] == [0, 1, 1, 1, 1, 1]
    record.record_greedy(torch.tensor([0, 1]), 0, block, torch.full((2, 4), 9), torch.empty(2, 0, dtype=torch.long))
    chosen = torch.tensor([[True, False, True, False], [False, True, False, True]])
    record.commit(torch.tensor([0, 1]), 0, block, chosen, torch.full((2, 4), 11),
                  torch.full((2, 4), -0.5), torch.tensor([[1.0, 9.0, 3.0, 9.0], [9.0, 2.0, 9.0, 4.0]]))
    # row 1 has ended: its last two positions become end tokens without the model
    record.commit_end(torch.tensor([False, True]), 1, block, torch.tensor([[True, False, True, False]]), eos)
    traj = record.to_trajectory()
    assert traj.greedy[:, 0].tolist() == [[9, 9, 9, 9], [9, 9, 9, 9]]
    assert traj.greedy[1, 1].tolist() == [eos, 11, eos, 11]
    assert traj.completions[1].tolist() == [eos, 11, eos, 11]
    assert traj.step_of_position.tolist() == [[0, -1, 0, -1], [1, 0, 1, 0]]
    assert traj.step_logps[:, 0].tolist() == [-1.0, -1.0] and traj.step_entropy[:, 0].tolist() == [2.0, 3.0]
    assert traj.forced.tolist() == [[False, False], [False, True]] and traj.step_logps[1, 1] == 0
    assert traj.last_content_step.tolist() == [0, 0]
    assert traj.tokens_per_step.tolist() == [[2, 2], [2, 2]]


# -- candidate sampling at a temperature -------------------------------------------------------------

#: Fixed logits of the fake model below (vocabulary of 6; token 5 is the mask, given the largest logit so
#: that a sampler which forgot to exclude it would commit it).
FIXED_LOGITS = [2.0, 1.0, 0.0, -1.0, 0.5, 3.0]
FAKE_MASK, FAKE_EOS = 5, 4


class FixedLogitsLM(torch.nn.Module):
    """A masked LM whose logits are the same at every position of every input (generic adapter path)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("row", torch.tensor(FIXED_LOGITS))
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # DiffusionLM.device reads a parameter

    def forward(self, input_ids, attention_mask=None, **kwargs):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.row.expand(*input_ids.shape, -1).clone())


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_candidates_follow_the_tempered_softmax(temperature):
    """One step commits every position of a 4-token block, so each row gives 4 candidate draws. Their
    frequencies match softmax(logits / T) over the non-mask tokens (chi-square with 4 degrees of freedom
    below 33.4, p = 1e-6 under the right distribution, fixed seed), pairs of positions of one row are
    independent (24 degrees of freedom, below 72.2), and the untempered softmax is rejected by far (so
    the test can tell the two apart). Mutations caught: logits * T instead of / T, ``+ log E`` for
    ``- log E`` in the Gumbel race, uniform noise, no temperature, the mask token allowed, one noise
    draw shared by the positions of a row."""
    from egspo.models.adapter import DiffusionLM

    dlm = DiffusionLM(model=FixedLogitsLM(), mask_id=FAKE_MASK, stop_ids=(FAKE_EOS,))
    rows = 5000
    cfg = SamplerConfig(gen_length=4, block_length=4, steps=1, temperature=temperature)
    traj = sample(dlm, torch.zeros(rows, 1, dtype=torch.long), cfg, generator=torch.Generator().manual_seed(0))
    tokens = traj.completions
    assert (tokens != FAKE_MASK).all()
    allowed = torch.tensor(FIXED_LOGITS[:FAKE_MASK])
    probs = torch.softmax(allowed / temperature, dim=0)
    counts = torch.bincount(tokens.reshape(-1), minlength=FAKE_MASK).float()
    assert _chi_square(counts, probs) < 33.4
    assert _chi_square(counts, torch.softmax(allowed, dim=0)) > 1000
    pairs = torch.bincount(tokens[:, 0] * FAKE_MASK + tokens[:, 3], minlength=FAKE_MASK**2).float()
    assert _chi_square(pairs, torch.outer(probs, probs).reshape(-1)) < 72.2


def test_temperature_zero_takes_the_argmax_of_the_non_mask_tokens():
    from egspo.models.adapter import DiffusionLM

    dlm = DiffusionLM(model=FixedLogitsLM(), mask_id=FAKE_MASK, stop_ids=(FAKE_EOS,))
    cfg = SamplerConfig(gen_length=4, block_length=4, steps=1, temperature=0.0)
    traj = sample(dlm, torch.zeros(8, 1, dtype=torch.long), cfg, generator=torch.Generator().manual_seed(0))
    assert (traj.completions == 0).all()
