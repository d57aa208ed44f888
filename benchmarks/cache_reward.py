"""Reward of the exact rollout against the approximate KV-cached ones (``rollout_cache``) on a task.

    PYTHONPATH=src python benchmarks/cache_reward.py                      # builtin Sudoku model, CPU-sized
    PYTHONPATH=src python benchmarks/cache_reward.py --model /path/LLaDA-8B-Instruct --task gsm8k \
        --n 192 --gen-length 256 --block 32 --steps 128 --batch 48

Samples the same prompts with the same seeds under each cache mode and prints one JSON object:
mean reward and accuracy per mode, and the mean |approximate - exact| step log-prob over all model
steps (the mismatch the trainer corrects for the selected steps).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from egspo.config import ModelConfig, SamplerConfig
from egspo.models.loading import load_model
from egspo.rl.batching import encode_prompts
from egspo.rl.estimators import action_logps
from egspo.rl.rewards import RewardScorer
from egspo.sampling import sample
from egspo.tasks import format_prompt, get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:sudoku-tiny")
    parser.add_argument("--task", default="sudoku")
    parser.add_argument("--task-option", action="append", default=[], help="key=value (sudoku: compact=true)")
    parser.add_argument("--n", type=int, default=128, help="prompts")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=200)
    parser.add_argument("--gen-length", type=int, default=24)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--caches", default="none,prefix,dual")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    options = {k: v.lower() == "true" if v.lower() in ("true", "false") else v
               for k, v in (opt.split("=", 1) for opt in args.task_option)}
    if args.task == "sudoku" and not args.task_option:
        options = {"compact": True}  # the prompt format the builtin model was trained on
    dlm, tokenizer = load_model(ModelConfig(name_or_path=args.model, lora=False), device=device)
    dlm.model.eval()
    task = get_task(args.task)
    rows = task.load(None, "test", args.n, args.seed, **options)
    scorer = RewardScorer.for_task(task)
    result: dict[str, object] = {"benchmark": "cache_reward", "model": args.model, "task": args.task,
                                 "n": len(rows), "gen_length": args.gen_length, "block": args.block,
                                 "steps": args.steps, "temperature": args.temperature}
    for cache in args.caches.split(","):
        cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block, steps=args.steps,
                            temperature=args.temperature, cache=cache)
        rewards, accuracy, gaps = [], [], []
        for start in range(0, len(rows), args.batch):
            chunk = rows[start : start + args.batch]
            prompts = [format_prompt(tokenizer, task.messages(row)) for row in chunk]
            ids, mask = encode_prompts(tokenizer, prompts, args.max_prompt_length, device)
            generator = torch.Generator(device=device).manual_seed(args.seed * 1000 + start)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                traj = sample(dlm, ids, cfg, attention_mask=mask, generator=generator, record_greedy=False)
                with torch.no_grad():
                    exact = torch.stack([action_logps(dlm, traj, torch.full((len(chunk),), t, device=device))[0]
                                         for t in range(cfg.steps)], dim=1).float()
            valid = traj.valid_steps
            gaps.append(((traj.step_logps - exact).abs() * valid).sum() / valid.sum().clamp_min(1))
            texts = tokenizer.batch_decode(traj.completions, skip_special_tokens=True)
            rewards.append(scorer.score(prompts, texts, chunk)[0])
            accuracy.append(task.metrics(texts, chunk)["accuracy"] * len(chunk))
        result[cache] = {
            "reward_mean": round(float(torch.cat(rewards).mean()), 4),
            "accuracy": round(sum(accuracy) / len(rows), 3),
            "step_logp_gap": round(float(torch.stack(gaps).mean()), 5),
        }
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
