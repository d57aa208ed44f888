"""User mistakes on the command line: exit status 2, a sentence naming the thing, no traceback, nothing left
behind; interruption: exit 130 after a checkpoint, and --resume continues; a finished run says so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: A small run of the micro model: 8-token completions, 4 steps, 8 rollouts per step.
SMALL = ["max_completion_length=8", "block_length=8", "diffusion_steps=4", "num_generations=4",
         "per_device_train_batch_size=8", "lora_r=4", "lora_alpha=8", "save_steps=0"]


def egspo(*args: str, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "egspo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=full_env, timeout=timeout)


def assert_user_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, (done.returncode, done.stderr[-1500:])
    assert "Traceback" not in done.stderr, done.stderr[-1500:]
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr[-1500:])


@pytest.mark.parametrize("text, fragments", [
    ("- a\n- b\n", ["must be a mapping of field: value", "got a list"]),
    ("just a string\n", ["must be a mapping of field: value", "got a str"]),
    ("rl: 5\n", ["Section 'rl'", "must be a mapping"]),
    ("max_steps: 3\nlearnin_rate: 0.1\n", ["Unknown config key 'learnin_rate'", "Did you mean learning_rate", ":2)"]),
    ("task: custom\ntask_options: {blanks: 6}\ntrain_file: rows.jsonl\n", ["task_options", "task_options={}"]),
])
def test_bad_config_files(tmp_path, text, fragments):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n")
    (tmp_path / "c.yaml").write_text(text)
    out = tmp_path / "run"
    assert_user_error(egspo("train", "--config", "c.yaml", f"output_dir={out}", cwd=tmp_path), *fragments)
    assert not out.exists()


def test_override_errors_name_the_override_and_point_to_the_new_field(tmp_path):
    done = egspo("train", "train.num_selected_steps=4", cwd=tmp_path)
    assert_user_error(done, "'num_selected_steps'")
    done = egspo("train", "num_generations=1", cwd=tmp_path)
    assert_user_error(done, "num_generations=1", "command-line override 'num_generations=1'")


def test_data_and_reward_mistakes_exit_2_and_leave_nothing(tmp_path, micro_model):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"text": "no prompt"}) + "\n")
    out = tmp_path / "run"
    done = egspo("train", "task=custom", "train_file=bad.jsonl", "reward_funcs=[my_rewards:fn]",
                 f"model_name_or_path={micro_model}", f"output_dir={out}", *SMALL, cwd=tmp_path)
    assert_user_error(done)
    assert not out.exists()
    # the README's case: the reward module sits in the working directory
    (tmp_path / "good.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n")
    done = egspo("train", "task=custom", "train_file=good.jsonl", "reward_funcs=[not_there:fn]",
                 f"model_name_or_path={micro_model}", f"output_dir={out}", *SMALL, cwd=tmp_path)
    assert_user_error(done, "cannot import module 'not_there'", "working directory")
    assert not out.exists()
    (tmp_path / "mine.py").write_text("def fn(prompts, completions, **kw):\n    raise ValueError('boom')\n")
    done = egspo("train", "task=custom", "train_file=good.jsonl", "reward_funcs=[mine:fn]", "max_steps=1",
                 f"model_name_or_path={micro_model}", f"output_dir={out}", *SMALL, cwd=tmp_path)
    assert_user_error(done, "Reward function 'fn' raised ValueError: boom")
    assert not out.exists(), "a run that fails in its first step leaves no directory it created"


def test_a_missing_model_offline_fails_at_once(tmp_path):
    """Refused by the offline check before the hub client is asked (so no network retries), not after."""
    done = egspo("train", "model_name_or_path=someone/not-a-model", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_user_error(done, "someone/not-a-model", "is offline (")


def test_interrupt_saves_exits_130_and_resume_finishes(tmp_path, micro_model):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(8)))
    (tmp_path / "r.py").write_text("def fn(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")
    out = tmp_path / "run"
    args = ["train", "task=custom", "train_file=rows.jsonl", "reward_funcs=[r:fn]", "max_steps=400",
            f"model_name_or_path={micro_model}", f"output_dir={out}", *SMALL]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "egspo.cli", *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-1500:]
    assert "--resume" in stderr and "Traceback" not in stderr
    saved = sorted(out.glob("checkpoint-*"))
    assert len(saved) == 1
    step = int(saved[0].name.split("-")[1])
    assert 1 <= step < 400
    done = egspo(*args, "--resume", f"max_steps={step + 1}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    assert (out / f"checkpoint-{step + 1}").is_dir()
    again = egspo(*args, "--resume", f"max_steps={step + 1}", cwd=tmp_path)
    assert again.returncode == 0 and "already finished" in again.stderr
