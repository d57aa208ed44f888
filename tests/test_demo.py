"""The built-in default job end to end, shrunk to seconds."""

import json

from egspo.cli import main


def test_demo_writes_table_report_and_curve(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "max_steps=2", "num_eval=8", "num_train=50",
               "per_device_train_batch_size=16", "num_selected_steps=2", "save_steps=0"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "EGSPO-SA" in printed and "puzzle acc %" in printed
    results = json.loads((out / "demo_results.json").read_text())
    for key in ("base", "trained"):
        assert 0 <= results[key]["accuracy"] <= 100 and 0 <= results[key]["puzzle_accuracy"] <= 100
    assert (out / "training_curve.png").stat().st_size > 1000
    assert "EGSPO-SA on 4x4 Sudoku" in (out / "report.md").read_text()
    assert (out / "checkpoint-2" / "adapter" / "adapter_config.json").exists()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
