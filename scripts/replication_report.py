"""Tables and figures of the issue-#9 replication from the runs of scripts/replicate.py.

    python scripts/replication_report.py --runs runs/replication --images docs/images \
        --data docs/data/replication

For each task directory under --runs (sudoku, countdown): reads every run's curve.json and
metrics.jsonl, and writes
- DATA/TASK_runs.json: per run the final and best accuracies, training and wall seconds;
- DATA/TASK_table.md: the table of docs/results.md (mean ± std over seeds, min-max in brackets), with
  each run's gain over its own step-0 evaluation (runs of one table may start from different bases);
- IMAGES/replication_TASK_curves.png: reference-set accuracy against rollouts and against training
  seconds, mean over seeds with the min-max band (the gain over step 0 when the runs' bases differ);
- IMAGES/replication_TASK_steps.png: which denoising steps were selected (share of all selections).
The headline metric is the task's whole-answer accuracy: puzzle accuracy for Sudoku, accuracy else.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger("replication_report")
ORDER = ["diffu_grpo", "diffu_grpo_low_lr", "diffu_grpo_lr1e-4", "diffu_grpo_lr1e-3", "egspo", "egspo_sa",
         "egspo_sa_dual", "egspo_sa_dual_refresh2", "random", "uniform"]
LABELS = {"diffu_grpo": "diffu-GRPO (d1)", "diffu_grpo_low_lr": "diffu-GRPO (d1), lr 1e-4",
          "diffu_grpo_lr1e-4": "diffu-GRPO (d1), lr 1e-4", "diffu_grpo_lr1e-3": "diffu-GRPO (d1), lr 1e-3",
          "egspo": "EGSPO (λ = 0)", "egspo_sa": "EGSPO-SA (λ = 0.5)",
          "egspo_sa_dual": "EGSPO-SA, dual-cached rollout",
          "egspo_sa_dual_refresh2": "EGSPO-SA, dual cache refreshed every 2 steps",
          "random": "EGSPO-SA, random steps", "uniform": "EGSPO-SA, uniform steps"}
#: (approximate variant, exact variant) pairs whose gains are compared seed by seed (issue #18)
CACHE_PAIRS = [("egspo_sa_dual", "egspo_sa"), ("egspo_sa_dual_refresh2", "egspo_sa")]


COLORS = {variant: f"C{i}" for i, variant in enumerate(ORDER)}  # one colour per variant in every figure


def headline(metrics: dict[str, float]) -> float:
    return metrics.get("puzzle_accuracy", metrics.get("accuracy", float("nan")))


def add_counts(total: list[float], counts: list[float]) -> list[float]:
    """Element-wise sum of two histograms (``total`` may still be empty)."""
    return [a + b for a, b in zip(total, counts, strict=True)] if total else list(counts)


def load_run(run_dir: Path) -> dict[str, Any] | None:
    curve_path = run_dir / "curve.json"
    if not curve_path.exists():
        return None
    curve = json.loads(curve_path.read_text())
    variant, seed = run_dir.name.rsplit("-s", 1)
    metrics_path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()] if metrics_path.exists() else []
    hist: list[float] = []
    for row in rows:
        counts = row.get("selected_steps_histogram")
        if counts:
            hist = add_counts(hist, counts)
    last = curve[-1]
    base_reference, final_reference = headline(curve[0].get("reference", {})), headline(last.get("reference", {}))
    return {
        "variant": variant, "seed": int(seed), "steps": last["step"], "rollouts": last["rollouts"],
        "base_reference": base_reference, "base_held_out": headline(curve[0]["held_out"]),
        "final_reference": final_reference, "final_held_out": headline(last["held_out"]),
        "gain_reference": final_reference - base_reference,
        "best_reference": max(headline(e.get("reference", {})) for e in curve),
        "train_seconds": last["train_seconds"], "wall_seconds": last["seconds"],
        "reward_last10": statistics.fmean(r["reward/mean"] for r in rows[-10:]) if rows else float("nan"),
        "old_logp_gap": statistics.fmean(r.get("approx/old_logp_gap", 0.0) for r in rows) if rows else float("nan"),
        "capped_fraction": statistics.fmean(r.get("approx/capped_fraction", 0.0) for r in rows) if rows else 0.0,
        "curve": curve, "steps_histogram": hist,
    }


def spread(values: list[float], sign: bool = False) -> str:
    """Mean ± sample standard deviation [min-max]; ``sign`` writes + on positive figures (gains)."""
    f, to = ("+.1f", " to ") if sign else (".1f", "-")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:{f}} (1 seed)"
    return f"{mean:{f}} ± {statistics.stdev(values):.1f} [{min(values):{f}}{to}{max(values):{f}}]"


def best_diffu_grpo(runs: list[dict[str, Any]]) -> str | None:
    """The diffu-GRPO variant (learning rate) with the highest mean final held-out accuracy: the baseline's
    learning rate is chosen on held-out data, never on the reference set that the table reports."""
    by_variant: dict[str, list[float]] = defaultdict(list)
    for run in runs:
        if run["variant"].startswith("diffu_grpo"):
            by_variant[run["variant"]].append(run["final_held_out"])
    if not by_variant:
        return None
    return max(by_variant, key=lambda v: (statistics.fmean(by_variant[v]), -ORDER.index(v)))


def table(task: str, runs: list[dict[str, Any]]) -> str:
    by_variant = defaultdict(list)
    for run in runs:
        by_variant[run["variant"]].append(run)
    lines = ["| variant | seeds | steps (rollouts) | reference acc. % | gain over step 0 (points) | held-out acc. % | "
             "best reference % | train s | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    bases = sorted({(r["base_reference"], r["base_held_out"]) for r in runs})  # several when bases were rebuilt
    lines.append(f"| base model | | 0 | {' / '.join(f'{b[0]:.1f}' for b in bases)} | | "
                 f"{' / '.join(f'{b[1]:.1f}' for b in bases)} | | | |")
    best = best_diffu_grpo(runs)
    several = sum(v.startswith("diffu_grpo") for v in by_variant) > 1
    for variant in [v for v in ORDER if v in by_variant]:
        group = by_variant[variant]
        steps = sorted({r["steps"] for r in group})
        label = LABELS[variant] + (" **(best lr on held-out)**" if several and variant == best else "")
        lines.append(
            f"| {label} | {len(group)} | {'/'.join(map(str, steps))} ({group[0]['rollouts']}) | "
            f"{spread([r['final_reference'] for r in group])} | "
            f"{spread([r['gain_reference'] for r in group], sign=True)} | "
            f"{spread([r['final_held_out'] for r in group])} | "
            f"{spread([r['best_reference'] for r in group])} | "
            f"{statistics.fmean(r['train_seconds'] for r in group):.0f} | "
            f"{statistics.fmean(r['wall_seconds'] for r in group):.0f} |")
    return f"Task: {task}\n\n" + "\n".join(lines) + "\n"


def _gains_at(run: dict[str, Any], step: int) -> tuple[float, float]:
    """(reference, held-out) gains over the run's step 0 at its evaluation of ``step``."""
    first = run["curve"][0]
    entry = next(e for e in run["curve"] if e["step"] == step)
    return (headline(entry.get("reference", {})) - headline(first.get("reference", {})),
            headline(entry["held_out"]) - headline(first["held_out"]))


def cache_parity(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (approximate, exact) pair of :data:`CACHE_PAIRS`: each seed's gains on the reference and held-out
    sets at the last step both runs of the seed evaluated (a run stopped early is compared where it stopped),
    the mean gains and their ratio (the approximate runs' share of the exact runs' gain), the mean
    |old log-prob gap| and the training seconds of both."""
    by_key = {(r["variant"], r["seed"]): r for r in runs}
    out = []
    for approx, exact in CACHE_PAIRS:
        seeds = sorted(seed for (variant, seed) in by_key if variant == approx and (exact, seed) in by_key)
        if not seeds:
            continue
        per_seed = []
        for seed in seeds:
            a, e = by_key[(approx, seed)], by_key[(exact, seed)]
            step = max({x["step"] for x in a["curve"]} & {x["step"] for x in e["curve"]})
            (ref_a, held_a), (ref_e, held_e) = _gains_at(a, step), _gains_at(e, step)
            per_seed.append({"seed": seed, "step": step, "reference": {"approximate": ref_a, "exact": ref_e},
                             "held_out": {"approximate": held_a, "exact": held_e}})
        result: dict[str, Any] = {"approximate": approx, "exact": exact, "per_seed": per_seed}
        for split in ("reference", "held_out"):
            mean_a = statistics.fmean(p[split]["approximate"] for p in per_seed)
            mean_e = statistics.fmean(p[split]["exact"] for p in per_seed)
            result[f"mean_gain_{split}"] = {"approximate": mean_a, "exact": mean_e}
            result[f"share_of_exact_gain_{split}"] = mean_a / mean_e if mean_e else float("nan")
        result["old_logp_gap"] = statistics.fmean(by_key[(approx, s)]["old_logp_gap"] for s in seeds)
        result["capped_fraction"] = statistics.fmean(by_key[(approx, s)]["capped_fraction"] for s in seeds)
        result["train_seconds_per_step"] = {
            name: statistics.fmean(by_key[(v, s)]["train_seconds"] / by_key[(v, s)]["steps"] for s in seeds)
            for name, v in (("approximate", approx), ("exact", exact))}
        out.append(result)
    return out


def plot_curves(task: str, runs: list[dict[str, Any]], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    gain = len({r["base_reference"] for r in runs}) > 1  # different bases: compare gains, not levels
    for variant in ORDER:
        group = [r for r in runs if r["variant"] == variant]
        if not group:
            continue
        n = min(len(r["curve"]) for r in group)
        acc = [[headline(e.get("reference", e["held_out"])) - (r["base_reference"] if gain else 0.0)
                for e in r["curve"][:n]] for r in group]
        mean = [statistics.fmean(col) for col in zip(*acc)]
        low, high = [min(col) for col in zip(*acc)], [max(col) for col in zip(*acc)]
        xs = {"rollouts": [e["rollouts"] for e in group[0]["curve"][:n]],
              "train_seconds": [statistics.fmean(r["curve"][i]["train_seconds"] for r in group) for i in range(n)]}
        for ax, key in zip(axes, ("rollouts", "train_seconds")):
            ax.plot(xs[key], mean, marker="o", ms=3, color=COLORS[variant],
                    label=f"{LABELS[variant]} ({len(group)} seeds)")
            ax.fill_between(xs[key], low, high, color=COLORS[variant], alpha=0.15)
    axes[0].set_xlabel("rollouts")
    axes[1].set_xlabel("training seconds (rollout + scoring + updates; runs shared one GPU)")
    axes[0].set_ylabel("reference-set accuracy, gain over step 0 (points)" if gain else "reference-set accuracy (%)")
    axes[0].legend(fontsize=7)
    what = "gain in greedy accuracy over each run's step 0" if gain else "greedy accuracy"
    fig.suptitle(f"{task}: {what} on the reference test set (mean over seeds, min-max band)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_steps(task: str, runs: list[dict[str, Any]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    variants = [v for v in ORDER
                if not v.startswith("diffu_grpo") and any(r["variant"] == v and r["steps_histogram"] for r in runs)]
    width = 0.8 / max(len(variants), 1)
    for i, variant in enumerate(variants):
        total: list[float] = []
        for run in (r for r in runs if r["variant"] == variant):
            total = add_counts(total, run["steps_histogram"])
        share = [100.0 * c / max(sum(total), 1) for c in total]
        ax.bar([j + i * width for j in range(len(share))], share, width=width, color=COLORS[variant],
               label=LABELS[variant])
    ax.set_xlabel("denoising step t (0 = first)")
    ax.set_ylabel("% of selected steps")
    ax.set_title(f"{task}: which steps were trained on (all seeds, all training steps)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="runs/replication")
    parser.add_argument("--images", default="docs/images")
    parser.add_argument("--data", default="docs/data/replication")
    parser.add_argument("--prefix", default="replication", help="file-name prefix of the figures")
    parser.add_argument("--best-diffu-grpo", metavar="TASK_DIR", default=None,
                        help="Only print the diffu-GRPO variant with the best held-out accuracy among TASK_DIR's runs.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.best_diffu_grpo:
        task_dir = Path(args.best_diffu_grpo)
        best = best_diffu_grpo([run for run in (load_run(d) for d in sorted(task_dir.glob("*-s*"))) if run])
        if best is None:
            parser.error(f"no finished diffu-GRPO run under {task_dir}: run the grid first, or name the variant "
                         "yourself (replication_gpu.sh: BEST_DIFFU=diffu_grpo)")
        sys.stdout.write(best + "\n")
        return
    images, data = Path(args.images), Path(args.data)
    images.mkdir(parents=True, exist_ok=True)
    data.mkdir(parents=True, exist_ok=True)
    for task_dir in sorted(p for p in Path(args.runs).iterdir() if p.is_dir() and not p.name.endswith("-base")):
        runs = [run for run in (load_run(d) for d in sorted(task_dir.iterdir()) if d.is_dir()) if run]
        if not runs:
            logger.warning("no finished runs under %s", task_dir)
            continue
        task = task_dir.name
        (data / f"{task}_runs.json").write_text(json.dumps(runs, indent=1))
        text = table(task, runs)
        (data / f"{task}_table.md").write_text(text)
        plot_curves(task, runs, images / f"{args.prefix}_{task}_curves.png")
        plot_steps(task, runs, images / f"{args.prefix}_{task}_steps.png")
        logger.info("%s\n%s", task, text)
        parity = cache_parity(runs)
        if parity:
            (data / f"{task}_cache_parity.json").write_text(json.dumps(parity, indent=1))
            for pair in parity:
                logger.info("%s: %s reaches %.0f%% of %s's reference gain (%.0f%% held-out), old-logp gap %.3f",
                            task, pair["approximate"], 100 * pair["share_of_exact_gain_reference"], pair["exact"],
                            100 * pair["share_of_exact_gain_held_out"], pair["old_logp_gap"])


if __name__ == "__main__":
    main()
