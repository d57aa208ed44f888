"""Summarise scripts/scaling_gpu.sh's runs: per-step time, rollouts/s, scaling efficiency, peak memory,
the 1- vs 2-GPU learning curves and the kill/resume comparison, as JSON and a markdown table.

    python scripts/scaling_report.py runs/scaling > runs/scaling/report.md
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

ROLLOUTS_PER_STEP = 64  # the global batch of every run (rl_sudoku.yaml and the demo config)


def metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def step_seconds(rows: list[dict]) -> float | None:
    """Median seconds per step after the first two (compilation and warm-up)."""
    times = [sum(v for k, v in r.items() if k.startswith("time/")) for r in rows[2:]]
    return statistics.median(times) if times else None


def main() -> None:
    out = Path(sys.argv[1])
    runs = {json.loads(line)["run"]: json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()}
    timing = {}
    for mode in ("ddp_lora", "ddp_full", "fsdp_lora", "fsdp_full"):
        for gpus in (1, 2):
            rows = metrics(out / f"{mode}_{gpus}gpu")
            seconds = step_seconds(rows)
            if seconds is None:
                continue
            timing[f"{mode}_{gpus}gpu"] = {
                "gpus": gpus, "step_s": round(seconds, 3), "steps_per_s": round(1 / seconds, 3),
                "rollouts_per_s": round(ROLLOUTS_PER_STEP / seconds, 1),
                "peak_gb_rank0": round(max(r.get("memory/peak_gb", 0) for r in rows), 2),
                "wall_s": runs.get(f"{mode}_{gpus}gpu", {}).get("seconds")}
    for name, entry in timing.items():
        mode = name.rsplit("_", 1)[0]
        base = timing.get("ddp_" + mode.split("_")[1] + "_1gpu")
        if entry["gpus"] == 2 and base:
            entry["speedup_vs_1gpu"] = round(base["step_s"] / entry["step_s"], 2)
            entry["scaling_efficiency"] = round(base["step_s"] / entry["step_s"] / 2, 2)
    curves = {}
    for name in ("curve_1gpu", "curve_2gpu", "killed_2gpu"):
        rows = metrics(out / name)
        curves[name] = {
            "eval": {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r},
            "eval_puzzles": {r["step"]: r.get("eval_puzzle_accuracy") for r in rows if "eval_accuracy" in r},
            "reward_last10": round(statistics.mean(r["reward/mean"] for r in rows[-10:]), 4) if rows else None,
            "steps": len(rows),
        }
    a, b = metrics(out / "curve_2gpu"), metrics(out / "killed_2gpu")
    same = [x["reward/mean"] == y["reward/mean"] for x, y in zip(a, b, strict=False)]
    kill = {"steps_compared": len(same), "identical_reward_steps": sum(same),
            "max_reward_diff": max((abs(x["reward/mean"] - y["reward/mean"]) for x, y in zip(a, b, strict=False)),
                                   default=None),
            "final_eval_uninterrupted": curves["curve_2gpu"]["eval"].get(50),
            "final_eval_killed_resumed": curves["killed_2gpu"]["eval"].get(50),
            "runs": {k: v for k, v in runs.items() if k.startswith("killed")}}
    report = {"timing": timing, "curves": curves, "kill_resume": kill}
    (out / "scaling.json").write_text(json.dumps(report, indent=1))
    lines = ["| run | GPUs | s/step | rollouts/s | speed-up | efficiency | peak GB (rank 0) |",
             "|---|---|---|---|---|---|---|"]
    for name, e in timing.items():
        lines.append(f"| {name} | {e['gpus']} | {e['step_s']} | {e['rollouts_per_s']} "
                     f"| {e.get('speedup_vs_1gpu', '-')} | {e.get('scaling_efficiency', '-')} | {e['peak_gb_rank0']} |")
    sys.stdout.write("\n".join(lines) + "\n\n" + json.dumps({"curves": curves, "kill_resume": kill}, indent=1) + "\n")


if __name__ == "__main__":
    main()
