import json

import torch

from egspo.rl.metrics import MetricsWriter, read_metrics, step_histogram


def test_step_histogram_one_bin_per_step_counts_only_weighted_selections():
    steps = torch.tensor([[0, 3, 3], [11, 3, 5]])
    weights = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # the padded (0, 3) slot is not counted
    hist = step_histogram(steps, weights, num_steps=12)
    assert len(hist) == 12
    assert hist[0] == 1 and hist[3] == 2 and hist[5] == 1 and hist[11] == 1
    assert sum(hist) == 5


def test_step_histogram_slices_long_schedules():
    steps = torch.tensor([[0, 127], [64, 65]])
    hist = step_histogram(steps, torch.ones(2, 2), num_steps=128, max_bins=4)
    assert hist == [1, 0, 2, 1]
    assert step_histogram(steps, torch.zeros(2, 2), num_steps=128, max_bins=4) == [0, 0, 0, 0]


def test_metrics_writer_truncates_past_resume_step_and_writes_nan_as_null(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    writer = MetricsWriter(path, truncate_after=2)
    writer.write({"step": 3, "kl": float("nan")})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[-1]["kl"] is None
