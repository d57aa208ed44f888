"""scripts/build_base.py against a stand-in SFT process: stale runs, checkpoints pruned while it evaluates."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest

from egspo.config import ConfigError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "build_base.py"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "replication" / "sft_countdown.yaml"


@pytest.fixture
def build_base(monkeypatch):
    spec = importlib.util.spec_from_file_location("build_base_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "POLL_SECONDS", 0.0)
    return module


def _fake_sft(module, monkeypatch, model: Path, out: Path, steps: list[int], code: int = 0) -> list[list[str]]:
    """Popen stand-in that writes complete checkpoints of ``model`` at once, then has exited with ``code``."""
    started: list[list[str]] = []

    class FakeProcess:
        returncode = code

        def __init__(self, command):
            started.append(command)
            for step in steps:
                shutil.copytree(model, out / "sft" / f"checkpoint-{step}" / "model")

        def poll(self):
            return code

        def terminate(self):
            pass

        def wait(self):
            return 0

    monkeypatch.setattr(module.subprocess, "Popen", FakeProcess)
    return started


def _run(module, monkeypatch, out: Path, *extra: str) -> None:
    monkeypatch.setattr(sys, "argv", ["build_base.py", "--config", str(CONFIG), "--out", str(out),
                                      "--num-eval", "2", "--target", "10,40", *extra])
    module.main()


def test_refuses_an_output_dir_with_an_old_runs_checkpoints(build_base, monkeypatch, micro_model, tmp_path):
    out = tmp_path / "base"
    shutil.copytree(micro_model, out / "sft" / "checkpoint-100" / "model")
    started = _fake_sft(build_base, monkeypatch, micro_model, out, [10])
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        _run(build_base, monkeypatch, out)
    assert not started  # the old checkpoint is neither evaluated nor chosen


def test_checkpoints_pruned_while_evaluating(build_base, monkeypatch, micro_model, tmp_path):
    """keep_last deletes a listed checkpoint before it is loaded, and the chosen one while it is evaluated."""
    out = tmp_path / "base"
    _fake_sft(build_base, monkeypatch, micro_model, out, [10, 20])
    real_list = build_base.list_checkpoints
    pruned: list[str] = []

    def listing_then_pruning(run_dir):
        found = real_list(run_dir)
        if not pruned and found:
            pruned.append(found[0].name)
            shutil.rmtree(found[0])  # pruned between the listing and the load
        return found

    def evaluate(dlm, tokenizer, task, rows, sampler, batch_size):
        shutil.rmtree(out / "sft" / "checkpoint-20")  # pruned while it is being evaluated
        return None, {"accuracy": 25.0}

    monkeypatch.setattr(build_base, "list_checkpoints", listing_then_pruning)
    monkeypatch.setattr(build_base, "evaluate_rows", evaluate)
    _run(build_base, monkeypatch, out, "--all")
    selection = json.loads((out / "selection.json").read_text())
    assert pruned == ["checkpoint-10"]
    assert [c["checkpoint"] for c in selection["checkpoints"]] == ["checkpoint-20"]
    assert selection["chosen"]["checkpoint"] == "checkpoint-20"
    assert (out / "chosen" / "config.json").is_file() and not (out / "evaluating").exists()


def test_a_failed_sft_keeps_the_evaluations_and_exits_nonzero(build_base, monkeypatch, micro_model, tmp_path):
    out = tmp_path / "base"
    _fake_sft(build_base, monkeypatch, micro_model, out, [10], code=1)
    monkeypatch.setattr(build_base, "evaluate_rows", lambda *a, **k: (None, {"accuracy": 5.0}))
    with pytest.raises(SystemExit) as exit_info:
        _run(build_base, monkeypatch, out)
    assert exit_info.value.code == 1
    selection = json.loads((out / "selection.json").read_text())
    assert selection["sft_exit_code"] == 1 and selection["chosen"] is None
    assert [c["checkpoint"] for c in selection["checkpoints"]] == ["checkpoint-10"]
    assert not (out / "chosen").exists()
