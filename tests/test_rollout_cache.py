"""The approximate KV-cached rollout (rollout_cache=prefix/dual) and the compiled rollout forward (CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from egspo.config import ConfigError, ModelConfig, SamplerConfig, load_config
from egspo.models.adapter import DiffusionLM, gather_positions
from egspo.models.dream import DreamConfig, DreamModel
from egspo.models.lora import prepare_for_training
from egspo.models.tiny import random_model
from egspo.ops import token_logprobs
from egspo.rl.estimators import action_logps
from egspo.sampling import sample

from .conftest import TOY_MASK, TOY_VOCAB

torch.set_num_threads(1)

CACHES = ("prefix", "dual")
DREAM_VOCAB, DREAM_MASK, DREAM_EOS = 100, 99, 98


def _llada(n_kv_heads: int = 1) -> DiffusionLM:
    """A micro LLaDA with grouped-query attention (2 query heads, 1 key/value head)."""
    model, tok = random_model("tiny", seed=0, d_model=64, n_layers=2, n_heads=2, n_kv_heads=n_kv_heads,
                              mlp_hidden_size=128)
    return DiffusionLM(model=model, mask_id=tok.mask_token_id, stop_ids=(tok.eos_token_id,), native=True)


def _dream() -> DiffusionLM:
    torch.manual_seed(0)
    config = DreamConfig(vocab_size=DREAM_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         mask_token_id=DREAM_MASK, eos_token_id=DREAM_EOS, pad_token_id=DREAM_EOS,
                         bos_token_id=DREAM_EOS)
    return DiffusionLM(model=DreamModel(config).eval(), mask_id=DREAM_MASK, stop_ids=(DREAM_EOS,), shift=1,
                       native=True)


MODELS = {"llada": _llada, "dream": _dream}


def _prompts(batch: int = 3, length: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts: row 0 has 3 padding positions."""
    ids = torch.randint(5, 90, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return ids, mask


def _cfg(cache: str, **kw) -> SamplerConfig:
    return SamplerConfig(**{"gen_length": 24, "block_length": 8, "steps": 12, "temperature": 1.0, "cache": cache,
                            **kw})


def _run(dlm: DiffusionLM, cfg: SamplerConfig, seed: int = 0, **kw):
    ids, mask = _prompts()
    return sample(dlm, ids, cfg, attention_mask=mask, generator=torch.Generator().manual_seed(seed), **kw)


@torch.no_grad()
def full_forward_logps(model: torch.nn.Module, traj, steps: torch.Tensor, shift: int = 0) -> torch.Tensor:
    """(B,) log pi(a_t | s_t) at ``steps`` (B,), computed without the library's estimator (no
    ``action_logps``, ``Trajectory.states/actions``, ``logits_positions`` or ``token_logprobs``): s_t rebuilt
    from its definition (a completion position holds its token iff committed before t), one plain full
    forward of ``model``, log_softmax over the vocabulary and a gather at the positions committed at t.
    ``shift`` = 1 for Dream, whose raw output at i predicts token i + 1. The comparisons against it catch
    (tried): s_t rebuilt with the step's own tokens (``<=`` in ``Trajectory.states``), the trainer's exact
    old log-probs all taken at slot 0, ``action_logps`` without the attention mask, Dream's shift ignored
    at the head positions, the exact recomputation run in train mode (LoRA dropout)."""
    lp = traj.prompt_length
    completion = traj.sequences[:, lp:]
    before = traj.step_of_position < steps.unsqueeze(1)
    state = torch.cat([traj.sequences[:, :lp], torch.where(before, completion, traj.mask_id)], dim=1)
    raw = model(input_ids=state, attention_mask=traj.attention_mask).logits.float()
    aligned = raw[:, lp - shift : raw.shape[1] - shift]
    logp = torch.log_softmax(aligned, dim=-1).gather(-1, completion.unsqueeze(-1)).squeeze(-1)
    return torch.where(traj.step_of_position == steps.unsqueeze(1), logp, 0.0).sum(1)


# -- the models' windowed forward ------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_window_against_a_fresh_cache_reproduces_the_full_forward(name):
    dlm = MODELS[name]()
    ids, mask = _prompts()
    x = torch.cat([ids, torch.randint(5, 90, (3, 16), generator=torch.Generator().manual_seed(1))], dim=1)
    full_mask = torch.cat([mask, torch.ones(3, 16, dtype=torch.long)], dim=1)
    with torch.no_grad():
        full = dlm.encode(x, full_mask)
        features, cache = dlm.encode_cached(x, full_mask)
        assert torch.equal(features, full), "the caching forward is the plain forward"
        assert len(cache) == 2 and cache[0].keys.shape[2] == x.shape[1]
        for lo, hi in ((7, 15), (15, 23), (7, 23)):
            window = dlm.encode_window(x, lo, hi, cache, full_mask)
            torch.testing.assert_close(window, full[:, lo:hi], rtol=1e-5, atol=1e-5)


# -- the cached sampler ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", CACHES)
def test_cached_trajectory_is_valid(name, cache):
    dlm = MODELS[name]()
    cfg = _cfg(cache)
    traj = _run(dlm, cfg)
    assert (traj.step_of_position >= 0).all() and (traj.step_of_position < cfg.steps).all()
    assert not (traj.completions == dlm.mask_id).any()
    counts = torch.stack([(traj.step_of_position == t).sum(1) for t in range(cfg.steps)], dim=1)
    assert torch.equal(counts, traj.tokens_per_step), "every position committed once, as scheduled"
    block_of_position = torch.arange(cfg.gen_length) // cfg.block_length
    assert torch.equal(traj.step_of_position // cfg.steps_per_block, block_of_position.expand(3, -1))
    assert torch.isfinite(traj.step_logps).all() and (traj.step_logps < 0).all()
    assert not (traj.greedy == dlm.mask_id).any()
    # a committed position keeps its token in every later greedy completion
    for t in range(cfg.steps):
        committed = traj.step_of_position < t
        assert torch.equal(traj.greedy[:, t][committed], traj.completions[committed])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", CACHES)
def test_first_step_of_every_block_is_the_exact_samplers(name, cache):
    dlm = MODELS[name]()
    cfg = _cfg(cache)
    exact, cached = _run(dlm, _cfg("none")), _run(dlm, cfg)
    # block 0 starts from the same state with the same random stream: bit-identical step
    first = exact.step_of_position == 0
    assert torch.equal(first, cached.step_of_position == 0)
    assert torch.equal(exact.completions[first], cached.completions[first])
    for field in ("step_logps", "step_entropy"):
        assert torch.equal(getattr(exact, field)[:, 0], getattr(cached, field)[:, 0])
    assert torch.equal(exact.greedy[:, 0], cached.greedy[:, 0])
    # every block's first step: the recorded log-prob is the exact model's on the rebuilt state
    for t in range(0, cfg.steps, cfg.steps_per_block):
        logp = full_forward_logps(dlm.model, cached, torch.full((3,), t), dlm.shift)
        torch.testing.assert_close(logp, cached.step_logps[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
def test_action_logps_is_a_full_forward_on_the_rebuilt_state(name):
    """The trainer's estimator (states rebuilt by the trajectory, LM head only at the committed positions)
    against the plain full forward, at every step, the left-padded row included."""
    dlm = MODELS[name]()
    traj = _run(dlm, _cfg("none"))
    for t in range(traj.num_steps):
        steps = torch.full((3,), t)
        with torch.no_grad():
            logp = action_logps(dlm, traj, steps)[0]
        torch.testing.assert_close(logp, full_forward_logps(dlm.model, traj, steps, dlm.shift), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", CACHES)
def test_recorded_logps_and_greedy_match_a_recomputation_with_the_same_cache(name, cache):
    dlm = MODELS[name]()
    cfg = _cfg(cache)
    traj = _run(dlm, cfg)
    lp, per_block = traj.prompt_length, cfg.steps_per_block
    gaps = []
    for t in range(cfg.steps):
        block, first = divmod(t, per_block)[0], t - t % per_block
        lo, hi = lp + block * cfg.block_length, lp + (block + 1) * cfg.block_length
        state = traj.states(torch.full((3,), t))
        positions, tokens, valid = traj.actions(torch.full((3,), t))
        with torch.no_grad():
            block_start, cache_kv = dlm.encode_cached(traj.states(torch.full((3,), first)), traj.attention_mask)
            end = state.shape[1] if cache == "prefix" else hi
            window = dlm.encode_window(state, lo, end, cache_kv, traj.attention_mask)
            logits = gather_positions(dlm.head(window[:, : hi - lo]), positions - lo)
        exact = full_forward_logps(dlm.model, traj, torch.full((3,), t), dlm.shift)
        logp = torch.where(valid, token_logprobs(logits, tokens), 0.0).sum(1)
        torch.testing.assert_close(logp, traj.step_logps[:, t], rtol=1e-4, atol=1e-4)
        # greedy tail: this step's window (prefix) or the block start's forward (dual, stale)
        tail_features = window[:, hi - lo :] if cache == "prefix" else block_start[:, hi:]
        if tail_features.shape[1]:
            tail_logits = dlm.head(tail_features)
            tail_logits[..., dlm.mask_id] = float("-inf")
            assert torch.equal(traj.greedy[:, t, hi - lp :], tail_logits.argmax(-1))
        gaps.append(float((exact - traj.step_logps[:, t]).abs().max()))
    assert max(gaps[0::per_block]) < 1e-4, "block starts are exact"
    assert max(gaps) > 1e-6, "later steps are approximate"


@pytest.mark.parametrize("cache", CACHES)
def test_stop_at_eos_subsets_the_cache_rows(cache):
    """Greedy decoding is row-independent: each row of a batch where some rows end early (and are
    dropped from the forwards and the cache) equals that row decoded alone."""
    dlm = _llada()
    head = dlm.core.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.out_features))
    cfg = _cfg(cache, temperature=0.0, stop_at_eos=True)
    ids = torch.randint(5, 90, (6, 5), generator=torch.Generator().manual_seed(4))
    # favour the end token just enough that some rows end before the last block and others do not
    for eos_bias in torch.arange(0.2, 0.6, 0.05).tolist():
        with torch.no_grad():
            head.bias[dlm.eos_id] = eos_bias
        batch = sample(dlm, ids, cfg)
        ended_early = batch.forced.any(1)
        if ended_early.any() and not ended_early.all():
            break
    else:
        pytest.fail("no end-token bias gives rows that end at different blocks")
    for row in range(ids.shape[0]):
        alone = sample(dlm, ids[row : row + 1], cfg)
        assert torch.equal(alone.sequences[0], batch.sequences[row])
        torch.testing.assert_close(alone.step_logps[0], batch.step_logps[row], rtol=1e-5, atol=1e-5)
        assert torch.equal(alone.greedy[0], batch.greedy[row])


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("cache", CACHES)
def test_cache_keeps_the_activation_dtype_under_an_accelerate_mixed_precision_model(name, cache, monkeypatch):
    """``accelerator.prepare`` under bf16 wraps the forward so that its outputs come back in fp32, the
    returned cache included. Every window must still splice bf16 keys/values into a bf16 cache: CUDA's
    ``index_copy`` refuses mixed dtypes (CPU autocast promotes them, which would hide the error here),
    and an fp32 cache doubles the rollout's largest buffer."""
    from types import MethodType

    from accelerate.utils import convert_outputs_to_fp32

    from egspo.models import llada

    dlm = MODELS[name]()
    model = dlm.model
    autocast_forward = torch.autocast("cpu", dtype=torch.bfloat16)(type(model).forward)
    model.forward = MethodType(convert_outputs_to_fp32(autocast_forward), model)  # as accelerate's prepare
    splices: list[tuple[torch.dtype, torch.dtype]] = []
    original_splice = llada.splice

    def strict_splice(cached, fresh, positions):
        splices.append((cached.keys.dtype, fresh.keys.dtype))
        return original_splice(cached, fresh, positions)

    monkeypatch.setattr(llada, "splice", strict_splice)
    ids, mask = _prompts()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        _, kv = dlm.encode_cached(torch.cat([ids, torch.full((3, 24), dlm.mask_id)], dim=1),
                                  torch.cat([mask, torch.ones(3, 24, dtype=torch.long)], dim=1))
        traj = _run(dlm, _cfg(cache))
    assert kv[0].keys.dtype == kv[0].values.dtype == torch.bfloat16, "the cache is kept as computed"
    assert splices and all(c == f == torch.bfloat16 for c, f in splices), set(splices)
    assert not (traj.completions == dlm.mask_id).any()


def test_cache_needs_a_native_model(bert_dlm):
    ids = torch.randint(5, TOY_VOCAB, (2, 4))
    with pytest.raises(ConfigError, match="native LLaDA or Dream"):
        sample(bert_dlm, ids, SamplerConfig(gen_length=8, block_length=8, steps=4, cache="dual"))
    assert not (sample(bert_dlm, ids, SamplerConfig(gen_length=8, block_length=8, steps=4)).completions
                == TOY_MASK).any()


def test_bad_cache_value_names_the_field():
    with pytest.raises(ConfigError, match=r"cache='full' is not one of 'none', 'prefix', 'dual'"):
        SamplerConfig(cache="full")
    with pytest.raises(ConfigError, match=r"rollout_cache='exact'"):
        load_config(None, ["rollout_cache=exact"])
    assert load_config(None, ["rollout_cache=dual", "compile_rollout=true"]).rollout_sampler().compile is True


# -- compiled rollout forward -----------------------------------------------------------------------


def _eager_compiled(dlm: DiffusionLM, runs: list[int] | None = None) -> DiffusionLM:
    """Compile once with an eager backend (no C++ toolchain or minutes of inductor on a CPU) that
    counts the compiled graphs' runs in ``runs``."""

    def backend(graph, example_inputs):
        def run(*args):
            if runs is not None:
                runs.append(1)
            return graph.forward(*args)

        return run

    dlm.compiled_model(backend=backend)
    return dlm


@pytest.mark.parametrize("cache", ("none", "dual"))
def test_compiled_rollout_matches_the_uncompiled_one(cache):
    runs: list[int] = []
    dlm = _eager_compiled(_llada(), runs)
    compiled_module = dlm.compiled_model()
    plain = _run(dlm, _cfg(cache))
    assert not runs, "compile=False never runs the compiled module"
    compiled = _run(dlm, _cfg(cache, compile=True))
    assert len(runs) >= _cfg(cache).steps, "every forward of the compiled rollout runs compiled graphs"
    assert dlm.compiled_model() is compiled_module, "compiled once and kept"
    assert torch.equal(plain.sequences, compiled.sequences)
    torch.testing.assert_close(plain.step_logps, compiled.step_logps, rtol=1e-5, atol=1e-5)


def test_compiled_rollout_through_a_peft_model():
    dlm = _llada(n_kv_heads=2)
    lora = ModelConfig(name_or_path="builtin:tiny", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    dlm = _eager_compiled(prepare_for_training(dlm, lora, need_reference=False))
    with torch.no_grad():  # a non-zero adapter, so the LoRA branch matters
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    plain, compiled = _run(dlm, _cfg("prefix")), _run(dlm, _cfg("prefix", compile=True))
    assert torch.equal(plain.sequences, compiled.sequences)
    torch.testing.assert_close(plain.step_logps, compiled.step_logps, rtol=1e-5, atol=1e-5)
    assert dlm.model.training, "the sampler restores the training mode"


# -- training with an approximate rollout --------------------------------------------------------


def test_trainer_with_dual_cache_recomputes_old_logps_exactly(micro_model, prompts_file, tmp_path):
    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=2", "rollout_cache=dual",
                      "max_completion_length=16", "diffusion_steps=8")
    trainer = EGSPOTrainer(args=cfg)
    recorded: list[torch.Tensor] = []
    original = trainer._exact_step_outputs

    def spy(traj, selected):
        exact, greedy, is_weights, mismatch = original(traj, selected)
        gap = mismatch["approx/old_logp_gap"]
        approx = traj.step_logps.gather(1, selected.steps)
        w = selected.weights.bool()
        assert abs(gap - float((approx - exact)[w].abs().mean())) < 1e-5
        # the exact old log-probs of every selected slot are those of a plain full forward of the rollout's
        # model on s_t (an independent computation, not the trainer's estimator again)
        with trainer.dlm.evaluating():
            check = torch.stack([full_forward_logps(trainer.dlm.model, traj, selected.steps[:, k])
                                 for k in range(selected.steps.shape[1])], dim=1)
        torch.testing.assert_close(exact, check, rtol=1e-5, atol=1e-5)
        recorded.append(exact)
        return exact, greedy, is_weights, mismatch

    trainer._exact_step_outputs = spy
    trainer.train()
    assert len(recorded) == 2
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["approx/old_logp_gap"] >= 0 and m["time/old_logps"] > 0
    assert any(m["approx/old_logp_gap"] > 0 for m in lines), "the second block's steps are approximate"


def test_exact_trainer_logs_no_gap(micro_model, prompts_file, tmp_path):
    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=1")
    trainer = EGSPOTrainer(args=cfg)
    trainer._exact_step_outputs = None  # never called on the exact path
    trainer.train()
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert "approx/old_logp_gap" not in line and "time/old_logps" not in line


def test_cached_rollout_updates_start_from_the_exact_old_logps_of_the_rollout_policy(
        micro_model, prompts_file, tmp_path, monkeypatch):
    """The old log-probs that the updates use are the exact ones, computed in eval mode (LoRA dropout
    off, as in the rollout) from the weights the rollout used, not the sampler's approximate record.
    Two steps: LoRA's B starts at zero, so dropout on the adapter's input only matters after an update."""
    import egspo.rl.steps as steps_module
    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=2", "rollout_cache=prefix",
                      "max_completion_length=16", "diffusion_steps=8", "use_peft=true", "lora_r=4",
                      "lora_alpha=8", "lora_dropout=0.5", "beta=0")
    trainer = EGSPOTrainer(args=cfg)
    model = trainer.dlm.model
    seen: dict[str, object] = {}
    original_rollout, original_exact = trainer._rollout, trainer._exact_step_outputs

    def rollout(step):
        seen["weights"] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return original_rollout(step)

    def exact_old_logps(traj, selected):
        assert all(torch.equal(p, seen["weights"][n]) for n, p in model.named_parameters() if p.requires_grad)
        outputs = original_exact(traj, selected)
        exact = outputs[0]
        model.eval()  # the rollout's mode: LoRA dropout off
        check = torch.stack([full_forward_logps(model, traj, selected.steps[:, k])
                             for k in range(selected.steps.shape[1])], dim=1)
        model.train()
        torch.testing.assert_close(exact, check, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(exact, traj.step_logps.gather(1, selected.steps)), "the record is approximate"
        seen.setdefault("exact", []).append(exact)
        return outputs

    olds: list[torch.Tensor] = []
    original_loss = steps_module.egspo_step_loss

    def loss(logp, logp_old, *args, **kwargs):
        olds.append(logp_old.detach().clone())
        return original_loss(logp, logp_old, *args, **kwargs)

    trainer._rollout, trainer._exact_step_outputs = rollout, exact_old_logps
    monkeypatch.setattr(steps_module, "egspo_step_loss", loss)
    trainer.train()
    exact = torch.cat(seen["exact"], dim=1)  # (B, 2K): the slots of step 1, then of step 2
    assert len(olds) == exact.shape[1]
    for k, old in enumerate(olds):
        torch.testing.assert_close(old, exact[:, k].to(old.dtype))


@pytest.mark.parametrize("merge", [False, True])
def test_compiled_rollout_module_follows_the_model_and_never_runs_the_reference(
        micro_model, prompts_file, tmp_path, merge):
    """The compiled module belongs to one model object: a DiffusionLM with another model (as after
    ``accelerator.prepare``) compiles its own. In training, only rollouts run it: the KL reference
    (LoRA: the same model with the adapter disabled) and the updates run the plain module. With
    ``merge_lora_rollout`` the compiled module is the merged copy's (the view :meth:`for_rollout` returns)."""
    import contextlib
    import dataclasses

    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    dlm = _eager_compiled(_llada())
    other = dataclasses.replace(dlm, model=_llada().model)
    assert other.compiled_model(backend="eager") is not dlm.compiled_model()
    other.model = dlm.model  # the same field reassigned: recompiled for the new object
    assert other.compiled_model(backend="eager")._orig_mod is dlm.model

    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=1", "compile_rollout=true",
                      "use_peft=true", "lora_r=4", "lora_alpha=8", "beta=0.04", f"merge_lora_rollout={merge}")
    trainer = EGSPOTrainer(args=cfg)
    runs: list[int] = []
    rollout_dlm = trainer.dlm.for_rollout(merge)
    assert (rollout_dlm is not trainer.dlm) == merge
    _eager_compiled(rollout_dlm, runs)
    phases: dict[str, int] = {}
    original_reference, original_update = trainer.dlm.reference_model, trainer._update_egspo

    def reference_model():
        before = len(runs)
        with original_reference() as ref:
            yield ref
        phases["reference"] = phases.get("reference", 0) + len(runs) - before

    def update(*args, **kwargs):
        phases["rollout"] = len(runs)
        return original_update(*args, **kwargs)

    trainer.dlm.reference_model = contextlib.contextmanager(reference_model)
    trainer._update_egspo = update
    trainer.train()
    assert phases["rollout"] >= cfg.diffusion_steps, "the rollout ran compiled"
    assert phases["reference"] == 0 and len(runs) == phases["rollout"], "nothing else did"


def test_trainer_refuses_the_cache_with_a_sharded_model_before_any_rollout(micro_model, prompts_file, tmp_path,
                                                                          monkeypatch):
    from egspo.config import ConfigError
    from egspo.models.adapter import DiffusionLM
    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    monkeypatch.setattr(DiffusionLM, "sharded", property(lambda self: True))
    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=1", "rollout_cache=prefix",
                      "max_completion_length=16", "diffusion_steps=8")
    with pytest.raises(ConfigError, match="rollout_cache='prefix'.*sharded"):
        EGSPOTrainer(args=cfg)


def test_cached_rollout_step_rewards_and_importance_weights_come_from_the_exact_forward(
        micro_model, prompts_file, tmp_path, monkeypatch):
    """With an approximate rollout, r_hat is scored on greedy completions from the exact forward of s_t
    (an independent full forward: argmax, mask excluded, at the positions still masked), and each step's
    loss is weighted by min(exp(exact - approximate), cap)."""
    import egspo.rl.steps as steps_module
    from egspo.rl.trainer import EGSPOTrainer

    from .test_trainer import make_config

    cap = 1.05
    cfg = make_config(micro_model, prompts_file, tmp_path / "run", "max_steps=1", "rollout_cache=dual",
                      "max_completion_length=16", "diffusion_steps=8", "algorithm=egspo_sa",
                      f"importance_weight_cap={cap}")
    trainer = EGSPOTrainer(args=cfg)
    seen: dict[str, object] = {}
    original_exact = trainer._exact_step_outputs

    def exact_outputs(traj, selected):
        out = original_exact(traj, selected)
        exact, greedy, is_weights, _ = out
        with torch.no_grad():
            for k in range(selected.steps.shape[1]):
                states = traj.states(selected.steps[:, k])
                logits = trainer.dlm.logits(states, traj.attention_mask)[:, traj.prompt_length:].float()
                logits[..., trainer.dlm.mask_id] = float("-inf")
                completion = states[:, traj.prompt_length:]
                expected = torch.where(completion == trainer.dlm.mask_id, logits.argmax(-1), completion)
                assert torch.equal(greedy[:, k], expected)
        approx = traj.step_logps.gather(1, selected.steps)
        torch.testing.assert_close(is_weights, (exact - approx).exp().clamp(max=cap))
        seen.update(greedy=greedy, is_weights=is_weights, weights=selected.weights)
        return out

    scored: list = []
    original_score = trainer.scorer.score

    def score(prompts, completions, rows, **kwargs):
        scored.append(list(completions))
        return original_score(prompts, completions, rows, **kwargs)

    weights_seen: list[torch.Tensor] = []
    original_loss = steps_module.egspo_step_loss

    def loss(logp, logp_old, logp_ref, advantages, weights, *args, **kwargs):
        weights_seen.append(weights.detach().clone())
        return original_loss(logp, logp_old, logp_ref, advantages, weights, *args, **kwargs)

    trainer._exact_step_outputs = exact_outputs
    monkeypatch.setattr(trainer.scorer, "score", score)
    monkeypatch.setattr(steps_module, "egspo_step_loss", loss)
    trainer.train()
    greedy = seen["greedy"]
    k = greedy.shape[1]
    decoded = trainer.processing_class.batch_decode(greedy.flatten(0, 1), skip_special_tokens=True)
    assert scored[1] == decoded, "the step rewards score the exact greedy completions"
    expected = (seen["weights"] * seen["is_weights"]).T  # slot-major, as the micro-batches run
    for slot in range(k):
        torch.testing.assert_close(weights_seen[slot], expected[slot].to(weights_seen[slot].dtype))
    line = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("approx/log_ratio_mean", "approx/log_ratio_max", "approx/capped_fraction"):
        assert key in line
    assert 0 <= line["approx/capped_fraction"] <= 1
