"""scripts/replication_report.py: runs from different bases are compared by their gain over step 0."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "replication_report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("replication_report_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_run(task_dir: Path, name: str, reference: list[float]) -> None:
    run = task_dir / name
    run.mkdir(parents=True)
    curve = [{"step": 25 * i, "rollouts": 1600 * i, "seconds": 10.0 * i, "train_seconds": 8.0 * i,
              "held_out": {"puzzle_accuracy": 20.0 + i}, "reference": {"puzzle_accuracy": value}}
             for i, value in enumerate(reference)]
    (run / "curve.json").write_text(json.dumps(curve))
    rows = [{"reward/mean": 0.5, "selected_steps_histogram": [0, 1, 3]}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_gain_column_compares_runs_from_different_bases(report, tmp_path):
    task_dir = tmp_path / "runs" / "sudoku"
    _write_run(task_dir, "egspo_sa-s0", [13.0, 20.0, 35.0])  # base A
    _write_run(task_dir, "egspo_sa-s1", [23.0, 30.0, 47.0])  # base B, 10 points stronger
    _write_run(task_dir, "diffu_grpo-s0", [13.0, 14.0, 15.0])
    runs = [report.load_run(d) for d in sorted(task_dir.iterdir())]
    assert [r["gain_reference"] for r in runs] == [2.0, 22.0, 24.0]

    lines = report.table("sudoku", runs).splitlines()
    base_row = next(line for line in lines if line.startswith("| base model"))
    assert "13.0 / 23.0" in base_row and "20.0" in base_row
    sa_row = next(line for line in lines if line.startswith("| EGSPO-SA (λ = 0.5)"))
    cells = [c.strip() for c in sa_row.strip("|").split("|")]
    assert cells[3] == "41.0 ± 8.5 [35.0-47.0]"  # raw accuracy mixes the bases
    assert cells[4] == "+23.0 ± 1.4 [+22.0 to +24.0]"  # the gain does not
    grpo_row = next(line for line in lines if line.startswith("| diffu-GRPO (d1)"))
    assert "+2.0 (1 seed)" in grpo_row


def test_report_writes_table_data_and_figures(report, tmp_path, monkeypatch):
    runs_dir = tmp_path / "runs"
    _write_run(runs_dir / "sudoku", "egspo-s0", [10.0, 12.0, 15.0])
    _write_run(runs_dir / "sudoku", "egspo-s1", [10.0, 14.0, 17.0])
    (runs_dir / "sudoku-base").mkdir()  # bases are skipped
    out_images, out_data = tmp_path / "images", tmp_path / "data"
    monkeypatch.setattr("sys.argv", ["replication_report.py", "--runs", str(runs_dir), "--images", str(out_images),
                                     "--data", str(out_data)])
    report.main()
    saved = json.loads((out_data / "sudoku_runs.json").read_text())
    assert sorted(r["seed"] for r in saved) == [0, 1]
    assert "| EGSPO (λ = 0) | 2 |" in (out_data / "sudoku_table.md").read_text()
    for name in ("replication_sudoku_curves.png", "replication_sudoku_steps.png"):
        assert (out_images / name).read_bytes()[:4] == b"\x89PNG"


def test_cache_parity_compares_each_seed_at_its_last_common_evaluation(report, tmp_path):
    task_dir = tmp_path / "runs" / "sudoku"
    _write_run(task_dir, "egspo_sa-s0", [20.0, 24.0, 30.0])
    _write_run(task_dir, "egspo_sa_dual-s0", [20.0, 26.0])  # stopped early: compared at step 25
    _write_run(task_dir, "egspo_sa-s1", [20.0, 22.0, 28.0])
    _write_run(task_dir, "egspo_sa_dual-s1", [20.0, 21.0, 26.0])
    _write_run(task_dir, "egspo-s0", [20.0, 21.0, 22.0])  # not a pair
    runs = [report.load_run(d) for d in sorted(task_dir.iterdir())]
    (pair,) = report.cache_parity(runs)
    assert (pair["approximate"], pair["exact"]) == ("egspo_sa_dual", "egspo_sa")
    assert [(p["seed"], p["step"]) for p in pair["per_seed"]] == [(0, 25), (1, 50)]
    assert pair["per_seed"][0]["reference"] == {"approximate": 6.0, "exact": 4.0}
    assert pair["mean_gain_reference"] == {"approximate": 6.0, "exact": 6.0}  # (6 + 6) / 2 against (4 + 8) / 2
    assert pair["share_of_exact_gain_reference"] == pytest.approx(1.0)
    # held-out: +1 per evaluation in _write_run, so each seed's gain is its compared step's index
    assert pair["mean_gain_held_out"] == {"approximate": 1.5, "exact": 1.5}


def test_best_diffu_grpo_learning_rate_is_chosen_on_held_out_data(report, tmp_path):
    task_dir = tmp_path / "runs" / "sudoku"
    # _write_run's held-out accuracy is 20 + index of the last evaluation: 2 points for 3 evaluations, 3 for 4
    _write_run(task_dir, "diffu_grpo-s0", [13.0, 30.0, 40.0])  # best on the reference set, held-out 22
    _write_run(task_dir, "diffu_grpo_lr1e-4-s0", [13.0, 14.0, 15.0, 16.0])  # held-out 23: chosen
    _write_run(task_dir, "egspo_sa-s0", [13.0, 20.0, 35.0, 36.0])  # not a candidate
    runs = [report.load_run(d) for d in sorted(task_dir.iterdir())]
    assert report.best_diffu_grpo(runs) == "diffu_grpo_lr1e-4"
    lines = report.table("sudoku", runs).splitlines()
    assert any(line.startswith("| diffu-GRPO (d1), lr 1e-4 **(best lr on held-out)**") for line in lines)
    assert not any("best lr" in line for line in lines if line.startswith("| diffu-GRPO (d1) |"))


def test_best_diffu_grpo_option_prints_the_variant_for_the_long_runs(report, tmp_path, monkeypatch, capsys):
    task_dir = tmp_path / "runs" / "sudoku"
    _write_run(task_dir, "diffu_grpo-s0", [13.0, 30.0, 40.0])  # held-out 22
    _write_run(task_dir, "diffu_grpo_lr1e-3-s0", [13.0, 14.0, 15.0, 16.0])  # held-out 23
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["replication_report.py", "--best-diffu-grpo", str(task_dir)])
    report.main()
    assert capsys.readouterr().out == "diffu_grpo_lr1e-3\n"
    assert not (tmp_path / "docs").exists() and not (tmp_path / "images").exists()  # prints only, writes nothing

    monkeypatch.setattr("sys.argv", ["replication_report.py", "--best-diffu-grpo", str(tmp_path / "empty")])
    with pytest.raises(SystemExit) as exit_info:
        report.main()
    assert exit_info.value.code == 2 and "no finished diffu-GRPO run under" in capsys.readouterr().err
