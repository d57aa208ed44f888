"""The CPU example of the Python API runs as a user would run it (shortened to 2 steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_custom_reward_example_trains_saves_and_reports(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_reward_tiny.py"), "--steps", "2",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "mean reward" in done.stdout
    assert (out / "adapter_model.safetensors").exists() and "builtin:sudoku-tiny" in (out / "README.md").read_text()
    assert (out / "report.md").exists() and (out / "checkpoint-2").is_dir()
