"""Sharing a trained model: its model card, and the upload to the Hugging Face hub.

    write_model_card(folder, args, base_model="GSAI-ML/LLaDA-8B-Instruct", adapter=True, run_dir=run_dir)
    url = push_folder(folder, "me/llada-gsm8k-egspo-sa", private=True)

The card (README.md) says what the model is: its base model, the algorithm and its key settings, the data,
the evaluation table of the run and its training curve. Pushing goes through ``huggingface_hub``; offline
(:func:`egspo.models.hub.offline_reason`) it fails at once with a sentence, after the folder is written.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from egspo.config import ConfigError
from egspo.models.hub import offline_reason
from egspo.report import CURVE_FILE, REPORT_FILE, eval_keys

logger = logging.getLogger(__name__)


class HubError(ConfigError):
    """The hub cannot be reached or refused the upload; the message says what to do."""


def _card_yaml(base_model: str, adapter: bool, args: Any) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(
        base_model=None if base_model.startswith(("builtin:", "/", ".")) else base_model,
        library_name="peft" if adapter else "transformers",
        tags=["egspo", "diffusion-language-model", "reinforcement-learning", args.algorithm, args.task],
    )
    return data.to_yaml()


def write_model_card(folder: str | Path, args: Any, *, base_model: str, adapter: bool, run_dir: str | Path) -> Path:
    """Write ``folder/README.md`` (and copy the run's training curve next to it)."""
    from egspo.rl.metrics import read_metrics

    folder, run_dir = Path(folder), Path(run_dir)
    metrics_file = run_dir / "metrics.jsonl"
    rows = read_metrics(metrics_file) if metrics_file.is_file() else []
    curve = run_dir / CURVE_FILE
    if curve.is_file() and curve.resolve() != (folder / CURVE_FILE).resolve():
        shutil.copyfile(curve, folder / CURVE_FILE)
    data = args.train_file or f"the {args.task} task's generator ({args.num_train} problems)"
    what = "A LoRA adapter" if adapter else "Full weights"
    settings = [
        ("algorithm", args.algorithm), ("num_generations (G)", args.num_generations),
        ("learning_rate", args.learning_rate), ("beta (KL)", args.beta),
        ("epsilon / epsilon_high", f"{args.epsilon} / {args.epsilon_high}"),
        ("max_completion_length / block_length / diffusion_steps",
         f"{args.max_completion_length} / {args.block_length} / {args.diffusion_steps}"),
        ("temperature", args.temperature), ("steps trained", rows[-1]["step"] if rows else 0),
    ]
    if args.algorithm != "diffu_grpo":
        settings[1:1] = [("selected steps K", f"{args.num_selected_steps} ({args.step_selection})"),
                         ("stepwise_lambda", args.stepwise_lambda)]
    if adapter:
        settings.append(("LoRA r / alpha", f"{args.lora_r} / {args.lora_alpha}"))
    lines = [
        "---", _card_yaml(base_model, adapter, args).strip(), "---", "",
        f"# {Path(folder).resolve().name}", "",
        f"{what} trained from `{base_model}` with egspo ({args.algorithm}) on {args.task}, data: {data}.", "",
        "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in settings], "",
    ]
    evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
    if evals:
        keys = eval_keys(rows)
        lines += ["## Evaluation", "", "| step | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
                  *[f"| {r['step']} | " + " | ".join(f"{r[k]:.4g}" if isinstance(r.get(k), (int, float)) else "-"
                                                     for k in keys) + " |" for r in evals], ""]
    if (folder / CURVE_FILE).is_file():
        lines += ["## Training", "", f"![training curve]({CURVE_FILE})", ""]
    if (run_dir / REPORT_FILE).is_file():
        lines += [f"The run's own report: `{REPORT_FILE}` in its output directory.", ""]
    lines += ["## Use", "", "```python", "import egspo",
              f"from egspo.evaluate import load_variant  # base + {'adapter' if adapter else 'weights'}",
              f"dlm, tokenizer = load_variant({base_model!r}, {str(folder)!r})" if adapter else
              f"dlm, tokenizer = load_variant({str(folder)!r})",
              "print(egspo.generate(dlm, tokenizer, 'your prompt'))", "```", ""]
    path = folder / "README.md"
    path.write_text("\n".join(lines))
    return path


def push_folder(folder: str | Path, repo_id: str, *, private: bool, commit_message: str) -> str:
    """Upload ``folder`` (without checkpoints) to the hub repository ``repo_id``; returns its URL."""
    reason = offline_reason()
    if reason is not None:
        raise HubError(f"Cannot push to the hub: {reason}. The model is saved in {folder}; push it later with "
                       f"`huggingface-cli upload {repo_id} {folder}` when online.")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=os.environ.get("HF_TOKEN"))
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message=commit_message,
                          ignore_patterns=["checkpoint-*", ".tmp-*", "*.pt"])
    except HfHubHTTPError as exc:
        raise HubError(f"The hub refused the upload to {repo_id}: {exc}. Log in with `huggingface-cli login` "
                       "or set HF_TOKEN.") from exc
    logger.info("Pushed %s to %s", folder, url)
    return str(url)
