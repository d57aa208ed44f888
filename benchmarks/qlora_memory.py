"""Memory budgets: one EGSPO-SA training step of an 8B-shaped random LLaDA under a capped GPU memory.

    PYTHONPATH=src python benchmarks/qlora_memory.py            # GPU: bf16 at 24 GB, 4-bit (QLoRA) at 16 GB
    PYTHONPATH=src python benchmarks/qlora_memory.py --smoke    # CPU: the plumbing on a tiny shape, no bitsandbytes

Each case runs in its own process (so that the memory cap and the CUDA allocator start clean), through
``EGSPOTrainer`` with ``max_memory_gb`` set: the planner (egspo.memory) decides gradient checkpointing before
the weights load, and the process's memory is capped to the budget with
``torch.cuda.set_per_process_memory_fraction``. Settings are the paper's EGSPO-SA step: 6 rollouts of one
group, prompt 200 tokens, completion 256, block 32, T = 128, K = 8, LoRA r 128 / alpha 64 on the default
targets, beta 0.04, accumulation 2, a vectorised stand-in reward.

- ``bf16``: the random model is built on the GPU in bf16 and handed to the trainer;
- ``4bit``: the random model is written with ``save_pretrained`` to a temporary directory (before the cap),
  then loaded back by the trainer with ``load_in_4bit=true`` (NF4, double quantisation, bf16 compute).

Prints one JSON object (and writes it to ``$OUT/qlora_memory.json`` when OUT is set): per case the seconds
of each step (the first includes warm-up), the phase times, the peak allocated and reserved memory of the
steps, the planner's choices and estimate, and estimate / measured.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import SHAPES, random_llada  # noqa: E402

from egspo.config import EGSPOConfig  # noqa: E402
from egspo.memory import GB  # noqa: E402
from egspo.models.tokenizer import build_char_tokenizer  # noqa: E402

#: (case, budget in GB) of the GPU run.
CASES = (("bf16", 24.0), ("4bit", 16.0))
PAPER = {"rows": 6, "prompt": 200, "completion": 256, "block": 32, "steps": 128, "k": 8}
SMOKE = {"rows": 4, "prompt": 16, "completion": 32, "block": 16, "steps": 4, "k": 2}


def stand_in_reward(prompts: list[Any], completions: list[str], completion_ids: list[list[int]],
                    **columns: Any) -> list[float]:
    """Share of even token ids: cheap, and varied enough that groups have a spread."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def run_config(case: str, budget: float, out_dir: Path, smoke: bool) -> EGSPOConfig:
    s = SMOKE if smoke else PAPER
    return EGSPOConfig(
        model_name_or_path="random-llada", output_dir=str(out_dir), task="custom", algorithm="egspo_sa",
        num_generations=s["rows"], per_device_train_batch_size=s["rows"], max_prompt_length=s["prompt"],
        max_completion_length=s["completion"], block_length=s["block"], diffusion_steps=s["steps"],
        num_selected_steps=s["k"], lora_r=128, lora_alpha=64, lora_dropout=0.0, beta=0.04,
        gradient_accumulation_steps=2, learning_rate=3e-5, max_steps=2, save_steps=0,
        load_in_4bit=case == "4bit" and not smoke, max_memory_gb=budget,
    )


def run_case(case: str, budget: float, steps: int, smoke: bool, compile_probe: bool = False) -> dict[str, Any]:
    """One case in this process: build (and for 4-bit save) the model, cap memory, construct the trainer, time
    ``steps`` training steps and compare the planner's estimate with the measured peak."""
    tmp = Path(tempfile.mkdtemp(prefix="qlora_memory_"))
    try:
        return _run_case(case, budget, steps, smoke, tmp, compile_probe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run_case(case: str, budget: float, steps: int, smoke: bool, tmp: Path, compile_probe: bool) -> dict[str, Any]:
    from egspo.rl.trainer import EGSPOTrainer

    device = torch.device("cpu" if smoke else "cuda")
    cuda = device.type == "cuda"
    s = SMOKE if smoke else PAPER
    result: dict[str, Any] = {"case": case, "budget_gb": budget, "shape": "tiny" if smoke else "llada-8b",
                              "device": torch.cuda.get_device_name(device) if cuda else "cpu", **s, "lora_r": 128}
    tokenizer = build_char_tokenizer()
    model = _model(case, result, device, tokenizer, budget, tmp)
    t0 = time.perf_counter()
    try:
        trainer = EGSPOTrainer(model=model, reward_funcs=[stand_in_reward], train_dataset=_prompts(s["prompt"]),
                               args=run_config(case, budget, tmp / "run", smoke),
                               processing_class=tokenizer if case == "bf16" else None)
    except Exception as exc:  # noqa: BLE001  (reported in the JSON: a refusal or an OOM while loading)
        return {**result, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    result["seconds_setup"] = round(time.perf_counter() - t0, 1)
    plan = trainer.memory_plan
    result["plan"] = plan.to_dict() if plan is not None else None
    if cuda:
        result["load_peak_gb"] = round(torch.cuda.max_memory_allocated() / GB, 3)
        result["after_load_gb"] = round(torch.cuda.memory_allocated() / GB, 3)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    peaks: dict[str, int] = {}
    if cuda:
        _record_phase_peaks(trainer, peaks)
    result.update(_time_steps(trainer, steps, cuda))
    if cuda:
        peaks["step"] = max(peaks.values(), default=0)
        result["measured_peak_gb"] = {k.strip("_"): round(v / GB, 3) for k, v in peaks.items()}
        result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GB, 3)
        if plan is not None and peaks.get("step"):
            estimate = plan.estimate
            result["estimate_over_measured"] = {
                "step": round(estimate.peak / peaks["step"], 3),
                "rollout": round(estimate.rollout_peak / max(peaks.get("_rollout_and_score", 1), 1), 3),
                "update": round(max(estimate.update_peak, estimate.optimizer_peak)
                                / max(peaks.get("_update_egspo", 1), 1), 3)}
    if compile_probe and "error" not in result:
        result["compile_probe"] = _compile_probe(trainer, s)
    return result


def _prompts(length: int) -> list[dict[str, str]]:
    """Four random prompts of ``length`` characters (one token each under the character tokenizer)."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    generator = torch.Generator().manual_seed(0)
    return [{"prompt": "".join(alphabet[i] for i in torch.randint(0, len(alphabet), (length,),
                                                                    generator=generator).tolist())}
            for _ in range(4)]


def _model(case: str, result: dict[str, Any], device: torch.device, tokenizer: Any, budget: float,
           tmp: Path) -> Any:
    """What the trainer gets: the bf16 model itself (built under the cap), or for 4-bit the directory the
    random model was written to (before the cap, as its bf16 weights are larger than it)."""
    cuda = device.type == "cuda"
    shape = result["shape"]
    dtype = torch.bfloat16 if cuda else torch.float32

    def cap() -> None:
        if cuda:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(budget * GB / total, torch.cuda.current_device())

    if case == "bf16":
        cap()
        model = random_llada(shape, device, dtype).model
    else:
        t0 = time.perf_counter()
        random_llada(shape, device, dtype).model.save_pretrained(tmp / "model", max_shard_size="4GB")
        tokenizer.save_pretrained(tmp / "model")
        result["seconds_save"] = round(time.perf_counter() - t0, 1)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        cap()
        model = str(tmp / "model")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    return model


def _record_phase_peaks(trainer: Any, peaks: dict[str, int]) -> None:
    """Wrap the trainer's rollout and update phases to record each one's peak allocated memory."""
    for name in ("_rollout_and_score", "_update_egspo"):
        method = getattr(trainer, name)

        def wrapped(*args: Any, _method: Any = method, _name: str = name, **kwargs: Any) -> Any:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            try:
                return _method(*args, **kwargs)
            finally:
                torch.cuda.synchronize()
                peaks[_name] = max(peaks.get(_name, 0), torch.cuda.max_memory_allocated())

        setattr(trainer, name, wrapped)


def _time_steps(trainer: Any, steps: int, cuda: bool) -> dict[str, Any]:
    """Seconds and phase times of ``steps`` training steps (an out-of-memory error is reported, not raised)."""
    out: dict[str, Any] = {"seconds_per_step": [], "phase_seconds": []}
    try:
        for step in range(steps):
            t0 = time.perf_counter()
            metrics = trainer.step(step)
            if cuda:
                torch.cuda.synchronize()
            out["seconds_per_step"].append(round(time.perf_counter() - t0, 2))
            out["phase_seconds"].append({k: round(v, 2) for k, v in metrics.items() if k.startswith("time/")})
            out["reward_mean"] = metrics["reward/mean"]
    except torch.cuda.OutOfMemoryError as exc:
        out["error"] = f"OutOfMemoryError after {len(out['seconds_per_step'])} step(s): {exc}"[:2000]
    return out


def _compile_probe(trainer: Any, s: dict[str, int]) -> dict[str, Any]:
    """Whether torch.compile runs the trainer's model (a quantised one: compile_rollout is refused for it
    today) at the rollout's shape, and how far its features are from the eager ones."""
    dlm = trainer.dlm
    ids = torch.randint(4, 100, (s["rows"], s["prompt"] + s["completion"]), device=dlm.device)
    try:
        with torch.no_grad(), dlm.evaluating(), trainer.accelerator.autocast():
            eager = dlm.encode(ids)
            t0 = time.perf_counter()
            compiled = dlm.encode(ids, model=dlm.compiled_model())
            first = time.perf_counter() - t0
        diff = (compiled.float() - eager.float()).abs().max().item() / eager.float().std().item()
        return {"ok": True, "seconds_first_call": round(first, 1), "max_diff_over_std": round(diff, 4)}
    except Exception as exc:  # noqa: BLE001  (what fails is the finding)
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1500]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shape, no quantisation: the plumbing only")
    parser.add_argument("--steps", type=int, default=2, help="training steps per case (the first one warms up)")
    parser.add_argument("--case", choices=[c for c, _ in CASES], help="run one case in this process (internal)")
    parser.add_argument("--budget-gb", type=float, help="with --case: the memory budget")
    parser.add_argument("--compile-probe", action="store_true",
                        help="after the steps, try torch.compile of the (quantised) model at the rollout shape")
    args = parser.parse_args()
    if args.case:
        try:
            result = run_case(args.case, args.budget_gb, args.steps, args.smoke, args.compile_probe)
        except Exception as exc:  # noqa: BLE001
            result = {"case": args.case, "error": f"{type(exc).__name__}: {exc}"[:2000],
                      "traceback": traceback.format_exc()[-3000:]}
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        return
    results = []
    for case, budget in CASES:
        budget = 8.0 if args.smoke else budget  # on CPU the budget is only planned, never enforced
        command = [sys.executable, __file__, "--case", case, "--budget-gb", str(budget), "--steps", str(args.steps)]
        command += ["--smoke"] * args.smoke + ["--compile-probe"] * args.compile_probe
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if lines:
            result = json.loads(lines[-1][len("RESULT "):])
        else:
            result = {"case": case, "error": f"exit status {done.returncode}", "stderr": done.stderr[-3000:]}
        result["seconds_case"] = round(time.perf_counter() - t0, 1)
        results.append(result)
        sys.stderr.write(f"{case}: {json.dumps(result)[:400]}\n")
    report = {"benchmark": "qlora_memory", "smoke": args.smoke,
              "shape": SHAPES["tiny" if args.smoke else "llada-8b"], "cases": results}
    text = json.dumps(report, indent=1)
    sys.stdout.write(text + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "qlora_memory.json").write_text(text)


if __name__ == "__main__":
    main()
