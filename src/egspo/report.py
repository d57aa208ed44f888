"""The end-of-run report of every training run: ``training_curve.png`` and ``report.md`` in its output dir.

    write_run_report(run_dir, args, read_metrics(run_dir / "metrics.jsonl"))

The figure has one panel per quantity that the run logged: rollout reward (raw and smoothed), training
accuracy, KL to the reference, entropy of the selected steps against all steps, the evaluation points
(``eval_*``), and the histogram of which denoising steps were selected. The report states the settings
that define the run and the first/last values of each curve.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

CURVE_FILE = "training_curve.png"
REPORT_FILE = "report.md"
#: Metrics drawn as curves (key, title) when a run logged them.
CURVES = (("reward/mean", "rollout reward"), ("accuracy", "training accuracy (%)"), ("kl", "KL to the reference"),
          ("entropy/selected", "entropy of selected steps"))


def _series(rows: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))
              and not math.isnan(float(r[key]))]
    return [p[0] for p in points], [p[1] for p in points]


def smooth(values: Sequence[float], window: int = 5) -> list[float]:
    """Trailing mean over ``window`` values (shorter at the start)."""
    return [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
            for i in range(len(values))]


def eval_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The ``eval_*`` metrics a run logged, in order."""
    return sorted({k for r in rows for k in r if k.startswith("eval_")})


def step_counts(rows: Sequence[dict[str, Any]]) -> list[int]:
    """The selected-step histogram summed over the run (empty for diffu-GRPO)."""
    hists = [r["selected_steps_histogram"] for r in rows if isinstance(r.get("selected_steps_histogram"), list)]
    return [sum(col) for col in zip(*hists, strict=True)] if hists else []


def plot_run(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """The training-curve figure (see the module docstring)."""
    panels: list[tuple[str, str, bool]] = [(k, t, False) for k, t in CURVES if _series(rows, k)[0]]
    panels += [(k, k, True) for k in eval_keys(rows)][:2]
    hist = step_counts(rows)
    count = len(panels) + bool(hist)
    cols = 2 if count > 1 else 1
    fig, axes = plt.subplots(math.ceil(max(count, 1) / cols), cols, figsize=(6 * cols, 3 * math.ceil(count / cols)),
                             squeeze=False)
    flat = list(axes.flat)
    for ax, (key, label, points) in zip(flat, panels, strict=False):
        steps, values = _series(rows, key)
        if points:
            ax.plot(steps, values, "o-")
        else:
            ax.plot(steps, values, alpha=0.35, label="per step")
            ax.plot(steps, smooth(values), label="mean of 5")
            if key == "entropy/selected":
                ax.plot(*_series(rows, "entropy/all"), label="all steps", alpha=0.6)
            ax.legend(fontsize=7)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step (rollout batch)", fontsize=8)
        ax.grid(alpha=0.3)
    if hist:
        ax = flat[len(panels)]
        ax.bar(range(len(hist)), hist)
        ax.set_title("selected denoising steps (count)", fontsize=9)
        ax.set_xlabel("denoising step (or bin)", fontsize=8)
    for ax in flat[count:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _first_last(rows: Sequence[dict[str, Any]], key: str) -> str:
    _, values = _series(rows, key)
    if not values:
        return "-"
    head, tail = values[: max(1, len(values) // 10)], values[-max(1, len(values) // 10):]
    return f"{sum(head) / len(head):.4g} -> {sum(tail) / len(tail):.4g}"


def write_run_report(run_dir: str | Path, args: Any, rows: Sequence[dict[str, Any]], preface: str = "") -> Path:
    """Write ``training_curve.png`` and ``report.md`` into ``run_dir`` (``preface``: markdown put first, e.g. a
    before/after table); returns the report's path."""
    run_dir = Path(run_dir)
    if not rows:
        logger.warning("No metrics logged in %s: no report written.", run_dir)
        return run_dir / REPORT_FILE
    title = f"{args.algorithm} on {args.task}: {args.model_name_or_path}"
    plot_run(rows, run_dir / CURVE_FILE, title)
    steps = "" if args.algorithm == "diffu_grpo" else (
        f"K = {args.num_selected_steps} {args.step_selection} steps of T = {args.diffusion_steps}, "
        f"lambda = {args.stepwise_lambda}, ")
    lines = [
        f"# {title}", "", *([preface.strip(), ""] if preface else []),
        f"{args.algorithm}: {steps}G = {args.num_generations}, beta = {args.beta}, learning rate {args.learning_rate}, "
        f"{rows[-1]['step']} steps of {args.per_device_train_batch_size} rollouts per device, completion "
        f"{args.max_completion_length} tokens in blocks of {args.block_length}.", "",
        "| metric | first 10% -> last 10% of steps |", "|---|---|",
        *[f"| {label} | {_first_last(rows, key)} |" for key, label in CURVES if _series(rows, key)[0]],
    ]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    if evals:
        keys = eval_keys(rows)
        lines += ["", "Evaluation (greedy):", "", "| step | " + " | ".join(keys) + " |",
                  "|---" * (len(keys) + 1) + "|"]
        lines += [f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-"
                                                   for k in keys) + " |" for r in evals]
    lines += ["", f"![training curve]({CURVE_FILE})", "",
              "Files: `metrics.jsonl` (per-step metrics), `config.yaml` (every setting), `checkpoint-*/`.", ""]
    path = run_dir / REPORT_FILE
    path.write_text("\n".join(lines))
    logger.info("Report: %s", path)
    return path
