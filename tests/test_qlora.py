"""QLoRA (load_in_4bit / load_in_8bit) and the memory planner (max_memory_gb).

CPU tests: configuration, every refusal (before any weight is read), adapter-only saving, and the planner's
choices on the LLaDA-8B shape. Tests marked ``bnb`` need bitsandbytes and run its quantised layers on the CPU
(egspo itself refuses that; the tests bypass the CUDA check) to show the wiring: 4-bit loading, LoRA on
top, the adapter-disabled reference, the cached rollout and one trainer step. ``gpu`` tests need CUDA.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

from egspo.config import ConfigError, EGSPOConfig, ModelConfig, load_config
from egspo.memory import GB, MemoryBudgetError, ModelShape, estimate_memory, plan_memory, setting_from_args
from egspo.models import loading
from egspo.models.llada import LLaDAConfig
from egspo.models.loading import check_quantization, load_model, quantization_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import LLADA_8B  # noqa: E402

HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'egspo[qlora]')")
LLADA_8B_CONFIG = LLaDAConfig(**LLADA_8B).to_dict()
#: The paper's EGSPO-SA step: 6 rollouts, prompt 200, completion 256, block 32, T 128, K 8, LoRA r 128.
PAPER = {"num_generations": 6, "per_device_train_batch_size": 6, "max_prompt_length": 200,
         "max_completion_length": 256, "block_length": 32, "diffusion_steps": 128, "num_selected_steps": 8,
         "lora_r": 128}


def _quantised(**kwargs) -> ModelConfig:
    return ModelConfig(name_or_path="some/llada", load_in_4bit=True, **kwargs)


def _no_weights_read(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(loading, "_from_pretrained", fail)


# -- configuration --------------------------------------------------------------------------------


def test_defaults_are_nf4_double_quant_bf16_and_reach_the_loader():
    args = EGSPOConfig(load_in_4bit=True)
    assert (args.bnb_4bit_quant_type, args.bnb_4bit_use_double_quant, args.bnb_4bit_compute_dtype) == (
        "nf4", True, "bfloat16")
    assert args.max_memory_gb is None and not args.load_in_8bit
    quant = quantization_config(args.model_config())
    assert quant.load_in_4bit and not quant.load_in_8bit
    assert quant.bnb_4bit_quant_type == "nf4" and quant.bnb_4bit_use_double_quant
    assert quant.bnb_4bit_compute_dtype == torch.bfloat16
    fp4 = quantization_config(EGSPOConfig(load_in_4bit=True, bnb_4bit_quant_type="fp4",
                                          bnb_4bit_use_double_quant=False,
                                          bnb_4bit_compute_dtype="float16").model_config())
    assert fp4.bnb_4bit_quant_type == "fp4" and not fp4.bnb_4bit_use_double_quant
    assert fp4.bnb_4bit_compute_dtype == torch.float16
    assert quantization_config(EGSPOConfig(load_in_8bit=True).model_config()).load_in_8bit
    assert quantization_config(EGSPOConfig().model_config()) is None
    with pytest.raises(ConfigError, match="bnb_4bit_quant_type='nf8' is not one of"):
        load_config(None, ["bnb_4bit_quant_type=nf8"])


# -- refusals, before any weight is read ------------------------------------------------------------


def test_refuses_both_4bit_and_8bit(monkeypatch):
    _no_weights_read(monkeypatch)
    with pytest.raises(ConfigError, match="load_in_4bit and load_in_8bit are both true: choose one"):
        load_model(_quantised(load_in_8bit=True))


@pytest.mark.parametrize("field", ["load_in_4bit", "load_in_8bit"])
def test_refuses_full_fine_tuning_of_quantised_weights(monkeypatch, field):
    _no_weights_read(monkeypatch)
    with pytest.raises(ConfigError, match=f"{field}=true with use_peft=false: quantised weights cannot be trained"):
        load_model(ModelConfig(name_or_path="some/llada", lora=False, **{field: True}))


def test_refuses_without_cuda(monkeypatch):
    _no_weights_read(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="load_in_4bit=true needs a CUDA GPU .* no CUDA device is available"):
        load_model(_quantised())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(ConfigError, match="the model is placed on cpu"):
        check_quantization(_quantised(), device="cpu")


def test_refuses_without_bitsandbytes_and_names_the_extra(monkeypatch):
    _no_weights_read(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(ConfigError, match=r"needs bitsandbytes, which is not installed: pip install 'egspo\[qlora\]'"):
        load_model(_quantised(), device="cuda")


def test_refuses_a_model_built_in_memory():
    with pytest.raises(ConfigError, match="builtin:tiny is built in memory: write it to disk first"):
        check_quantization(ModelConfig(name_or_path="builtin:tiny", load_in_4bit=True))


def test_trainer_refuses_before_loading(monkeypatch, micro_model, tmp_path):
    """The trainer's checks (quantisation, compile, memory budget) all run before load_model."""
    from egspo.rl import trainer as trainer_module

    def fail(*args, **kwargs):
        raise AssertionError("load_model was called before the refusal")

    monkeypatch.setattr(trainer_module, "load_model", fail)
    rows = [{"prompt": "say 1"}] * 4

    def build(*overrides):
        cfg = load_config(None, [f"model_name_or_path={micro_model}", f"output_dir={tmp_path / 'run'}", "task=custom",
                                 "max_completion_length=8", "block_length=8", "diffusion_steps=4",
                                 "num_generations=4", "per_device_train_batch_size=4", "num_selected_steps=2",
                                 *overrides])
        return trainer_module.EGSPOTrainer(reward_funcs=["tests.reward_fns:count_sevens"], train_dataset=rows,
                                           args=cfg)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        build("load_in_4bit=true")
    with pytest.raises(ConfigError, match="use_peft=false"):
        build("load_in_8bit=true", "use_peft=false")
    monkeypatch.setattr(trainer_module, "check_quantization", lambda cfg, device=None: None)
    with pytest.raises(ConfigError, match="compile_rollout=true with load_in_4bit: torch.compile of bitsandbytes"):
        build("load_in_4bit=true", "compile_rollout=true")
    with pytest.raises(MemoryBudgetError, match="max_memory_gb=1e-05 is too small"):
        build("max_memory_gb=0.00001")
    with pytest.raises(ConfigError, match="max_memory_gb=-1.0 must be a number of GB > 0"):
        build("max_memory_gb=-1")


# -- saving ------------------------------------------------------------------------------------------


def test_lora_run_saves_the_adapter_only_and_names_its_base(micro_model, tmp_path, caplog):
    from egspo.rl.trainer import EGSPOTrainer

    cfg = load_config(None, [f"model_name_or_path={micro_model}", f"output_dir={tmp_path / 'run'}", "task=custom",
                             "max_completion_length=8", "block_length=8", "diffusion_steps=4", "num_generations=4",
                             "per_device_train_batch_size=4", "num_selected_steps=2", "lora_r=4", "lora_alpha=8"])
    trainer = EGSPOTrainer(reward_funcs=["tests.reward_fns:count_sevens"], train_dataset=[{"prompt": "say 1"}] * 4,
                           args=cfg)
    assert trainer.dlm.reference is None  # the reference is the adapter-disabled base, not a copy
    trainer.step(0)
    with caplog.at_level(logging.INFO, logger="egspo.rl.trainer"):
        out = trainer.save_model(tmp_path / "final")
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= names
    assert not names & {"model.safetensors", "pytorch_model.bin"}
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(micro_model)
    assert f"trained from `{micro_model}`" in (out / "README.md").read_text()
    assert any("Saved the LoRA adapter only" in r.message and str(micro_model) in r.message for r in caplog.records)
    adapter_bytes = (out / "adapter_model.safetensors").stat().st_size
    model_bytes = sum(p.stat().st_size for p in Path(micro_model).glob("*.safetensors"))
    assert adapter_bytes < model_bytes


# -- the planner ---------------------------------------------------------------------------------------


def _plan(budget: float, **extra):
    return plan_memory(LLADA_8B_CONFIG, EGSPOConfig(**{**PAPER, **extra}, max_memory_gb=budget), device_type="cuda")


def test_planner_bf16_at_24gb_turns_checkpointing_on():
    plan = _plan(24)
    assert plan.gradient_checkpointing
    assert plan.estimate.needed <= 24 * GB
    assert plan.estimate.static["weights"] == 2 * ModelShape.from_config(LLADA_8B_CONFIG).params
    assert plan.update_rows == 6
    assert "gradient checkpointing ON: without it" in plan.reasons[0]
    assert any("does not split rows" in r for r in plan.reasons)
    assert any("GREEDY_CHUNK_ELEMENTS" in r for r in plan.reasons)


def test_planner_4bit_at_16gb_fits_with_checkpointing():
    plan = _plan(16, load_in_4bit=True)
    assert plan.gradient_checkpointing and plan.estimate.needed <= 16 * GB
    weights = plan.estimate.static["weights"] / GB
    assert 5.0 < weights < 5.6  # 7.0B linear weights at ~0.52 byte + bf16 embedding and head (2 x 0.52B)
    without_double = _plan(16, load_in_4bit=True, bnb_4bit_use_double_quant=False)
    assert without_double.estimate.static["weights"] > plan.estimate.static["weights"]
    assert plan.estimate.peak < _plan(24).estimate.peak - 8 * GB


def test_planner_leaves_checkpointing_off_when_the_step_fits():
    plan = _plan(48, merge_lora_rollout=False)
    assert not plan.gradient_checkpointing and "OFF" in plan.reasons[0]
    kept = _plan(48, gradient_checkpointing=True)
    assert kept.gradient_checkpointing and "is set" in kept.reasons[0]


def test_planner_refuses_4gb_and_says_what_fits():
    with pytest.raises(MemoryBudgetError) as exc:
        _plan(4, load_in_4bit=True)
    message = str(exc.value)
    assert "max_memory_gb=4 is too small for one training step" in message
    assert re.search(r"needs max_memory_gb >= 1[34]\.\d", message), message
    assert "the base weights alone take 5.3 GB, 4-bit ones included" in message
    with pytest.raises(MemoryBudgetError, match=r"one of these fits: .*lora_r=\d+.*load_in_4bit=true \(about"):
        _plan(20)
    with pytest.raises(MemoryBudgetError, match=r"per_device_train_batch_size=\d+"):
        _plan(24, per_device_train_batch_size=48, num_generations=8, lora_r=8)


def test_estimate_matches_the_h100_measurements_of_docs_benchmarks():
    """docs/benchmarks.md (benchmarks/train_step.py: LoRA r 128, dropout 0.05, no accelerate): peak memory above
    the weights and adapter, 25.57 GB for 6 rollouts and 18.31 GB for 48 with gradient checkpointing."""
    shape = ModelShape.from_config(LLADA_8B_CONFIG)
    for rows, ckpt, measured in ((6, False, 25.57), (48, True, 18.31)):
        args = EGSPOConfig(**{**PAPER, "per_device_train_batch_size": rows, "num_generations": rows},
                           lora_dropout=0.05, gradient_checkpointing=ckpt,
                           merge_lora_rollout=False)  # measured before the merged rollout copy existed
        estimate = estimate_memory(shape, setting_from_args(shape, args, device_type="cuda"))
        extra = (estimate.peak - estimate.static["weights"] - estimate.static["adapter"]) / GB
        assert abs(extra - measured) / measured < 0.05, (rows, extra, measured)


def test_planner_covers_dream_and_diffu_grpo_and_refuses_other_models():
    dream = {"model_type": "Dream", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
             "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064}
    plan = plan_memory(dream, EGSPOConfig(**PAPER, max_memory_gb=16, load_in_4bit=True), device_type="cuda")
    assert plan.gradient_checkpointing
    shape = ModelShape.from_config(dream)
    assert 7.0e9 < shape.params < 8.0e9  # Dream-7B
    grpo = plan_memory(LLADA_8B_CONFIG, EGSPOConfig(**PAPER, algorithm="diffu_grpo", max_memory_gb=80),
                       device_type="cuda")
    assert grpo.estimate.update["logits"] > 1 * GB  # the whole completion's logits
    with pytest.raises(ConfigError, match="model_type 'bert' is neither"):
        plan_memory({"model_type": "bert"}, EGSPOConfig(max_memory_gb=8))


def test_trainer_applies_the_plan(micro_model, tmp_path):
    from egspo.rl.trainer import EGSPOTrainer

    def build(budget):
        cfg = load_config(None, [f"model_name_or_path={micro_model}", f"output_dir={tmp_path / 'run'}",
                                 "task=custom", "max_completion_length=8", "block_length=8", "diffusion_steps=4",
                                 "num_generations=4", "per_device_train_batch_size=4", "num_selected_steps=2",
                                 f"max_memory_gb={budget}"])
        return EGSPOTrainer(reward_funcs=["tests.reward_fns:count_sevens"], train_dataset=[{"prompt": "say 1"}] * 4,
                            args=cfg)

    roomy = build(8)
    assert not roomy.memory_plan.gradient_checkpointing
    assert not any(getattr(m, "gradient_checkpointing", False) for m in roomy.dlm.core.modules())
    # a budget between the two estimates: only checkpointing fits, and the model gets it
    shape = ModelShape.from_config(loading.read_model_config(str(micro_model)))
    setting = setting_from_args(shape, roomy.args, device_type="cpu")
    plain, ckpt = (estimate_memory(shape, dataclasses.replace(setting, gradient_checkpointing=on)).needed
                   for on in (False, True))
    assert roomy.memory_plan.estimate.needed == plain > ckpt
    tight = build((plain + ckpt) / 2 / GB)
    assert tight.memory_plan.gradient_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in tight.dlm.core.modules())


# -- bitsandbytes on the CPU: the wiring ----------------------------------------------------------------


@pytest.fixture
def bnb_on_cpu(monkeypatch):
    """egspo's CUDA check lifted (its other checks kept) and quantised models placed on the CPU."""
    from egspo.rl import trainer as trainer_module

    real = loading.check_quantization

    def without_cuda_check(cfg, device=None):
        with mock.patch.object(torch.cuda, "is_available", return_value=True):
            real(cfg, "cuda")

    monkeypatch.setattr(loading, "check_quantization", without_cuda_check)
    monkeypatch.setattr(trainer_module, "check_quantization", without_cuda_check)
    monkeypatch.setattr(loading, "_cuda_device", lambda device: torch.device("cpu"))


@needs_bnb
def test_4bit_base_with_lora_reference_and_cached_rollout(bnb_on_cpu, micro_model, monkeypatch):
    import bitsandbytes as bnb

    from egspo.config import SamplerConfig
    from egspo.models import lora
    from egspo.sampling import sample

    def no_copy(*args, **kwargs):
        raise AssertionError("the base was copied")

    monkeypatch.setattr(lora, "make_reference", no_copy)
    cfg = ModelConfig(name_or_path=str(micro_model), load_in_4bit=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    dlm, _ = load_model(cfg)
    core = dlm.core
    assert isinstance(core.model.transformer.blocks[0].q_proj, bnb.nn.Linear4bit)
    assert type(core.get_output_embeddings()) is torch.nn.Linear  # the LM head is never quantised
    ids = torch.randint(4, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    base_logits = dlm.logits(ids)
    dlm = lora.prepare_for_training(dlm, cfg, need_reference=True)
    assert dlm.reference is None
    assert {n for n, p in dlm.model.named_parameters() if p.requires_grad} == {
        n for n, _ in dlm.model.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, param in dlm.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.5)  # a non-zero adapter, so that disabling it matters
        with dlm.reference_model() as ref:
            torch.testing.assert_close(dlm.logits(ids, model=ref), base_logits)
        assert not torch.allclose(dlm.logits(ids), base_logits)
    sampler = {"gen_length": 8, "block_length": 4, "steps": 4, "temperature": 0.0}
    exact = sample(dlm, ids, SamplerConfig(**sampler), generator=torch.Generator().manual_seed(0))
    for mode in ("prefix", "dual"):
        cached = sample(dlm, ids, SamplerConfig(**sampler, cache=mode), generator=torch.Generator().manual_seed(0))
        # the first step runs the exact forward (and keeps its cache); the rollout completes
        torch.testing.assert_close(cached.step_logps[:, 0], exact.step_logps[:, 0])
        assert not (cached.completions == dlm.mask_id).any()


@needs_bnb
def test_4bit_trainer_step_trains_the_adapter_and_saves_it_alone(bnb_on_cpu, micro_model, tmp_path):
    from egspo.rl.trainer import EGSPOTrainer

    cfg = load_config(None, [f"model_name_or_path={micro_model}", "load_in_4bit=true", f"output_dir={tmp_path / 'run'}",
                             "task=custom", "max_completion_length=8", "block_length=8", "diffusion_steps=4",
                             "num_generations=4", "per_device_train_batch_size=4", "num_selected_steps=2",
                             "lora_r=4", "lora_alpha=8", "learning_rate=0.01", "rollout_cache=dual",
                             "gradient_checkpointing=true", "max_memory_gb=2"])
    trainer = EGSPOTrainer(reward_funcs=["tests.reward_fns:count_sevens"], train_dataset=[{"prompt": "say 1"}] * 4,
                           args=cfg)
    assert trainer.dlm.reference is None and trainer.memory_plan.gradient_checkpointing
    assert any(getattr(m, "gradient_checkpointing", False) for m in trainer.dlm.core.modules())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    metrics = trainer.step(0)
    assert "approx/old_logp_gap" in metrics and metrics["kl"] >= 0
    changed = {n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    out = trainer.save_model(tmp_path / "final")
    names = {p.name for p in out.iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(micro_model)


@pytest.mark.gpu
@needs_bnb
def test_4bit_training_step_on_cuda(micro_model, tmp_path):
    from egspo.rl.trainer import EGSPOTrainer

    cfg = load_config(None, [f"model_name_or_path={micro_model}", "load_in_4bit=true", f"output_dir={tmp_path / 'run'}",
                             "task=custom", "max_completion_length=8", "block_length=8", "diffusion_steps=4",
                             "num_generations=4", "per_device_train_batch_size=4", "num_selected_steps=2",
                             "lora_r=4", "lora_alpha=8", "max_memory_gb=4"])
    trainer = EGSPOTrainer(reward_funcs=["tests.reward_fns:count_sevens"], train_dataset=[{"prompt": "say 1"}] * 4,
                           args=cfg)
    assert trainer.dlm.core.is_loaded_in_4bit and trainer.dlm.reference is None
    metrics = trainer.step(0)
    assert metrics["grad_norm"] > 0
