"""Every shipped YAML recipe loads, validates at its launch size, and keeps the paper's settings
(docs/algorithm.md#reference-settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from egspo.config import EGSPOConfig, load_config
from egspo.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_DIR = ROOT / "configs" / "accelerate"
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if ACCELERATE_DIR not in p.parents)
PACKAGED = sorted((ROOT / "src" / "egspo" / "configs").glob("*.yaml"))
#: Recipes written for 8 GPUs (configs/llada, configs/dream); the rest run in one process.
PAPER = [p for p in RECIPES if p.parent.name in ("llada", "dream")]


def _id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _updates(cfg: EGSPOConfig) -> int:
    """Micro-batches per rollout batch (the trainer requires a multiple of the accumulation)."""
    if cfg.algorithm == "diffu_grpo":
        return cfg.num_iterations * cfg.gradient_accumulation_steps
    return cfg.num_selected_steps // cfg.steps_per_microbatch


def test_recipes_exist():
    names = {_id(p) for p in RECIPES}
    for model, tasks in {"llada": ("gsm8k", "math500", "countdown", "sudoku", "humaneval", "mbpp"),
                         "dream": ("gsm8k", "sudoku")}.items():
        assert {f"configs/{model}/{t}_egspo_sa.yaml" for t in tasks} <= names
    assert {f"configs/llada/{t}_diffu_grpo.yaml" for t in ("gsm8k", "countdown", "sudoku")} <= names
    assert {"configs/llada/sudoku_egspo_random.yaml", "configs/llada/sudoku_egspo_uniform.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES + PACKAGED, ids=_id)
def test_recipe_loads_in_one_process(path):
    cfg = load_config(path)  # construction validates everything but the launch size
    assert _updates(cfg) % cfg.gradient_accumulation_steps == 0 or cfg.step_selection == "adaptive"
    if path not in PAPER:
        cfg.validate(num_processes=1)
    if cfg.train_file is None:  # generator tasks: the options are the generator's
        rows = get_task(cfg.task).load(None, "train", 4, cfg.seed, **cfg.task_options)
        assert len(rows) == 4


@pytest.mark.parametrize("path", PAPER, ids=_id)
def test_paper_recipe_matches_spec_on_8_gpus(path):
    cfg = load_config(path)
    cfg.validate(num_processes=8)
    assert cfg.per_device_train_batch_size * 8 == 48
    m, s, t = cfg.model_config(), cfg.rollout_sampler(), cfg
    assert (m.lora, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_target_modules) == (True, 128, 64, 0.05, None)
    assert m.name_or_path == ("GSAI-ML/LLaDA-8B-Instruct" if path.parent.name == "llada"
                              else "Dream-org/Dream-v0-Instruct-7B")
    assert (s.gen_length, s.block_length, s.steps, s.temperature) == (256, 32, 128, 0.9)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.max_grad_norm) == (0.9, 0.99, 0.1, 0.2)
    assert (t.gradient_accumulation_steps, t.bf16, t.save_steps, t.lr_scheduler_type) == (2, True, 200, "constant")
    assert cfg.beta == 0.04 and cfg.kl_estimator == "k3"
    assert cfg.eval_completion_lengths == [128, 256, 512]
    assert cfg.eval_temperature == 0.0 and cfg.eval_diffusion_steps_ratio == 0.5
    if cfg.task not in ("kodcode", "mbpp"):  # code prompts are longer (see the recipes)
        assert cfg.max_prompt_length == 200
    if cfg.algorithm == "diffu_grpo":
        assert t.learning_rate == 3e-6 and cfg.num_generations == 6
        assert cfg.epsilon_high == 0.5 and cfg.epsilon == 0.5
        assert cfg.num_iterations == (12 if cfg.task in ("gsm8k", "math500") else 8)
    else:
        assert cfg.algorithm == "egspo_sa" and t.learning_rate == 3e-5 and cfg.num_generations == 8
        assert (cfg.num_selected_steps, cfg.stepwise_lambda, cfg.normalize_returns) == (8, 0.5, True)
        assert (cfg.epsilon, cfg.epsilon_high) == (0.2, 0.5)
        expected = path.stem.rsplit("_", 1)[-1] if path.stem.startswith("sudoku_egspo_") else "sa"
        assert cfg.step_selection == {"sa": "high_entropy", "random": "random", "uniform": "uniform"}[expected]


@pytest.mark.parametrize("name", ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"])
def test_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    cfg = load_config_from_file(str(ACCELERATE_DIR / f"{name}.yaml"))
    assert (cfg.num_processes, cfg.num_machines, cfg.mixed_precision) == (8, 1, "bf16")
    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP}.get(name, DistributedType.DEEPSPEED)
    assert cfg.distributed_type == expected
    if name == "fsdp":
        assert cfg.fsdp_config["fsdp_version"] == 2 and cfg.fsdp_config["fsdp_cpu_ram_efficient_loading"] is False
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == "LLaDALlamaBlock"
    if name.startswith("deepspeed"):
        assert cfg.deepspeed_config["zero_stage"] == int(name[-1])
        assert cfg.deepspeed_config["gradient_clipping"] == 0.2
        assert cfg.deepspeed_config["zero3_init_flag"] is False
