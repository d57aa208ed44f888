"""Sharded training: FSDP and DeepSpeed on 2 CPU processes (gloo), and their plumbing alone.

The runs use the settings of ``configs/accelerate/{fsdp,deepspeed_zero2,deepspeed_zero3}.yaml`` (turned
into environment variables by accelerate's own launcher code) and ``tests/sharded_driver.py``, which
switches accelerate to FSDP / DeepSpeed on CPU processes (accelerate applies them only on GPUs); see
docs/distributed.md. The DeepSpeed runs need the ``deepspeed`` package (skipped without it); its
plumbing is also checked without it, on accelerate's real ``DeepSpeedPlugin`` and a stand-in engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_distributed import ROOT, launch, needs_gloo

FSDP_CONFIG = ROOT / "configs" / "accelerate" / "fsdp.yaml"


def fsdp_environment() -> dict[str, str]:
    """The FSDP variables that ``accelerate launch --config_file configs/accelerate/fsdp.yaml`` exports."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
        prepare_multi_gpu_env,
    )

    args = launch_command_parser().parse_args(["--config_file", str(FSDP_CONFIG), "--num_processes", "2", "x.py"])
    args, _, _ = _validate_launch_command(args)
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if k == "ACCELERATE_USE_FSDP" or k.startswith("FSDP_")}


def deepspeed_environment(config: Path) -> dict[str, str]:
    """The DeepSpeed variables that ``accelerate launch --config_file CONFIG`` exports."""
    from accelerate.commands.launch import (
        _validate_launch_command,
        launch_command_parser,
    )
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", "2", "x.py"])
    args, defaults, _ = _validate_launch_command(args)
    # what accelerate's launch_command adds before building the environment
    args.deepspeed_fields_from_accelerate_config = ",".join([*defaults.deepspeed_config, "mixed_precision"])
    _, env = prepare_deepspeed_cmd_env(args)
    return {**{k: v for k, v in env.items() if k.startswith(("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_",
                                                              "ACCELERATE_GRADIENT_CLIPPING"))},
            "DS_ACCELERATOR": "cpu"}


def _fsdp(*args: str) -> None:
    env = fsdp_environment()
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    launch(2, ["tests/sharded_driver.py", *args], env=env)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


def _config(tmp_path: Path, micro_model: Path, data: Path, lora: bool) -> Path:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model_name_or_path": str(micro_model), "use_peft": lora, "lora_r": 4, "lora_alpha": 8,
        "max_completion_length": 8, "block_length": 8, "diffusion_steps": 4, "temperature": 1.0,
        "algorithm": "egspo_sa", "num_generations": 8, "num_selected_steps": 2,
        "task": "custom", "train_file": str(data), "reward_funcs": ["tests.reward_fns:count_sevens"],
        "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "save_steps": 0,
        "learning_rate": 0.01 if lora else 0.001, "max_grad_norm": 1.0,
    }))
    return config


@pytest.fixture(scope="module")
def ddp_lora_run(micro_model, prompts_file, tmp_path_factory) -> Path:
    """The plain DDP run (2 processes) of ``_config(lora=True)`` that the DeepSpeed stages are compared with."""
    tmp = tmp_path_factory.mktemp("ddp_lora")
    launch(2, ["-m", "egspo.cli", "train", "--config", str(_config(tmp, micro_model, prompts_file, lora=True)),
               f"output_dir={tmp / 'ddp'}"])
    return tmp / "ddp"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], **tol: float) -> None:
    assert a.keys() == b.keys() and a
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], msg=key, **tol)


@pytest.mark.slow
@needs_gloo
def test_fsdp_lora_trains_saves_a_whole_adapter_and_resumes_exactly(micro_model, prompts_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    import egspo  # noqa: F401  (registers the native models with the Auto classes)

    config = _config(tmp_path, micro_model, prompts_file, lora=True)
    run, dump = tmp_path / "run", tmp_path / "dump"
    _fsdp("--dump", str(dump), "train", "--config", str(config), f"output_dir={run}")
    assert [m["step"] for m in _metrics(run)] == [1, 2]

    # both ranks hold the same (gathered) model, and every adapter weight trained, the LM head's too
    rank0, rank1 = load_file(str(dump / "rank0.safetensors")), load_file(str(dump / "rank1.safetensors"))
    _assert_same(rank0, rank1, rtol=0, atol=0)
    lora_b = {k: v for k, v in rank0.items() if "lora_B" in k}
    assert len(lora_b) == 2 * 7 + 1 and all(v.abs().sum() > 0 for v in lora_b.values()), "a LoRA weight did not train"

    # the checkpoint is whole: the adapter loads in one process and equals the trained weights
    ckpt = run / "checkpoint-2"
    trainable = load_file(str(ckpt / "trainable.safetensors"))
    assert trainable.keys() == {k for k in rank0 if "lora_" in k}
    _assert_same(trainable, {k: rank0[k] for k in trainable}, rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(micro_model), ckpt / "adapter")
    loaded = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
              for k, v in load_file(str(ckpt / "adapter" / "adapter_model.safetensors")).items()}
    _assert_same(loaded, trainable, rtol=0, atol=0)
    assert all(torch.equal(p, trainable[n]) for n, p in peft_model.named_parameters() if n in trainable)
    optimizer = torch.load(ckpt / "optimizer.pt", weights_only=False)
    assert set(optimizer["state"]) == set(trainable)
    assert all(optimizer["state"][n]["exp_avg"].shape == trainable[n].shape for n in trainable), "a sharded state"

    # resume to step 3 = 3 steps straight
    _fsdp("train", "--config", str(config), f"output_dir={run}", "max_steps=3", "--resume")
    straight = tmp_path / "straight"
    _fsdp("train", "--config", str(config), f"output_dir={straight}", "max_steps=3")
    resumed, uninterrupted = _metrics(run), _metrics(straight)
    assert [m["step"] for m in resumed] == [1, 2, 3]
    for key in ("reward/mean", "loss", "kl", "grad_norm"):
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in uninterrupted], rel=1e-4, abs=1e-7), key
    _assert_same(load_file(str(run / "checkpoint-3" / "trainable.safetensors")),
                 load_file(str(straight / "checkpoint-3" / "trainable.safetensors")), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_gloo
def test_fsdp_full_fine_tuning_matches_ddp_and_saves_a_whole_model(micro_model, prompts_file, tmp_path):
    from transformers import AutoModel

    import egspo  # noqa: F401

    config = _config(tmp_path, micro_model, prompts_file, lora=False)  # with the KL reference copy (beta > 0)
    fsdp_run, ddp_run = tmp_path / "fsdp", tmp_path / "ddp"
    _fsdp("train", "--config", str(config), f"output_dir={fsdp_run}")
    launch(2, ["-m", "egspo.cli", "train", "--config", str(config), f"output_dir={ddp_run}"])

    # the same rollouts, losses and (sharded vs. replicated) gradient norms, and the same weights
    fsdp_metrics, ddp_metrics = _metrics(fsdp_run), _metrics(ddp_run)
    for key in ("reward/mean", "loss", "kl", "grad_norm"):
        assert [m[key] for m in fsdp_metrics] == pytest.approx([m[key] for m in ddp_metrics], rel=1e-4, abs=1e-7), key
    fsdp_weights = load_file(str(fsdp_run / "checkpoint-2" / "trainable.safetensors"))
    _assert_same(fsdp_weights, load_file(str(ddp_run / "checkpoint-2" / "trainable.safetensors")), rtol=1e-4, atol=1e-6)

    # a complete model that loads in one process, trained away from the start
    model = AutoModel.from_pretrained(fsdp_run / "checkpoint-2" / "model")
    base = AutoModel.from_pretrained(micro_model)
    state, start = model.state_dict(), base.state_dict()
    assert state.keys() == start.keys()
    for name, value in state.items():
        torch.testing.assert_close(value, fsdp_weights[name], rtol=0, atol=0)
        assert not torch.equal(value, start[name]), f"{name} did not train"


@pytest.mark.slow
@needs_gloo
def test_fsdp_sft_runs_and_saves_an_adapter(micro_model, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": str(i) * 3}) + "\n" for i in range(16)))
    config = _config(tmp_path, micro_model, data, lora=True)
    run = tmp_path / "sft"
    _fsdp("sft", "--config", str(config), f"output_dir={run}")
    losses = [m["loss"] for m in _metrics(run)]
    assert len(losses) == 2 and losses[1] < losses[0]
    trainable = load_file(str(run / "checkpoint-2" / "trainable.safetensors"))
    assert len(trainable) == 2 * (2 * 7 + 1)
    assert (run / "checkpoint-2" / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.slow
@needs_gloo
@pytest.mark.skipif(not _has_deepspeed(), reason="needs the deepspeed package")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_lora_trains_like_ddp_and_resumes_exactly(micro_model, prompts_file, ddp_lora_run, tmp_path, stage):
    config = _config(tmp_path, micro_model, prompts_file, lora=True)
    env = deepspeed_environment(ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}.yaml")
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == str(stage)

    def deepspeed(*args: str) -> None:
        launch(2, ["tests/sharded_driver.py", *args], env=env, timeout=180)

    run, straight, ddp = tmp_path / "run", tmp_path / "straight", ddp_lora_run
    deepspeed("train", "--config", str(config), f"output_dir={run}")
    ckpt = run / "checkpoint-2"
    assert (ckpt / "deepspeed" / "state").is_dir() and (ckpt / "adapter" / "adapter_model.safetensors").exists()
    for key in ("reward/mean", "loss", "kl", "grad_norm"):
        expected = [m[key] for m in _metrics(ddp)]
        assert [m[key] for m in _metrics(run)] == pytest.approx(expected, rel=1e-4, abs=1e-6), key
    _assert_same(load_file(str(ckpt / "trainable.safetensors")),
                 load_file(str(ddp / "checkpoint-2" / "trainable.safetensors")), rtol=1e-4, atol=1e-4)  # steps: 1e-2

    deepspeed("train", "--config", str(config), f"output_dir={run}", "max_steps=3", "--resume")
    deepspeed("train", "--config", str(config), f"output_dir={straight}", "max_steps=3")
    for key in ("reward/mean", "loss", "kl", "grad_norm"):
        assert [m[key] for m in _metrics(run)] == pytest.approx([m[key] for m in _metrics(straight)], rel=1e-4,
                                                                abs=1e-7), key
    _assert_same(load_file(str(run / "checkpoint-3" / "trainable.safetensors")),
                 load_file(str(straight / "checkpoint-3" / "trainable.safetensors")), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@needs_gloo
@pytest.mark.skipif(not _has_deepspeed(), reason="needs the deepspeed package")
def test_deepspeed_zero3_full_fine_tuning_with_kl_matches_ddp_and_keeps_the_initial_reference(
        micro_model, prompts_file, tmp_path):
    """ZeRO-3 partitions the model at load (accelerate hands its config to transformers), so the KL
    reference is copied from gathered weights and gets its own inference-only ZeRO-3 engine."""
    from transformers import AutoModel

    import egspo  # noqa: F401
    from egspo.config import ModelConfig
    from egspo.models.loading import load_model

    config = _config(tmp_path, micro_model, prompts_file, lora=False)  # rl.beta = 0.04: the reference runs
    env = deepspeed_environment(ROOT / "configs" / "accelerate" / "deepspeed_zero3.yaml")
    assert env["ACCELERATE_DEEPSPEED_ZERO_STAGE"] == "3"
    run, ddp, dump = tmp_path / "zero3", tmp_path / "ddp", tmp_path / "reference"
    launch(2, ["tests/sharded_driver.py", "--dump-reference", str(dump), "train", "--config", str(config),
               f"output_dir={run}"], env=env, timeout=180)
    launch(2, ["-m", "egspo.cli", "train", "--config", str(config), f"output_dir={ddp}"])

    # the same rollouts, losses, KL (the reference's log-probs enter it) and weights as DDP's plain copy
    zero3_metrics, ddp_metrics = _metrics(run), _metrics(ddp)
    assert [m["step"] for m in zero3_metrics] == [1, 2] and zero3_metrics[-1]["kl"] > 0
    for key in ("reward/mean", "loss", "kl", "grad_norm"):
        assert [m[key] for m in zero3_metrics] == pytest.approx([m[key] for m in ddp_metrics], rel=1e-4,
                                                                abs=1e-6), key
    weights = load_file(str(run / "checkpoint-2" / "trainable.safetensors"))
    _assert_same(weights, load_file(str(ddp / "checkpoint-2" / "trainable.safetensors")), rtol=1e-4, atol=1e-4)
    start = AutoModel.from_pretrained(micro_model).state_dict()
    assert all(not torch.equal(weights[name], value) for name, value in start.items()), "a weight did not train"

    # after training, the reference on both ranks is still the initial model: weights and log-probs
    initial, _ = load_model(ModelConfig(name_or_path=str(micro_model)), device="cpu")
    for rank in (0, 1):
        dumped = load_file(str(dump / f"rank{rank}.safetensors"))
        assert dumped["sharded"].item(), "the reference is not a ZeRO-3 engine"
        _assert_same({k.removeprefix("weight."): v for k, v in dumped.items() if k.startswith("weight.")},
                     initial.model.state_dict(), rtol=0, atol=0)
        with torch.no_grad():
            expected = initial.logits(dumped["input_ids"]).float()
        torch.testing.assert_close(dumped["logits"].log_softmax(-1), expected.log_softmax(-1), rtol=1e-5, atol=1e-5)


# -- the sampler under sharding (one process, sharding simulated) ------------------------------------


def test_sharded_sampler_runs_the_head_in_forward_and_keeps_forwards_in_step(monkeypatch):
    """Under FSDP every forward is a collective: a process whose rows have all ended must still run the
    same forwards, and the head must run inside the wrapped forward. Results stay the same."""
    from egspo.config import SamplerConfig
    from egspo.models.adapter import DiffusionLM
    from egspo.models.tiny import random_model
    from egspo.sampling import sample

    model, tokenizer = random_model(seed=0, n_layers=2, d_model=64, n_heads=2, mlp_hidden_size=128)
    eos = tokenizer.eos_token_id
    dlm = DiffusionLM(model=model, mask_id=tokenizer.mask_token_id, stop_ids=(eos, 0), native=True)
    # a huge end-token bias: every row ends in the first block, so the second block has no active row
    with torch.no_grad():
        dlm.core.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.config.embedding_size))
        dlm.core.get_output_embeddings().bias[eos] = 50.0
    calls: list[str] = []
    original = type(model).forward

    def counting(self, *args, **kwargs):
        calls.append("head" if kwargs.get("head_inputs") is not None else "blocks")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counting)
    cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, stop_at_eos=True)
    prompts = torch.randint(5, 40, (3, 4), generator=torch.Generator().manual_seed(0))

    plain = sample(dlm, prompts, cfg, generator=torch.Generator().manual_seed(1))
    plain_calls = list(calls)
    assert plain.forced.any() and "head" not in plain_calls and len(plain_calls) == 4  # block 2 skipped
    calls.clear()
    monkeypatch.setattr(DiffusionLM, "sharded", property(lambda self: True))
    sharded = sample(dlm, prompts, cfg, generator=torch.Generator().manual_seed(1))
    assert calls.count("blocks") == cfg.steps, "every step runs the model, even with no active row"
    # inside the forward: the block's head, plus one greedy chunk over the later block during block 1
    assert calls.count("head") == 4 * 2 + 4 * 1
    for field in ("sequences", "step_of_position", "position_logps", "step_logps", "step_entropy", "greedy", "forced"):
        torch.testing.assert_close(getattr(sharded, field), getattr(plain, field), msg=field)


def test_sharded_idle_steps_leave_the_global_rng_alone(monkeypatch):
    """The idle steps of a process whose rows have all ended sample on scratch copies: they must not draw
    from the global RNG either (the caller's generator is the sampler's only randomness)."""
    from egspo.config import SamplerConfig
    from egspo.models.adapter import DiffusionLM
    from egspo.models.tiny import random_model
    from egspo.sampling import sample

    model, tokenizer = random_model(seed=0, n_layers=2, d_model=64, n_heads=2, mlp_hidden_size=128)
    eos = tokenizer.eos_token_id
    dlm = DiffusionLM(model=model, mask_id=tokenizer.mask_token_id, stop_ids=(eos, 0), native=True)
    with torch.no_grad():  # every row ends in the first block: the second block is all idle steps
        dlm.core.get_output_embeddings().bias = torch.nn.Parameter(torch.zeros(model.config.embedding_size))
        dlm.core.get_output_embeddings().bias[eos] = 50.0
    monkeypatch.setattr(DiffusionLM, "sharded", property(lambda self: True))
    prompts = torch.randint(5, 40, (3, 4), generator=torch.Generator().manual_seed(0))
    for remasking in ("low_confidence", "random"):
        cfg = SamplerConfig(gen_length=16, block_length=8, steps=8, temperature=1.0, stop_at_eos=True,
                            remasking=remasking)
        state = torch.random.get_rng_state()
        traj = sample(dlm, prompts, cfg, generator=torch.Generator().manual_seed(1))
        assert traj.forced[:, 4:].all(), "the second block ran idle steps"
        assert torch.equal(state, torch.random.get_rng_state()), remasking


# -- DeepSpeed, without DeepSpeed ----------------------------------------------------------------------


def test_deepspeed_plugin_gets_the_micro_batch_and_the_clipping(caplog):
    from accelerate.utils import DeepSpeedPlugin

    from egspo.config import EGSPOConfig
    from egspo.run_setup import configure_deepspeed

    plugin = DeepSpeedPlugin(zero_stage=2, gradient_clipping=0.2)  # what configs/accelerate/deepspeed_zero2.yaml sets
    assert plugin.is_auto("train_micro_batch_size_per_gpu")
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))
    configure_deepspeed(accelerator, EGSPOConfig(per_device_train_batch_size=6, max_grad_norm=0.2))
    assert plugin.deepspeed_config["train_micro_batch_size_per_gpu"] == 6
    assert not plugin.is_auto("train_micro_batch_size_per_gpu") and plugin.deepspeed_config["gradient_clipping"] == 0.2
    configure_deepspeed(accelerator, EGSPOConfig(per_device_train_batch_size=6, max_grad_norm=1.0))
    assert plugin.deepspeed_config["gradient_clipping"] == 1.0 and "replaced by max_grad_norm" in caplog.text
    auto = DeepSpeedPlugin(zero_stage=3)  # "auto" clipping: accelerate would fill in 1.0
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=auto)), EGSPOConfig(max_grad_norm=0.2))
    assert auto.deepspeed_config["gradient_clipping"] == 0.2
    configure_deepspeed(SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None)), EGSPOConfig())  # DDP: no-op


def test_the_reference_gets_its_own_engine_only_under_zero3(monkeypatch):
    import sys

    from accelerate.utils import DeepSpeedPlugin

    from egspo.run_setup import prepare_reference

    calls = []

    def initialize(model, config):
        calls.append(config)
        return SimpleNamespace(eval=lambda: calls.append("eval"), module=model), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", SimpleNamespace(initialize=initialize))

    def accelerator(stage: int | None) -> SimpleNamespace:
        plugin = None if stage is None else DeepSpeedPlugin(zero_stage=stage)
        if plugin is not None:
            plugin.deepspeed_config["optimizer"] = {"type": "AdamW"}
        return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin))

    reference = torch.nn.Linear(2, 2)
    assert prepare_reference(accelerator(None), reference) is reference  # DDP / FSDP: the copy as it is
    assert prepare_reference(accelerator(2), reference) is reference
    assert prepare_reference(accelerator(3), None) is None  # LoRA or rl.beta = 0: no copy
    assert not calls
    zero3 = accelerator(3)
    engine = prepare_reference(zero3, reference)
    assert engine.module is reference and calls[-1] == "eval"
    config = calls[0]
    assert config["zero_optimization"]["stage"] == 3 and "optimizer" not in config, "inference only"
    assert "optimizer" in zero3.state.deepspeed_plugin.deepspeed_config, "the policy's config is left alone"


def test_clip_gradients_only_reads_the_norm_under_deepspeed():
    from egspo.run_setup import clip_gradients

    seen = {}
    model = torch.nn.Linear(2, 2)

    def clip(parameters, max_norm):
        seen["parameters"] = list(parameters)
        # accelerate under DeepSpeed before the engine's first step

    assert clip_gradients(SimpleNamespace(clip_grad_norm_=clip), model, 0.2) is None
    assert seen["parameters"] == list(model.parameters()), "all of the prepared model's parameters (FSDP needs them)"
    assert clip_gradients(SimpleNamespace(clip_grad_norm_=lambda p, m: torch.tensor(3.0)), model, 0.2) == 3.0


class _FakeEngine(torch.nn.Module):
    """The parts of a DeepSpeed engine that egspo's checkpoints use."""

    def __init__(self, module: torch.nn.Module, stage: int, gather_16bit: bool = True) -> None:
        super().__init__()
        self.module = module
        self.stage, self.gather_16bit = stage, gather_16bit
        self.saved: list[tuple[str, str]] = []
        self.loaded: list[tuple[str, str]] = []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        return self.gather_16bit

    def _zero3_consolidated_16bit_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.to(torch.bfloat16) for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, save_dir: str, tag: str, save_latest: bool = True,
                        exclude_frozen_parameters: bool = False) -> None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / f"{tag}.marker").write_text("partitioned optimizer state")
        self.saved.append((save_dir, tag))

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs) -> tuple[str, dict]:
        self.loaded.append((load_dir, tag))
        return load_dir, {}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_checkpoints_write_whole_weights_and_leave_the_optimizer_to_deepspeed(tmp_path, stage):
    from egspo.checkpoint import DEEPSPEED_DIR, load_checkpoint, save_checkpoint
    from egspo.config import Config
    from egspo.models.tiny import random_model
    from egspo.run_setup import make_optimizer

    model, _ = random_model(seed=0, n_layers=1, d_model=32, n_heads=2, mlp_hidden_size=64)
    engine = _FakeEngine(model, stage)
    cfg = Config()
    optimizer, scheduler = make_optimizer(list(model.parameters()), cfg, 10)
    path = save_checkpoint(tmp_path, 1, model=engine, optimizer=optimizer, scheduler=scheduler, config=cfg,
                           trainer_state={})
    assert engine.saved == [(str(tmp_path / ".tmp-checkpoint-1" / DEEPSPEED_DIR), "state")]
    assert (path / DEEPSPEED_DIR / "state.marker").exists() and not (path / "optimizer.pt").exists()
    weights = load_file(str(path / "model" / "model.safetensors"))
    expected = torch.bfloat16 if stage == 3 else torch.float32  # ZeRO-3: DeepSpeed's 16-bit gather
    assert weights and all(v.dtype == expected for v in weights.values())
    assert set(load_file(str(path / "trainable.safetensors"))) == {n for n, _ in model.named_parameters()}

    load_checkpoint(path, model=engine, optimizer=optimizer, scheduler=scheduler)
    assert engine.loaded == [(str(path / DEEPSPEED_DIR), "state")]


def test_deepspeed_zero3_checkpoint_needs_the_16bit_gather(tmp_path):
    from egspo.checkpoint import save_checkpoint
    from egspo.config import Config, ConfigError
    from egspo.models.tiny import random_model
    from egspo.run_setup import make_optimizer

    model, _ = random_model(seed=0, n_layers=1, d_model=32, n_heads=2, mlp_hidden_size=64)
    cfg = Config()
    optimizer, scheduler = make_optimizer(list(model.parameters()), cfg, 10)
    with pytest.raises(ConfigError, match="zero3_save_16bit_model"):
        save_checkpoint(tmp_path, 1, model=_FakeEngine(model, 3, gather_16bit=False), optimizer=optimizer,
                        scheduler=scheduler, config=cfg, trainer_state={})


def test_weights_sharded_recognises_deepspeed_zero3_only():
    from egspo.models.adapter import weights_sharded

    linear = torch.nn.Linear(2, 2)
    assert not weights_sharded(linear)
    assert not weights_sharded(_FakeEngine(linear, 2))
    assert weights_sharded(_FakeEngine(linear, 3))

