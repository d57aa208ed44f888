"""SFT's run life cycle, shared with RL (egspo.run_lifecycle): SIGTERM saves a checkpoint at that step and
resuming equals the uninterrupted run, `egspo sft` exits 143 with the resume line, --resume without a
checkpoint warns and starts fresh, the launch check runs, a failed start leaves nothing behind; and
the pieces themselves (the signal guard, the shared optimizer step)."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import egspo.run_lifecycle as lifecycle
import egspo.sft as sft_module
from egspo.checkpoint import list_checkpoints
from egspo.config import ConfigError, load_config
from egspo.run_lifecycle import StopFlag, TrainingInterrupted
from egspo.run_setup import optimizer_step
from egspo.sft import sft

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(model: Path, data: Path, out: Path, steps: int, save_steps: int = 0) -> list[str]:
    return [f"model_name_or_path={model}", "use_peft=false", "max_completion_length=8", "block_length=8",
            "diffusion_steps=8", "task=custom", f"train_file={data}", "max_prompt_length=16", f"output_dir={out}",
            "per_device_train_batch_size=4", "gradient_accumulation_steps=2", f"max_steps={steps}",
            f"save_steps={save_steps}", "learning_rate=3e-3", "warmup_steps=0", "logging_steps=1",
            "max_grad_norm=1.0", "seed=3"]


def _config(model: Path, data: Path, out: Path, steps: int, save_steps: int = 0):
    return load_config(None, _overrides(model, data, out, steps, save_steps))


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}", "completion": str(i) * 3}) + "\n" for i in range(10)))
    return path


class _Terminated(Exception):
    """Raised by the test's own SIGTERM handler: SIGTERM reached the process outside a guard."""


def _unguarded(signum, frame):
    raise _Terminated


@pytest.fixture
def test_sigterm_handler():
    """SIGTERM raises _Terminated during the test (instead of ending pytest when a guard is missing); the
    guard must give this handler back when it is done."""
    previous = signal.signal(signal.SIGTERM, _unguarded)
    yield
    assert signal.getsignal(signal.SIGTERM) is _unguarded, "the guard restores the handler it replaced"
    signal.signal(signal.SIGTERM, previous)


@pytest.fixture
def sigterm_during_step(monkeypatch, test_sigterm_handler):
    """``arm(step)``: SIGTERM this process during the first micro-batch of 1-based step ``step`` (None:
    disarmed)."""
    loss = sft_module.masked_diffusion_loss
    calls = {"n": 0, "at": None}

    def loss_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss(*args, **kwargs)

    def arm(step: int | None, accumulation: int = 2) -> None:
        calls["n"], calls["at"] = 0, None if step is None else (step - 1) * accumulation + 1

    monkeypatch.setattr(sft_module, "masked_diffusion_loss", loss_then_signal)
    return arm


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_saves_that_step_and_the_resumed_run_equals_the_uninterrupted_one(
        micro_model, pairs_file, tmp_path, sigterm_during_step):
    straight = tmp_path / "straight"
    sft(_config(micro_model, pairs_file, straight, steps=6))
    assert [p.name for p in list_checkpoints(straight)] == ["checkpoint-6"]

    run = tmp_path / "run"
    sigterm_during_step(3)
    with pytest.raises(TrainingInterrupted) as stopped:
        sft(_config(micro_model, pairs_file, run, steps=6))
    assert (stopped.value.signum, stopped.value.step, stopped.value.run_dir) == (signal.SIGTERM, 3, run)
    # step 3 finished and was saved although save_steps=0 schedules only the final checkpoint
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3"]
    assert len(_losses(run)) == 3

    sigterm_during_step(None)
    sft(_config(micro_model, pairs_file, run, steps=6), resume=True)
    assert _losses(run) == pytest.approx(_losses(straight), rel=1e-6)
    a = load_file(str(straight / "checkpoint-6" / "trainable.safetensors"))
    b = load_file(str(run / "checkpoint-6" / "trainable.safetensors"))
    assert a.keys() == b.keys() and a
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=1e-6, atol=1e-7, msg=name)


def test_egspo_sft_exits_143_on_sigterm_with_the_resume_line(micro_model, pairs_file, tmp_path, caplog,
                                                              sigterm_during_step):
    from egspo.cli import main

    run = tmp_path / "run"
    args = ["sft", *_overrides(micro_model, pairs_file, run, steps=4)]
    sigterm_during_step(2)
    with caplog.at_level(logging.INFO, logger="egspo"):
        assert main(args) == 128 + signal.SIGTERM
    assert "Interrupted at step 2; checkpoint saved. Resume with the same command and --resume." in caplog.text
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    sigterm_during_step(None)
    assert main([*args, "--resume"]) == 0
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2", "checkpoint-4"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="egspo"):
        assert main([*args, "--resume"]) == 0
    assert "already finished (step 4 of max_steps=4)" in caplog.text


def test_resume_without_a_checkpoint_warns_and_starts_fresh(micro_model, pairs_file, tmp_path, caplog):
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="egspo.run_lifecycle"):
        sft(_config(micro_model, pairs_file, run, steps=2), resume=True)
    assert f"no checkpoint in {run}, starting from scratch" in caplog.text
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-2"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_named_checkpoint_must_be_one(micro_model, pairs_file, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        sft(_config(micro_model, pairs_file, run, steps=2), resume=tmp_path)
    assert not run.exists()


def test_the_launch_check_runs_before_anything_is_created(micro_model, pairs_file, tmp_path, monkeypatch):
    seen = []

    def refuse(num_processes):
        seen.append(num_processes)
        raise ConfigError("launch refused")

    monkeypatch.setattr(lifecycle, "check_launch", refuse)
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="launch refused"):
        sft(_config(micro_model, pairs_file, run, steps=2))
    assert seen == [1] and not run.exists()


def test_a_failed_start_removes_the_directory_it_created(micro_model, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "a"}) + "\n")
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="no 'completion' field"):
        sft(_config(micro_model, data, run, steps=2))
    assert not run.exists()
    run.mkdir()  # a directory that was there before stays
    with pytest.raises(ConfigError, match="no 'completion' field"):
        sft(_config(micro_model, data, run, steps=2))
    assert run.is_dir()


def _gather_with(other: float) -> SimpleNamespace:
    """An accelerator of two processes whose other process reports ``other``."""
    return SimpleNamespace(device=torch.device("cpu"), gather=lambda x: torch.cat([x, x.new_tensor([other])]))


@pytest.mark.usefixtures("test_sigterm_handler")
def test_the_stop_flag_takes_one_signal_then_stops_at_once_and_restores_the_handlers():
    before = signal.getsignal(signal.SIGINT)
    with StopFlag() as stop:
        assert stop.signum is None and stop.agreed(_gather_with(0.0)) == 0
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        assert stop.agreed(_gather_with(2.0)) == signal.SIGTERM  # the largest over processes
        with pytest.raises(KeyboardInterrupt) as second:
            os.kill(os.getpid(), signal.SIGTERM)
        assert not isinstance(second.value, TrainingInterrupted)
    assert signal.getsignal(signal.SIGINT) is before
    assert StopFlag().agreed(_gather_with(15.0)) == 15  # another process's signal stops this one too


def test_optimizer_step_runs_only_at_the_end_of_an_accumulation_cycle_and_clips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))

    def backward():
        model(torch.tensor([[3.0, 4.0]])).sum().backward()  # gradient (3, 4), norm 5

    acc = SimpleNamespace(sync_gradients=False, clip_grad_norm_=torch.nn.utils.clip_grad_norm_)
    backward()
    assert optimizer_step(acc, model, optimizer, scheduler, max_grad_norm=1.0) is None
    assert model.weight.tolist() == [[1.0, 1.0]] and model.weight.grad is not None  # accumulating
    acc.sync_gradients = True
    backward()
    assert optimizer_step(acc, model, optimizer, scheduler, max_grad_norm=1.0) == pytest.approx(10.0)
    # the accumulated gradient (6, 8) clipped to norm 1, times lr 0.1; then the schedule moves on
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1 - 0.06, 1 - 0.08]]))
    assert model.weight.grad is None and scheduler.get_last_lr() == [pytest.approx(0.05)]
    backward()
    assert optimizer_step(acc, model, optimizer, scheduler, max_grad_norm=0.0) is None  # 0: no clipping
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.94 - 0.15, 0.92 - 0.2]]))
