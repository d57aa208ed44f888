"""Phases of one EGSPO-SA training step on a random-weight LLaDA-shaped model, for several rollout modes
side by side in one process (docs/algorithm.md#diffusion-mdp, #approximate-rollouts, #merged-lora-rollouts).

    PYTHONPATH=src python benchmarks/train_step.py --shape llada-8b --batch 6 --k 8 --lora-r 128 \
        --modes none,dual --compile                      # the exact and the cached step, one JSON line each
    PYTHONPATH=src python benchmarks/train_step.py --shape llada-8b --batch 48 --k 8 --lora-r 128 --grad-ckpt

Runs the library's own pieces in the trainer's order: rollout (the sampler with greedy completions; a LoRA
model's rollout on its merged copy unless ``--no-merge``, resynced after the previous mode's optimizer
steps, as in training), step selection + greedy-completion scoring (a vectorised stand-in reward: the real
cost of a task's reward function is the task's), for a cached mode the exact forwards of the selected
steps that the trainer runs (``exact_step_outputs`` through the rollout's module: old log-probs and greedy
completions), reference
log-probs (adapter disabled), K micro-batch updates (forward + backward of one selected step for all
rows, LM head only at the committed positions) and the AdamW steps.

``--modes`` is a comma-separated list of ``rollout_cache`` values, each optionally with a refresh
interval: ``none``, ``prefix``, ``dual``, ``dual:4`` (``rollout_cache_refresh=4``). Each mode is warmed up
(compiled shapes included) before it is timed. Prints one JSON line per mode (seconds, TFLOP/s and MFU
per phase, tokens/s, peak memory) and a last line comparing the modes' whole steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import PEAK_TFLOPS, add_shape_arguments, forward_flops, random_llada  # noqa: E402

from egspo.config import ModelConfig, SamplerConfig  # noqa: E402
from egspo.models.adapter import DiffusionLM  # noqa: E402
from egspo.models.lora import prepare_for_training  # noqa: E402
from egspo.rl.advantages import stepwise_advantages  # noqa: E402
from egspo.rl.estimators import action_logps, exact_step_outputs  # noqa: E402
from egspo.rl.losses import egspo_step_loss  # noqa: E402
from egspo.rl.selection import select_steps  # noqa: E402
from egspo.sampling import rollout_module, sample  # noqa: E402


def parse_mode(mode: str) -> tuple[str, int]:
    cache, _, refresh = mode.partition(":")
    if cache not in ("none", "prefix", "dual") or (refresh and not refresh.isdigit()):
        raise SystemExit(f"--modes: {mode!r} is not none, prefix, dual or CACHE:N (a refresh interval).")
    return cache, int(refresh or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_shape_arguments(parser)
    parser.add_argument("--group", type=int, default=8, help="G; a batch smaller than G is one partial group")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lora-r", type=int, default=128)
    parser.add_argument("--grad-ckpt", action="store_true")
    parser.add_argument("--modes", default="none", help="comma-separated: none, prefix, dual, dual:N (refresh)")
    parser.add_argument("--cache", default=None, choices=["none", "prefix", "dual"], help="one mode (old flag)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the rollout forward")
    parser.add_argument("--no-merge", action="store_true", help="roll out through the LoRA adapter (unmerged)")
    parser.add_argument("--repeat", type=int, default=1, help="timed steps per mode (the figures are the last)")
    args = parser.parse_args()
    modes = [parse_mode(m) for m in ([args.cache] if args.cache else args.modes.split(","))]

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    dlm = random_llada(args.shape, device, dtype)
    model_cfg = ModelConfig(name_or_path="random", lora=True, lora_r=args.lora_r, lora_alpha=64,
                            lora_dropout=0.0, gradient_checkpointing=args.grad_ckpt)
    dlm = prepare_for_training(dlm, model_cfg, need_reference=False)
    params = [p for p in dlm.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-5, betas=(0.9, 0.99), weight_decay=0.1)
    vocab = dlm.core.config.vocab_size
    prompts = torch.randint(0, min(vocab - 1000, 120000), (args.batch, args.prompt_len), device=device)
    results = []
    for cache, refresh in modes:
        for _ in range(args.repeat + 1):  # the first pass warms up (kernels, allocator, compiled shapes)
            result = one_step(args, dlm, optimizer, params, prompts, cache, refresh, cuda)
        results.append(result)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
    first = results[0]["seconds_total"]
    summary = {"benchmark": "train_step_modes", "shape": args.shape, "batch": args.batch, "compile": args.compile,
               "merge_lora": not args.no_merge,
               "whole_step_s": {r["mode"]: r["seconds_total"] for r in results},
               "speedup_vs_first": {r["mode"]: round(first / r["seconds_total"], 2) for r in results}}
    sys.stdout.write(json.dumps(summary) + "\n")


def one_step(args: argparse.Namespace, dlm: DiffusionLM, optimizer: torch.optim.Optimizer,
             params: list[torch.nn.Parameter], prompts: torch.Tensor, cache: str, refresh: int, cuda: bool) -> dict:
    """One timed training step in ``cache`` mode; returns its JSON record."""
    device = prompts.device
    cfg = SamplerConfig(gen_length=args.gen_length, block_length=args.block, steps=args.steps, temperature=0.9,
                        cache=cache, cache_refresh=refresh, compile=args.compile, merge_lora=not args.no_merge)
    gen = torch.Generator(device=device).manual_seed(0)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    sync()
    base_mem = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    rollout_dlm = dlm.for_rollout(cfg.merge_lora)  # resyncs the merged copy after the last optimizer steps
    sync()
    merge_sync = time.perf_counter() - t0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        # the trainer records greedy completions only for the exact rollout (a cached one recomputes them)
        traj = sample(dlm, prompts, cfg, generator=gen, record_greedy=cache == "none")
    sync()
    timings["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    selected = select_steps(traj.step_entropy, args.k, "high_entropy", valid_steps=traj.valid_steps)
    steps_sel = selected.steps.to(device)
    old_logps = traj.step_logps.gather(1, steps_sel)
    greedy = traj.greedy_completions(selected.steps) if cache == "none" else None
    sync()
    timings["score"] = time.perf_counter() - t0
    old_logp_gap = None
    if cache != "none":
        # the trainer's correction of an approximate rollout: one exact forward per slot, eval mode, no grad
        t0 = time.perf_counter()
        model = rollout_module(rollout_dlm, cfg)  # the rollout's policy (merged, compiled), without the cache
        with torch.no_grad(), rollout_dlm.evaluating(), \
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            outputs = [exact_step_outputs(rollout_dlm, traj, steps_sel[:, k], model=model)
                       for k in range(steps_sel.shape[1])]
        exact = torch.stack([logp.float() for logp, _ in outputs], dim=1)
        greedy = torch.stack([tokens for _, tokens in outputs], dim=1)
        is_weights = (exact - old_logps.float()).exp().clamp(max=2.0)
        old_logp_gap = float((exact - old_logps.float()).abs().mean())
        old_logps = exact
        sync()
        timings["old_logps"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # stand-in reward: share of even token ids (vectorised); a task's reward costs what the task costs
    rewards = (traj.completions % 2 == 0).float().mean(1)
    greedy_rewards = (greedy % 2 == 0).float().mean(2)
    group = min(args.group, args.batch)
    usable = args.batch - args.batch % group
    adv = torch.zeros(args.batch, selected.steps.shape[1], device=device)
    adv[:usable] = stepwise_advantages(rewards[:usable], greedy_rewards[:usable], group, 0.5,
                                       weights=selected.weights[:usable].to(device)).to(device)
    weights = selected.weights.to(device).float()
    if cache != "none":
        weights = weights * is_weights
    sync()
    timings["score"] += time.perf_counter() - t0

    t0 = time.perf_counter()
    refs = []
    with torch.no_grad(), dlm.reference_model() as ref, torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for k in range(selected.steps.shape[1]):
            refs.append(action_logps(dlm, traj, selected.steps[:, k], model=ref)[0])
    sync()
    timings["reference"] = time.perf_counter() - t0

    t_update, t_opt = 0.0, 0.0
    dlm.model.train()
    for k in range(selected.steps.shape[1]):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            logp, ntok, _, _ = action_logps(dlm, traj, selected.steps[:, k])
            loss, _ = egspo_step_loss(logp, old_logps[:, k], refs[k], adv[:, k], weights[:, k], ntok,
                                      eps_low=0.2, eps_high=0.5, beta=0.04)
            (loss / args.grad_accum).backward()
        sync()
        t_update += time.perf_counter() - t0
        if (k + 1) % args.grad_accum == 0:
            t0 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 0.2)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            sync()
            t_opt += time.perf_counter() - t0
    timings["updates"] = t_update
    timings["optimizer"] = t_opt
    total = sum(timings.values())

    length = args.prompt_len + args.gen_length
    k = selected.steps.shape[1]
    per_forward = forward_flops(dlm, args.batch, length, head_positions=0)
    flops = {"rollout": args.steps * per_forward, "reference": k * per_forward,
             "updates": 3 * k * per_forward}  # forward + backward counted as 3 forwards (the convention)
    if "old_logps" in timings:
        flops["old_logps"] = k * per_forward
    peak = PEAK_TFLOPS[device.type]
    mode = cache + (f":{refresh}" if refresh else "")
    result: dict = {
        "benchmark": "train_step", "mode": mode, "shape": args.shape,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch": args.batch, "k": k, "lora_r": args.lora_r, "grad_ckpt": args.grad_ckpt,
        "cache": cache, "cache_refresh": refresh, "compile": args.compile, "merge_lora": not args.no_merge,
        "prompt_len": args.prompt_len, "gen_length": args.gen_length, "block": args.block, "steps": args.steps,
        "seconds": {name: round(v, 4) for name, v in timings.items()},
        "rollout_merge_sync_s": round(merge_sync, 4),  # part of "rollout"
        "seconds_total": round(total, 3),
        "tflops": {name: round(flops[name] / timings[name] / 1e12, 1) for name in flops},
        "mfu": {name: round(flops[name] / timings[name] / 1e12 / peak, 4) for name in flops},
        "tokens_per_s": round(args.batch * length / total, 1),
    }
    if old_logp_gap is not None:
        result["old_logp_gap"] = round(old_logp_gap, 5)
    if cuda:
        result["peak_extra_memory_gb"] = round((torch.cuda.max_memory_allocated() - base_mem) / 2**30, 3)
        result["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return result


if __name__ == "__main__":
    main()
