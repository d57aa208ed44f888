"""scripts/replicate.py: one command per seed builds one runs.json, and each command's time is kept."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "replicate.py"


@pytest.fixture
def replicate(monkeypatch):
    spec = importlib.util.spec_from_file_location("replicate_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module.time, "sleep", lambda seconds: None)

    class FinishedRun:  # an rl_curve.py that has already exited; exit code 3 for seed 2
        def __init__(self, command, **kwargs):
            self.returncode = 3 if "seed=2" in command else 0

        def poll(self):
            return self.returncode

    monkeypatch.setattr(module.subprocess, "Popen", FinishedRun)
    return module


def _run(module, monkeypatch, out: Path, *arguments: str) -> None:
    argv = ["replicate.py", "--task", "sudoku", "--reference-test", "ref.csv", "--out", str(out),
            "--variants", "egspo", "egspo_sa", *arguments]
    monkeypatch.setattr(sys, "argv", argv)
    module.main()


def test_commands_for_separate_seeds_merge_into_one_runs_file(replicate, monkeypatch, tmp_path):
    _run(replicate, monkeypatch, tmp_path, "--seeds", "0")
    _run(replicate, monkeypatch, tmp_path, "--seeds", "1")
    _run(replicate, monkeypatch, tmp_path, "--seeds", "0")  # a rerun of seed 0 replaces its records

    runs = json.loads((tmp_path / "sudoku" / "runs.json").read_text())
    assert sorted(r["run"] for r in runs) == ["egspo-s0", "egspo-s1", "egspo_sa-s0", "egspo_sa-s1"]
    assert all(r["returncode"] == 0 and "seed=" + str(r["seed"]) in r["command"] for r in runs)

    commands = [json.loads(line) for line in (tmp_path / "sudoku" / "commands.jsonl").read_text().splitlines()]
    assert [c["seeds"] for c in commands] == [[0], [1], [0]]
    assert all(c["runs"] == c["finished"] == 2 and c["seconds"] >= 0 for c in commands)


def test_failed_runs_are_recorded_before_the_command_fails(replicate, monkeypatch, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _run(replicate, monkeypatch, tmp_path, "--seeds", "2")
    assert exit_info.value.code == 1
    runs = json.loads((tmp_path / "sudoku" / "runs.json").read_text())
    assert {r["run"]: r["returncode"] for r in runs} == {"egspo-s2": 3, "egspo_sa-s2": 3}
    assert json.loads((tmp_path / "sudoku" / "commands.jsonl").read_text())["finished"] == 2


def test_steps_factor_makes_every_variant_longer_at_equal_rollouts(replicate, monkeypatch, tmp_path):
    commands: list[list[str]] = []

    class Recorded:
        def __init__(self, command, **kwargs):
            commands.append(command)
            self.returncode = 0

        def poll(self):
            return 0

    monkeypatch.setattr(replicate.subprocess, "Popen", Recorded)
    monkeypatch.setattr(sys, "argv", ["replicate.py", "--task", "sudoku", "--reference-test", "ref.csv", "--out",
                                      str(tmp_path), "--variants", "egspo_sa", "diffu_grpo", "--seeds", "0",
                                      "--steps-factor", "5"])
    replicate.main()
    steps = {c[c.index("--out") + 1].rsplit("/", 1)[1]: [a for a in c if a.startswith("max_steps=")][-1]
             for c in commands}
    # rl_sudoku.yaml: 200 steps; diffu-GRPO generates 2 batches per step, so half as many steps
    assert steps == {"egspo_sa-s0": "max_steps=1000", "diffu_grpo-s0": "max_steps=500"}


@pytest.mark.parametrize(("bad", "named"), [(["--steps-factor", "0"], "argument --steps-factor"),
                                           (["learnin_rate=1"], "Did you mean learning_rate?"),
                                           (["--steps-factor", "2", "max_steps=-3"], "max_steps=-3 must be > 0")])
def test_bad_arguments_exit_2_naming_them_before_anything_is_written(replicate, monkeypatch, tmp_path, capsys, bad,
                                                                     named):
    monkeypatch.setattr(replicate.subprocess, "Popen", lambda *a, **k: pytest.fail("a run was started"))
    monkeypatch.setattr(sys, "argv", ["replicate.py", "--task", "sudoku", "--reference-test", "ref.csv", "--out",
                                      str(tmp_path / "out"), *bad])
    with pytest.raises(SystemExit) as exit_info:
        replicate.main()
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
