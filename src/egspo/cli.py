"""The ``egspo`` command line: thin wrappers that parse arguments, call the library and report.

    egspo demo [--out DIR] [section.field=value ...]   the built-in default job (CPU, minutes)
    egspo config [--config FILE] [section.field=value ...]   print the resolved configuration
    egspo new-model --preset tiny --out DIR [--seed N]   write a random-init model + tokenizer
    egspo train --config FILE [--resume] [section.field=value ...]   RL fine-tuning
    egspo sft --config FILE [--resume] [section.field=value ...]     masked-diffusion SFT
    egspo eval --model M [--adapter DIR | --checkpoints RUN] --task T [--gen-lengths 128,256,512]   evaluation
    egspo score --task T --input FILE.jsonl [--output FILE.jsonl]   score finished completions
    egspo generate --model M (--prompt TEXT ... | --input FILE) [--show-steps]   generate completions
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

import yaml

from egspo.config import ConfigError, load_config

logger = logging.getLogger("egspo")


def _cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _cmd_training(args: argparse.Namespace) -> int:
    """`egspo train` and `egspo sft`: the same run life cycle around a different loop."""
    from egspo.rl.distributed import leave_gloo_group

    if args.command == "train":
        from egspo.rl.trainer import train as run
    else:
        from egspo.sft import sft as run

    cfg = load_config(args.config, args.overrides)
    run_dir = run(cfg, resume=args.resume)
    logger.info("Run directory: %s", run_dir)
    leave_gloo_group()
    return 0


def _cmd_new_model(args: argparse.Namespace) -> int:
    from egspo.models.tiny import new_model

    out = new_model(args.out, preset=args.preset, seed=args.seed)
    logger.info("Load it with model.name_or_path=%s", out)
    return 0


def _gen_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers (128,256,512).") from None
    if not lengths or min(lengths) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive completion lengths, e.g. 128,256,512.")
    return lengths


def _cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from egspo.evaluate import evaluate, format_table, process_state

    cfg = load_config(args.config, args.overrides)
    flags = {"gen_lengths": args.gen_lengths, "block_length": args.block_length, "steps_ratio": args.steps_ratio,
             "batch_size": args.batch_size, "limit": args.limit}
    eval_cfg = dataclasses.replace(cfg.eval, **{k: v for k, v in flags.items() if v is not None})
    model_cfg = dataclasses.replace(cfg.model, name_or_path=args.model) if args.model else cfg.model
    output = args.output or (str(Path(args.checkpoints) / "eval") if args.checkpoints else "evals")
    task = args.task or cfg.task.name
    # the config's data file and task options belong to its own task only
    same_task = task == cfg.task.name
    summary = evaluate(
        model_cfg, task, eval_cfg=eval_cfg, output_dir=output,
        adapter=args.adapter, checkpoints=args.checkpoints,
        data=args.data or (cfg.task.eval_file if same_task else None),
        num_eval=args.num_eval or cfg.task.num_eval, seed=cfg.train.seed if args.seed is None else args.seed,
        task_options=cfg.task.options if same_task else None,
    )
    if process_state().is_main_process:
        sys.stdout.write(f"{summary['task']} accuracy (%)\n{format_table(summary)}\n")
        logger.info("Generations, metrics and summary.json in %s%s", output,
                    f"; plot {summary['plot']}" if summary["plot"] else "")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    import json

    from egspo.rl.rewards import RewardError
    from egspo.scoring import score_file
    from egspo.tasks import get_task
    from egspo.tasks.data import DataError

    try:
        summary = score_file(get_task(args.task), args.input, args.output)
    except (DataError, RewardError) as exc:
        logger.error("%s", exc)
        return 2
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    import json
    import time

    import torch

    from egspo.evaluate import load_variant
    from egspo.generation import denoising_frames, generate, read_prompts, row_prompt

    if args.prompt:
        rows = [{"prompt": text} for text in args.prompt]
    elif args.input:
        rows = read_prompts(args.input)
    else:
        raise ConfigError("Nothing to generate from: give --prompt TEXT (repeatable) or --input FILE.jsonl|txt.")
    if args.delay < 0:
        raise ConfigError(f"--delay {args.delay} must be >= 0 seconds.")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dlm, tokenizer = load_variant(args.model, args.adapter, device=device)
    # texts go through the chat template when the tokenizer has one, unless --raw
    chat_template = True if not args.raw and getattr(tokenizer, "chat_template", None) else None
    texts, traj = generate(
        dlm, tokenizer, [row_prompt(row) for row in rows], gen_length=args.gen_length,
        block_length=args.block_length, steps=args.steps, temperature=args.temperature, remasking=args.remasking,
        chat_template=chat_template, seed=args.seed, batch_size=args.batch_size, return_trajectory=True,
    )
    if args.show_steps:
        tty = sys.stdout.isatty()
        frames = denoising_frames(tokenizer, traj, placeholder=_mask_glyph(),
                                  highlight=(lambda text: f"\x1b[1m{text}\x1b[0m") if tty else None)
        for step, frame in enumerate(frames, 1):
            # on a terminal each frame replaces the last (clear screen, cursor home)
            sys.stdout.write(("\x1b[2J\x1b[H" if tty else "") + f"--- step {step}/{len(frames)} ---\n"
                             f"{_numbered(frame)}\n")
            sys.stdout.flush()
            if tty and step < len(frames):
                time.sleep(args.delay)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({**row, "completion": text}, ensure_ascii=False) + "\n"
                         for row, text in zip(rows, texts, strict=True))
        logger.info("Wrote %d completion(s) to %s", len(texts), args.output)
    elif not args.show_steps:
        sys.stdout.write(_numbered(texts) + "\n")
    return 0


def _numbered(texts: Sequence[str]) -> str:
    """One text as it is; several each prefixed with [i] (1-based)."""
    if len(texts) == 1:
        return texts[0]
    return "\n".join(f"[{i}] {text}" for i, text in enumerate(texts, 1))


def _mask_glyph() -> str:
    """How a still-masked token is shown: a shaded block where stdout can encode it, else an underscore."""
    try:
        "░".encode(sys.stdout.encoding or "ascii")
    except (UnicodeEncodeError, LookupError):
        return "_"
    return "░"


def _cmd_demo(args: argparse.Namespace) -> int:
    from egspo.demo import format_table, run_demo

    results = run_demo(args.overrides, args.out)
    sys.stdout.write("\n" + format_table(results["base"], results["trained"]) + "\n")
    sys.stdout.write(f"\nTotal {results['total_seconds']:.0f} s. Report: {results['report']}\n")
    return 0


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (sections: model, sampler, rl, task, train, eval).")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.field=value",
        help="Overrides applied after the file, e.g. rl.beta=0.0 train.max_steps=10.",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="egspo",
        description="RL fine-tuning of diffusion language models: EGSPO-SA and diffu-GRPO.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="The built-in default: EGSPO-SA on 4x4 Sudoku from the shipped tiny model, on CPU, in minutes.",
        description="Evaluate the shipped tiny Sudoku model, train it with EGSPO-SA, evaluate again, and write a "
        "table, a training curve (PNG) and report.md into the run directory.",
    )
    p.add_argument("--out", default=None, help="Run directory (default: runs/demo, or runs/demo-N if taken).")
    p.add_argument("overrides", nargs="*", metavar="section.field=value",
                   help="Overrides of the packaged demo config, e.g. train.max_steps=20.")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config", help="Print the resolved configuration (defaults + file + overrides).")
    _add_config_args(p)
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "train", help="RL fine-tuning (EGSPO-SA, EGSPO or diffu-GRPO); run under `accelerate launch` for several GPUs.",
        description="RL fine-tuning of a diffusion LM. Checkpoints, metrics.jsonl and the resolved config.yaml "
        "go to train.output_dir; SIGTERM/Ctrl-C saves a checkpoint and exits; --resume continues exactly.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in train.output_dir.")
    p.set_defaults(func=_cmd_training)

    p = sub.add_parser(
        "sft", help="Masked-diffusion SFT on a task's reference completions or a prompt/completion jsonl.",
        description="Completion-only masked-diffusion SFT (LLaDA/d1 recipe). Uses the model, sampler (gen_length "
        "= padded completion length), task and train sections of the config; same checkpoints and --resume.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="Continue from the latest checkpoint in train.output_dir.")
    p.set_defaults(func=_cmd_training)

    p = sub.add_parser(
        "new-model", help="Write a random-init LLaDA-architecture model and its character tokenizer to a directory.",
        description="Presets: tiny (~3.4M parameters, CPU) and small (~27M, GPU). The directory loads with "
        "model.name_or_path=DIR or AutoModel/AutoTokenizer.from_pretrained(DIR) after `import egspo`.",
    )
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="Model size (default: tiny).")
    p.add_argument("--out", required=True, help="Output directory (created; existing files are overwritten).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random initialization (default: 0).")
    p.set_defaults(func=_cmd_new_model)

    p = sub.add_parser(
        "eval", help="Generate and score a task at several completion lengths: a model, an adapter or every "
        "checkpoint of a run; resumable; run under `accelerate launch` to spread items over processes.",
        description="Evaluation with SPEC 6 settings (temperature 0, steps = gen_length * steps ratio, block 32). "
        "Writes OUTPUT/{variant}/{task}_{L}.generations.jsonl and .metrics.json, OUTPUT/summary.json and, for "
        "several variants, OUTPUT/{task}_accuracy.png. Rerunning skips items already generated. Flags override "
        "the eval section of --config.",
    )
    p.add_argument("--model", help="Base model: directory, hub name or builtin:NAME (default: model.name_or_path).")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--adapter", help="Evaluate the base model with this peft adapter (or checkpoint) directory.")
    weights.add_argument("--checkpoints", metavar="RUN_DIR",
                         help="Evaluate the base model, then every checkpoint-N of this run directory.")
    p.add_argument("--task", help="Task name (default: task.name).")
    p.add_argument("--data", help="Test data file or hub dataset (default: task.eval_file, else the task's generator).")
    p.add_argument("--gen-lengths", type=_gen_lengths, help="Comma-separated completion lengths (default 128,256,512).")
    p.add_argument("--block-length", type=int, help="Sampler block length (default: 32).")
    p.add_argument("--steps-ratio", type=float, help="Denoising steps per completion token (default: 0.5).")
    p.add_argument("--batch-size", type=int, help="Prompts per generation batch per process (default: 16).")
    p.add_argument("--limit", type=int, help="Evaluate only the first N items.")
    p.add_argument("--num-eval", type=int, help="Items drawn from a task generator (default: task.num_eval).")
    p.add_argument("--output", help="Output directory (default: RUN_DIR/eval with --checkpoints, else ./evals).")
    p.add_argument("--seed", type=int, help="Seed of generated test items (default: train.seed).")
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval)

    from egspo.tasks import TASK_NAMES

    p = sub.add_parser(
        "score", help="Score finished completions with a task's reward functions and accuracy protocol.",
        description="Each input line is a JSON object with 'completion' and the task's ground-truth fields "
        "(gsm8k/math500: answer; countdown: numbers, target; sudoku: puzzle, solution). Prints JSON: "
        "accuracy (percent), n, the mean of each reward function and of the weighted total. Malformed "
        "lines exit with code 2 and a message naming the line and field.",
    )
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="Task whose rewards and metrics apply.")
    p.add_argument("--input", required=True, help="JSONL file of completions and ground-truth fields.")
    p.add_argument("--output", help="Write each input line with its rewards, total and correct flag here (JSONL).")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "generate", help="Generate completions with the sampler training uses; --show-steps to watch it decode.",
        description="Completions of --prompt texts (through the tokenizer's chat template unless --raw) or of an "
        "--input file (.jsonl: objects with 'prompt' or 'messages'; other files: one prompt per line), printed "
        "to stdout ([i] before each when there are several) or written to --output as JSONL (each input row plus "
        "'completion', ready for `egspo score`). Unset sampler options come from the model's "
        "generation_config.json, else gen_length 128, block_length 32, steps gen_length/2, temperature 0.",
    )
    p.add_argument("--model", required=True, help="Model directory, hub name or builtin:NAME.")
    p.add_argument("--adapter", help="A peft adapter (or checkpoint-N) directory to apply to the model.")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", action="append", metavar="TEXT", help="A prompt (repeat for several).")
    source.add_argument("--input", metavar="FILE", help="Prompts file: .jsonl (prompt or messages) or one per line.")
    p.add_argument("--gen-length", type=int, help="Completion length in tokens.")
    p.add_argument("--block-length", type=int, help="Block length (divides the completion length).")
    p.add_argument("--steps", type=int, help="Denoising steps (a multiple of the number of blocks).")
    p.add_argument("--temperature", type=float, help="Sampling temperature (0 = greedy).")
    p.add_argument("--remasking", choices=("low_confidence", "random"), help="Which masked positions to commit.")
    p.add_argument("--seed", type=int, help="Seed of the draws at temperature > 0.")
    p.add_argument("--batch-size", type=int, help="Prompts per batch (default: all at once).")
    p.add_argument("--raw", action="store_true", help="Use --prompt/--input texts as they are (no chat template).")
    p.add_argument("--output", help="Write JSONL here instead of printing the completions.")
    p.add_argument("--show-steps", action="store_true",
                   help="Print the completion after every denoising step (masked tokens shown as a shaded block or _, each "
                   "step's new tokens in bold on a terminal, where frames replace each other).")
    p.add_argument("--delay", type=float, default=0.1, help="Seconds between --show-steps frames on a terminal.")
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except ConfigError as exc:
        logger.error("Configuration error: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
