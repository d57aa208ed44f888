"""The merged LoRA copy that rollouts run on (merge_lora_rollout) and the cache refresh (rollout_cache_refresh)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from egspo.config import ConfigError, ModelConfig, SamplerConfig, load_config
from egspo.models.adapter import DiffusionLM
from egspo.models.lora import prepare_for_training
from egspo.models.merged import MergedLoRA, merge_blocker
from egspo.models.tiny import random_model
from egspo.sampling import sample

from .test_rollout_cache import _cfg, _run, full_forward_logps

torch.set_num_threads(1)

LORA = ModelConfig(name_or_path="builtin:tiny", lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)


def _lora_llada(seed: int = 0) -> DiffusionLM:
    """A micro LLaDA with a LoRA adapter whose B matrices are non-zero (so the adapter changes the model)."""
    model, tok = random_model("tiny", seed=seed, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=128)
    dlm = DiffusionLM(model=model, mask_id=tok.mask_token_id, stop_ids=(tok.eos_token_id,), native=True)
    dlm = prepare_for_training(dlm, LORA, need_reference=False)
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return dlm


def _inputs() -> torch.Tensor:
    return torch.randint(5, 90, (3, 20), generator=torch.Generator().manual_seed(3))


def test_merged_copy_computes_the_adapted_model_and_shares_the_rest():
    dlm = _lora_llada()
    base_before = {name: p.detach().clone() for name, p in dlm.core.named_parameters() if "lora_" not in name}
    view = dlm.for_rollout(True)
    assert view is not dlm and view.model is not dlm.model
    x = _inputs()
    dlm.model.eval()
    with torch.no_grad():
        adapted, merged = dlm.logits(x), view.logits(x)
        with dlm.reference_model() as ref:
            base = dlm.logits(x, model=ref)
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)
    assert (merged - base).abs().max() > 1e-3, "the adapter changes the model, so the comparison can fail"
    # the training model's weights are untouched (no merge in place) and unadapted ones are shared, not copied
    for name, p in dlm.core.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, base_before[name]), name
    train_ptrs = {p.data_ptr() for p in dlm.core.parameters()}
    view_params = list(view.model.parameters())
    shared = [p for p in view_params if p.data_ptr() in train_ptrs]
    assert view.model.get_input_embeddings().weight.data_ptr() in train_ptrs
    assert len(shared) < len(view_params), "the adapted linears own their merged weights"
    assert not any("lora_" in name for name, _ in view.model.named_parameters()), "a plain module"
    assert not any(p.requires_grad for p in view_params)


def test_merged_copy_follows_optimizer_steps_and_skips_unchanged_adapters(monkeypatch):
    dlm = _lora_llada()
    view = dlm.for_rollout(True)
    params = [p for p in dlm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    x = _inputs()
    dlm.model.train()
    dlm.logits(x).float().square().mean().backward()
    optimizer.step()
    dlm.model.eval()
    with torch.no_grad():
        before = view.logits(x)  # merged weights not resynced yet: the old adapter
        assert dlm.for_rollout(True) is view, "one view per model, resynced in place"
        torch.testing.assert_close(view.logits(x), dlm.logits(x), rtol=1e-5, atol=1e-5)
    assert (before - view.logits(x)).abs().max() > 1e-4, "the step changed the merged weights"

    calls: list[str] = []
    original = type(next(m for m in dlm.core.modules() if hasattr(m, "get_delta_weight"))).get_delta_weight

    def counting(self, adapter):
        calls.append(adapter)
        return original(self, adapter)

    monkeypatch.setattr(type(next(m for m in dlm.core.modules() if hasattr(m, "get_delta_weight"))),
                        "get_delta_weight", counting)
    dlm.for_rollout(True)
    assert calls == [], "an unchanged adapter is not merged again"
    with torch.no_grad():
        params[0].add_(0.1)
    dlm.for_rollout(True)
    assert calls, "an in-place change of an adapter tensor (optimizer step, checkpoint load) triggers a resync"


def test_sampler_on_the_merged_copy_matches_the_adapter():
    dlm = _lora_llada()
    plain, merged = _run(dlm, _cfg("none")), _run(dlm, _cfg("none", merge_lora=True))
    assert torch.equal(plain.sequences, merged.sequences)
    torch.testing.assert_close(plain.step_logps, merged.step_logps, rtol=1e-5, atol=1e-5)
    assert dlm.model.training, "the sampler leaves the training model's mode alone"


def test_models_that_cannot_be_merged_roll_out_through_the_adapter(caplog):
    model, tok = random_model("tiny", seed=0, d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=128)
    full = DiffusionLM(model=model, mask_id=tok.mask_token_id, stop_ids=(tok.eos_token_id,), native=True)
    assert full.for_rollout(True) is full, "full fine-tuning: nothing to merge"
    dlm = _lora_llada()
    assert dlm.for_rollout(False) is dlm
    layer = next(m for m in dlm.core.modules() if hasattr(m, "get_delta_weight"))
    layer.use_dora = {name: True for name in layer.lora_A}
    assert "DoRA" in (merge_blocker(dlm.core) or "")
    with pytest.raises(ValueError, match="DoRA"):
        MergedLoRA(dlm.core)
    with caplog.at_level("INFO"):
        assert dlm.for_rollout(True) is dlm
    assert "not merged" in caplog.text and "DoRA" in caplog.text


def test_config_merge_flag_reaches_the_rollout_sampler_only_with_lora():
    assert load_config(None, ["use_peft=true"]).rollout_sampler().merge_lora is True
    assert load_config(None, ["use_peft=true", "merge_lora_rollout=false"]).rollout_sampler().merge_lora is False
    assert load_config(None, ["use_peft=false"]).rollout_sampler().merge_lora is False


def test_memory_plan_counts_the_merged_copy():
    from egspo.memory import ModelShape, estimate_memory, setting_from_args

    from .test_qlora import LLADA_8B_CONFIG

    shape = ModelShape.from_config(LLADA_8B_CONFIG)
    merged = setting_from_args(shape, load_config(None, ["use_peft=true"]), device_type="cuda")
    plain = setting_from_args(shape, load_config(None, ["use_peft=true", "merge_lora_rollout=false"]),
                              device_type="cuda")
    quant = setting_from_args(shape, load_config(None, ["use_peft=true", "load_in_4bit=true"]), device_type="cuda")
    assert merged.merged_lora and not plain.merged_lora and not quant.merged_lora
    copy = estimate_memory(shape, merged).static["merged_copy"]
    # LLaDA-8B's default targets: every block linear plus the LM head, bf16
    assert 13e9 < copy < 17e9
    assert "merged_copy" not in estimate_memory(shape, plain).static


# -- cache refresh ---------------------------------------------------------------------------------


def _dlm() -> DiffusionLM:
    model, tok = random_model("tiny", seed=0, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden_size=128)
    return DiffusionLM(model=model, mask_id=tok.mask_token_id, stop_ids=(tok.eos_token_id,), native=True)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_refresh_every_step_is_the_exact_rollout(cache):
    dlm = _dlm()
    exact, refreshed = _run(dlm, _cfg("none")), _run(dlm, _cfg(cache, cache_refresh=1))
    assert torch.equal(exact.sequences, refreshed.sequences)
    torch.testing.assert_close(exact.step_logps, refreshed.step_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exact.greedy, refreshed.greedy)


def test_refresh_makes_the_refreshed_steps_exact():
    """With refresh N, steps N, 2N, ... of each block run the full forward: their recorded log-probs are the
    exact ones of the state the rollout reached; the steps in between stay approximate."""
    dlm = _dlm()
    cfg = _cfg("dual", cache_refresh=2)  # 3 blocks of 4 steps: in-block steps 0 and 2 exact
    traj = _run(dlm, cfg)
    per_block = cfg.steps_per_block
    gaps = []
    for t in range(cfg.steps):
        steps = torch.full((traj.batch_size,), t)
        exact = full_forward_logps(dlm.model, traj, steps)
        gaps.append(float((traj.step_logps[:, t] - exact).abs().max()))
    refreshed = [g for t, g in enumerate(gaps) if (t % per_block) % 2 == 0]
    stale = [g for t, g in enumerate(gaps) if (t % per_block) % 2 == 1]
    assert max(refreshed) < 1e-4
    assert max(stale) > 1e-4, "the steps in between use the cache (so this check can fail)"


def test_refresh_settings_are_checked():
    assert load_config(None, ["rollout_cache=dual", "rollout_cache_refresh=3"]).rollout_sampler().cache_refresh == 3
    with pytest.raises(ConfigError, match="rollout_cache_refresh"):
        load_config(None, ["rollout_cache=dual", "rollout_cache_refresh=-1"])
    with pytest.warns(UserWarning, match="rollout_cache_refresh=2 has no effect"):
        load_config(None, ["rollout_cache_refresh=2"])
    with pytest.raises(ConfigError, match="cache_refresh"):
        SamplerConfig(cache_refresh=-2)
    assert dataclasses.replace(SamplerConfig(), cache_refresh=0).cache_refresh == 0


def test_sample_keeps_the_generator_stream_with_merging():
    """The merged view changes which module runs, not the random stream: a seeded rollout is reproducible."""
    dlm = _lora_llada()
    ids = _inputs()[:, :7]
    a = sample(dlm, ids, _cfg("dual", merge_lora=True), generator=torch.Generator().manual_seed(5))
    b = sample(dlm, ids, _cfg("dual", merge_lora=True), generator=torch.Generator().manual_seed(5))
    assert torch.equal(a.sequences, b.sequences)


def test_planner_keeps_the_merged_copy_only_where_it_fits():
    from .test_qlora import _plan

    roomy = _plan(80)
    assert roomy.merge_lora_rollout and not roomy.gradient_checkpointing
    assert "merged_copy" in roomy.estimate.static and any("copy ON" in r for r in roomy.reasons)
    # at 48 GB the copy still fits with checkpointing, which costs less time than rolling out through the adapter
    middle = _plan(48)
    assert middle.merge_lora_rollout and middle.gradient_checkpointing
    tight = _plan(24)
    assert not tight.merge_lora_rollout and "merged_copy" not in tight.estimate.static
    assert any("copy OFF" in r for r in tight.reasons)
    assert tight.estimate.needed <= 24 * 2**30


def test_invalidate_resyncs_a_change_the_version_counters_miss():
    """DeepSpeed updates parameters through its flat buffers; the trainer's invalidation after every optimizer
    step still brings the copy up to date."""
    dlm = _lora_llada()
    view = dlm.for_rollout(True)
    lora_b = next(p for name, p in dlm.model.named_parameters() if "lora_B" in name)
    with torch.no_grad():
        lora_b.data = lora_b.data + 0.5  # a new tensor behind the parameter: no in-place version bump
    x = _inputs()
    dlm.model.eval()
    with torch.no_grad():
        stale = view.logits(x)
        dlm.for_rollout(True)
        assert torch.equal(view.logits(x), stale), "the counters did not see the change (so this test can fail)"
        dlm.rollout_weights_changed()
        dlm.for_rollout(True)
        torch.testing.assert_close(view.logits(x), dlm.logits(x), rtol=1e-5, atol=1e-5)
