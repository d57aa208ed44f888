"""Multi-process RL on CPU: 2 processes through torchrun + gloo (each test well under a minute on 2 cores).

On a machine without CUDA, accelerate becomes multi-process only with ``ACCELERATE_USE_CPU=1`` in the
environment of processes started by torchrun (``accelerate launch --multi_gpu`` does the same);
``accelerate launch --cpu --num_processes 2`` starts a single process unless MPI is set up. See
docs/distributed.md. ``egspo eval`` sharding is tested in tests/test_evaluate.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed
import yaml
from safetensors.torch import load_file

from egspo.config import load_config
from egspo.rl.advantages import group_advantages, stepwise_advantages
from tests.dist_driver import fake_batch, rl_variants

ROOT = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def launch(
    processes: int, args: list[str], timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run ``python ARGS`` in ``processes`` CPU processes (torchrun + gloo when more than one); ``env`` adds
    variables (e.g. an accelerate config's)."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **(env or {})}
    prefix = [sys.executable]
    if processes > 1:
        prefix += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    proc = subprocess.run(prefix + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def _driver(micro_model: Path, prompts_file: Path, out: Path, processes: int) -> list[dict]:
    out.mkdir()
    launch(processes, ["tests/dist_driver.py", "--model", str(micro_model), "--data", str(prompts_file),
                       "--out", str(out), "--processes", str(processes)])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow
@needs_gloo
def test_advantages_of_the_same_batch_match_across_launch_sizes(micro_model, prompts_file, tmp_path):
    """A group of G=8 spans both processes of a 2 x 4 launch; advantages equal the 1 x 8 ones."""
    single = _driver(micro_model, prompts_file, tmp_path / "one", 1)
    double = _driver(micro_model, prompts_file, tmp_path / "two", 2)
    assert [d["rank"] for d in double] == [0, 1] and all(d["num_processes"] == 2 for d in double)

    rewards, greedy, weights = fake_batch()
    cfg = load_config(None, ["num_generations=8", "num_selected_steps=2", "max_completion_length=8",
                             "block_length=8", "diffusion_steps=4"])
    for name, rl in rl_variants(cfg).items():
        expected = stepwise_advantages(
            rewards, greedy if rl.stepwise_lambda else rewards[:, None].expand_as(weights), 8,
            float(rl.stepwise_lambda), normalize_returns=rl.normalize_returns,
            center_step_term=rl.center_step_term, scale_rewards=rl.scale_rewards, weights=weights)
        one = torch.tensor(single[0]["advantages"][name])
        two = torch.cat([torch.tensor(d["advantages"][name]) for d in double])
        torch.testing.assert_close(one, expected, msg=name)
        torch.testing.assert_close(two, one, rtol=0, atol=0, msg=name)
        assert (two[weights == 0] == 0).all()
    torch.testing.assert_close(torch.cat([torch.tensor(d["group"]) for d in double]),
                               group_advantages(rewards, 8), rtol=0, atol=1e-7)
    # adaptive K agreement and metric reduction across processes
    assert [d["agreed_max"] for d in double] == [2, 2] and [d["trainer_agreed_k"] for d in double] == [2, 2]
    assert all(d["reduced"] == {"rank": 0.5, "constant": 3.0} for d in double)
    assert single[0]["agreed_max"] == 1 and single[0]["reduced"] == {"rank": 0.0, "constant": 3.0}


def _train(config: Path, out: Path, *extra: str) -> None:
    launch(2, ["-m", "egspo.cli", "train", "--config", str(config), f"output_dir={out}", *extra])


@pytest.mark.slow
@needs_gloo
def test_two_process_cli_training_logs_once_checkpoints_and_resumes(micro_model, prompts_file, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(micro_model), "lora": True, "lora_r": 4, "lora_alpha": 8},
        "sampler": {"gen_length": 8, "block_length": 8, "steps": 4, "temperature": 1.0},
        "rl": {"algorithm": "egspo_sa", "num_generations": 8, "num_selected_steps": 2},
        "task": {"name": "custom", "train_file": str(prompts_file),
                 "extra_reward_funcs": ["tests.reward_fns:count_sevens"]},
        # 2 processes x 4 rollouts = one prompt's group of 8, split across the processes
        "train": {"per_device_batch_size": 4, "gradient_accumulation_steps": 2, "max_steps": 2, "save_every": 0,
                  "learning_rate": 0.01, "max_grad_norm": 1.0},
    }))
    run = tmp_path / "run"
    _train(config, run)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2], "one metrics line per step: only the main process writes"
    assert all("loss" in m and "kl" in m and "reward/mean" in m for m in lines)
    ckpt = run / "checkpoint-2"
    assert {"trainable.safetensors", "optimizer.pt", "rng_state_0.pt", "rng_state_1.pt"} <= {
        p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2

    _train(config, run, "max_steps=3", "--resume")
    resumed = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in resumed] == [1, 2, 3]
    assert resumed[:2] == lines

    straight = tmp_path / "straight"
    _train(config, straight, "max_steps=3")
    uninterrupted = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [m["reward/mean"] for m in uninterrupted] == pytest.approx([m["reward/mean"] for m in resumed])
    a = load_file(str(straight / "checkpoint-3" / "trainable.safetensors"))
    b = load_file(str(run / "checkpoint-3" / "trainable.safetensors"))
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_check_launch_refuses_processes_that_accelerate_did_not_join(monkeypatch):
    from egspo.config import ConfigError
    from egspo.rl.distributed import check_launch

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_launch(1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(2)
    with pytest.raises(ConfigError, match="ACCELERATE_USE_CPU=1"):
        check_launch(1)
