"""The ``egspo`` command line: thin wrappers that parse arguments, call the library and report.

    egspo demo [--out DIR] [field=value ...]   the built-in default job (CPU, minutes)
    egspo config [--config FILE] [--help-fields] [field=value ...]   print the resolved configuration
    egspo new-model --preset tiny --out DIR [--seed N]   write a random-init model + tokenizer
    egspo train --config FILE [--resume] [field=value ...]   RL fine-tuning (EGSPOTrainer)
    egspo sft --config FILE [--resume] [field=value ...]     masked-diffusion SFT
    egspo eval --model M [--adapter DIR | --checkpoints RUN] --task T [--gen-lengths 128,256,512]   evaluation
    egspo score --task T --input FILE.jsonl [--protocol reference] [--output FILE.jsonl]   score completions
    egspo lm-eval --model egspo --model_args pretrained=M --tasks T ...   lm-evaluation-harness (egspo[eval])
    egspo generate --model M (--prompt TEXT ... | --input FILE) [--show-steps]   generate completions
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from collections.abc import Callable, Sequence

import yaml

from egspo.config import ConfigError, EGSPOConfig, field_help, load_config
from egspo.quiet import quiet_third_party

logger = logging.getLogger("egspo")
LM_EVAL_COMMAND = "lm-eval"


def _cmd_config(args: argparse.Namespace) -> int:
    if args.help_fields:
        for f in dataclasses.fields(EGSPOConfig):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            sys.stdout.write(f"{f.name} (default {default!r}): {field_help(f.name)}\n")
        return 0
    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return 0


def _cmd_training(args: argparse.Namespace) -> int:
    """`egspo train` and `egspo sft`: the same run life cycle around a different loop."""
    from egspo.rl.distributed import leave_gloo_group

    cfg = load_config(args.config, args.overrides)
    if args.command == "train":
        from egspo.rl.trainer import EGSPOTrainer

        run_dir = EGSPOTrainer(args=cfg).train(resume_from_checkpoint=args.resume or None).run_dir
    else:
        from egspo.sft import sft

        run_dir = sft(cfg, resume=args.resume)
    logger.info("Run directory: %s", run_dir)
    leave_gloo_group()
    return 0


def _cmd_new_model(args: argparse.Namespace) -> int:
    from egspo.models.tiny import new_model

    out = new_model(args.out, preset=args.preset, seed=args.seed)
    logger.info("Load it with model_name_or_path=%s", out)
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

    config = args.config
    if config is None and args.checkpoints and (Path(args.checkpoints) / "config.yaml").is_file():
        config = str(Path(args.checkpoints) / "config.yaml")  # the run's own settings
    cfg = load_config(config, args.overrides)
    flags = {"gen_lengths": args.gen_lengths, "block_length": args.block_length, "steps_ratio": args.steps_ratio,
             "batch_size": args.batch_size, "limit": args.limit}
    eval_cfg = dataclasses.replace(cfg.eval_config(), **{k: v for k, v in flags.items() if v is not None})
    model_cfg = cfg.model_config(args.model)
    output = args.output or (str(Path(args.checkpoints) / "eval") if args.checkpoints else "evals")
    task = args.task or cfg.task
    # the config's data file and task options belong to its own task only
    same_task = task == cfg.task
    logger.info("Evaluating %s with %s: lengths %s, block %d, steps ratio %g, temperature %g", task,
                f"the settings of {config}" if config else "the default settings", eval_cfg.gen_lengths,
                eval_cfg.block_length, eval_cfg.steps_ratio, eval_cfg.temperature)
    summary = evaluate(
        model_cfg, task, eval_cfg=eval_cfg, output_dir=output,
        adapter=args.adapter, checkpoints=args.checkpoints,
        data=args.data or (cfg.eval_file if same_task else None),
        num_eval=args.num_eval or cfg.num_eval, seed=cfg.seed if args.seed is None else args.seed,
        task_options=cfg.task_options if same_task else None, protocol=args.protocol or cfg.scoring_protocol,
    )
    if process_state().is_main_process:
        other = "reference" if summary["protocol"] == "default" else "default"
        for metric in _table_metrics(summary):
            protocol = other if metric.endswith(f"_{other}") else summary["protocol"]
            sys.stdout.write(f"{summary['task']} {metric} (%), {protocol} protocol\n{format_table(summary, metric)}\n")
        logger.info("Generations, metrics and summary.json in %s%s", output,
                    f"; plot {summary['plot']}" if summary["plot"] else "")
    return 0


def _table_metrics(summary: dict) -> list[str]:
    """The task's metrics that every result has (accuracy first), as percentages."""
    results = [m for per_length in summary["results"].values() for m in per_length.values()]
    skip = {"n", "step", "gen_length", "seconds", "generated", "reused"}
    common = [k for k, v in results[0].items() if isinstance(v, (int, float)) and k not in skip
              and all(k in r for r in results)] if results else []
    return sorted(common, key=lambda k: (k != "accuracy", k))


def _cmd_score(args: argparse.Namespace) -> int:
    import json

    from egspo.rl.rewards import RewardError
    from egspo.scoring import score_file
    from egspo.tasks import get_task
    from egspo.tasks.data import DataError

    try:
        summary = score_file(get_task(args.task), args.input, args.output, protocol=args.protocol, progress=True)
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


def _cmd_lm_eval(args: argparse.Namespace) -> int:
    try:
        from egspo.lm_eval_model import run_cli
    except ImportError as exc:
        logger.error("%s", exc)
        return 2
    return run_cli(args.lm_eval_args)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file of EGSPOConfig fields (`egspo config --help-fields` lists "
                        "them; the sectioned files of egspo 0.1 still load, with a warning).")
    parser.add_argument(
        "overrides", nargs="*", metavar="field=value",
        help="Overrides applied after the file, e.g. beta=0.0 max_steps=10 (values are YAML).",
    )


def build_parser() -> argparse.ArgumentParser:
    from egspo.tasks.base import PROTOCOLS

    parser = argparse.ArgumentParser(
        prog="egspo",
        description="RL fine-tuning of diffusion language models: EGSPO-SA and diffu-GRPO.",
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="Debug logging, and third-party warnings that are hidden by default.")
    parser.add_argument("--debug", action="store_true", help="Show a traceback for user errors too.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo", help="The built-in default: EGSPO-SA on 4x4 Sudoku from the shipped tiny model, on CPU, in minutes.",
        description="Evaluate the shipped tiny Sudoku model, train it with EGSPO-SA, evaluate again, and write a "
        "table, a training curve (PNG) and report.md into the run directory.",
    )
    p.add_argument("--out", default=None, help="Run directory (default: runs/demo, or runs/demo-N if taken).")
    p.add_argument("overrides", nargs="*", metavar="field=value",
                   help="Overrides of the packaged demo config, e.g. max_steps=20.")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("config", help="Print the resolved configuration (defaults + file + overrides).")
    _add_config_args(p)
    p.add_argument("--help-fields", action="store_true", help="List every config field with its default and help.")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser(
        "train", help="RL fine-tuning (EGSPO-SA, EGSPO or diffu-GRPO); run under `accelerate launch` for several GPUs.",
        description="RL fine-tuning of a diffusion LM. Checkpoints, metrics.jsonl and the resolved config.yaml "
        "go to output_dir, then report.md and training_curve.png. SIGTERM/Ctrl-C saves a checkpoint and exits with "
        "status 130 (143 for SIGTERM); a second Ctrl-C stops at once; --resume continues exactly.",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="Continue from the newest intact checkpoint in output_dir.")
    p.set_defaults(func=_cmd_training)

    p = sub.add_parser(
        "sft", help="Masked-diffusion SFT on a task's reference completions or a prompt/completion jsonl.",
        description="Completion-only masked-diffusion SFT (LLaDA/d1 recipe). Uses the model, data and training fields "
        "of the config (max_completion_length = padded completion length); the same checkpoints, --resume and "
        "SIGTERM/Ctrl-C handling as train (checkpoint, exit status 130/143).",
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="Continue from the newest intact checkpoint in output_dir.")
    p.set_defaults(func=_cmd_training)

    p = sub.add_parser(
        "new-model", help="Write a random-init LLaDA-architecture model and its character tokenizer to a directory.",
        description="Presets: tiny (~3.4M parameters, CPU) and small (~27M, GPU). The directory loads with "
        "model_name_or_path=DIR or AutoModel/AutoTokenizer.from_pretrained(DIR) after `import egspo`.",
    )
    p.add_argument("--preset", default="tiny", choices=("tiny", "small"), help="Model size (default: tiny).")
    p.add_argument("--out", required=True, help="Output directory (created; existing files are overwritten).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random initialization (default: 0).")
    p.set_defaults(func=_cmd_new_model)

    p = sub.add_parser(
        "eval", help="Generate and score a task at several completion lengths: a model, an adapter or every "
        "checkpoint of a run; resumable; run under `accelerate launch` to spread items over processes.",
        description="Evaluation with the papers' settings (temperature 0, steps = gen_length * steps ratio, block 32), "
        "or those of the run's config.yaml with --checkpoints RUN (or of --config). "
        "Writes OUTPUT/{variant}/{task}_{L}.generations.jsonl and .metrics.json, OUTPUT/summary.json and, for "
        "several variants, OUTPUT/{task}_accuracy.png. Rerunning skips items already generated. Flags override "
        "the eval_* fields of the config.",
    )
    p.add_argument("--model", help="Base model: directory, hub name or builtin:NAME (default: model_name_or_path).")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--adapter", help="Evaluate the base model with this peft adapter (or checkpoint) directory.")
    weights.add_argument("--checkpoints", metavar="RUN_DIR",
                         help="Evaluate the base model, then every checkpoint-N of this run directory.")
    p.add_argument("--task", help="Task name (default: the config's task).")
    p.add_argument("--data", help="Test data file, builtin:sudoku-test / builtin:countdown-test (the reference sets) "
                   "or hub dataset (default: eval_file, else the task's generator).")
    p.add_argument("--gen-lengths", type=_gen_lengths, help="Comma-separated completion lengths (default 128,256,512).")
    p.add_argument("--block-length", type=int, help="Sampler block length (default: 32).")
    p.add_argument("--steps-ratio", type=float, help="Denoising steps per completion token (default: 0.5).")
    p.add_argument("--batch-size", type=int, help="Prompts per generation batch per process (default: 16).")
    p.add_argument("--limit", type=int, help="Evaluate only the first N items.")
    p.add_argument("--num-eval", type=int, help="Items drawn from a task generator (default: num_eval).")
    p.add_argument("--output", help="Output directory (default: RUN_DIR/eval with --checkpoints, else ./evals).")
    p.add_argument("--seed", type=int, help="Seed of generated test items (default: the config's seed).")
    p.add_argument("--protocol", choices=PROTOCOLS, help="Accuracy protocol named first (default: the config's "
                   "scoring_protocol, 'default'); the other is reported beside it.")
    _add_config_args(p)
    p.set_defaults(func=_cmd_eval)

    from egspo.tasks import TASK_NAMES

    p = sub.add_parser(
        "score", help="Score finished completions with a task's reward functions and accuracy protocol.",
        description="Each input line is a JSON object with 'completion' and the task's ground-truth fields "
        "(gsm8k/math500: answer; countdown: numbers, target; sudoku: puzzle, solution); d1's own "
        "*_generations.json files are read as they are. Prints JSON: accuracy (percent) under the protocol, "
        "n, the mean of each reward function and of the weighted total. Malformed lines exit with code 2 "
        "and a message naming the line and field.",
    )
    p.add_argument("--task", required=True, choices=TASK_NAMES, help="Task whose rewards and metrics apply.")
    p.add_argument("--input", required=True, nargs="+", metavar="FILE",
                   help="JSONL file(s) of completions and ground-truth fields, or d1 generations JSON file(s); "
                   "several files are scored together.")
    p.add_argument("--protocol", default="default", choices=PROTOCOLS,
                   help="Accuracy protocol: default (our answer reading; math-verify for MATH500) or reference "
                   "(the published d1 evaluation parser's decisions, to compare with published numbers).")
    p.add_argument("--output", help="Write each input line with its rewards, total and correct flag here (JSONL).")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        LM_EVAL_COMMAND, add_help=False,
        help="lm-evaluation-harness's command line with the `egspo` model registered (pip install 'egspo[eval]'); "
        "every following argument goes to lm-eval, e.g. --model egspo --model_args pretrained=M --tasks T.",
    )
    p.set_defaults(func=_cmd_lm_eval, lm_eval_args=[])

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
                   help="Print the completion after every denoising step (masked tokens shown as a shaded block or _, "
                   "each step's new tokens in bold on a terminal, where frames replace each other).")
    p.add_argument("--delay", type=float, default=0.1, help="Seconds between --show-steps frames on a terminal.")
    p.set_defaults(func=_cmd_generate)
    return parser


def _split_lm_eval(argv: list[str]) -> tuple[list[str], list[str]]:
    """(egspo's arguments, lm-eval's): whatever follows the ``lm-eval`` command is lm-eval's, verbatim
    (argparse would read its options as egspo's)."""
    command = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    if command is not None and argv[command] == LM_EVAL_COMMAND:
        return argv[: command + 1], argv[command + 1 :]
    return argv, []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    own, lm_eval_args = _split_lm_eval(list(sys.argv[1:] if argv is None else argv))
    args, extra = parser.parse_known_args(own)
    # overrides may also follow an option (`train --config c.yaml --resume max_steps=10`), which argparse
    # leaves unparsed after a positional list: they join the overrides; anything else is an error
    takes_overrides = hasattr(args, "overrides")
    overrides = [item for item in extra if takes_overrides and "=" in item and not item.startswith("-")]
    unknown = [item for item in extra if item not in overrides]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if overrides:
        args.overrides = [*args.overrides, *overrides]
    if args.command == LM_EVAL_COMMAND:
        args.lm_eval_args = lm_eval_args
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    quiet_third_party(verbose=args.verbose)  # before the commands import deepspeed & co.
    logging.captureWarnings(True)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except KeyboardInterrupt as exc:
        from egspo.run_lifecycle import TrainingInterrupted

        if isinstance(exc, TrainingInterrupted):
            logger.warning("Interrupted at step %d; checkpoint saved. Resume with the same command and --resume.",
                           exc.step)
            return 128 + exc.signum
        logger.warning("Interrupted.")
        return 128 + signal.SIGINT
    except Exception as exc:
        if not _is_user_error(exc) or args.debug:
            raise
        logger.error("%s", exc)
        return 2


def _is_user_error(exc: BaseException) -> bool:
    """Mistakes a user can fix from the message (config, data, reward functions, models, paths)."""
    from egspo.rl.rewards import RewardError
    from egspo.tasks.data import DataError

    return isinstance(exc, (ConfigError, DataError, RewardError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
