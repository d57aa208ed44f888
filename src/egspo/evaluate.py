"""Evaluation: greedy generation over model variants x completion lengths -> JSONL, metrics, summary, plot.

    egspo eval --model runs/base --checkpoints runs/egspo --task sudoku --gen-lengths 128,256,512
    accelerate launch -m egspo.cli eval ...            # the same, items spread over the processes

    from egspo.evaluate import evaluate, evaluate_rows
    summary = evaluate("builtin:sudoku-tiny", "sudoku", eval_cfg=EvalConfig(gen_lengths=[64]),
                       output_dir="evals/x", checkpoints="runs/egspo")
    dlm, tokenizer = load_variant("builtin:sudoku-tiny", "runs/egspo/checkpoint-200")
    completions, metrics = evaluate_rows(dlm, tokenizer, get_task("sudoku"), rows, EvalConfig().sampler_for(256))

Generation uses the evaluation settings of docs/algorithm.md#reference-settings (:meth:`EvalConfig.sampler_for`:
temperature 0, steps = L_c * steps_ratio, block 32), prompts sorted by length so that a batch pads little. Output:

    OUTPUT/summary.json                               per task: variants x lengths -> metrics
    OUTPUT/{task}_accuracy.png                        accuracy per checkpoint step, one line per length
    OUTPUT/{variant}/variant.json                     what the variant is (model, weights, settings)
    OUTPUT/{variant}/{task}_{L}.generations.jsonl     one line per item: index, prompt, the row's fields, completion
    OUTPUT/{variant}/{task}_{L}.metrics.json          task metrics (accuracy in %, both protocols), n, seconds, settings

Generations are appended and flushed batch by batch (each process to its own
``.generations.part{rank}.jsonl``; the main process merges them), so a killed run resumes where it
stopped: items already in any of these files are not generated again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from egspo.checkpoint import checkpoint_step, list_checkpoints
from egspo.config import ConfigError, EvalConfig, ModelConfig, SamplerConfig
from egspo.generation import encode_texts, sample_batches
from egspo.models.adapter import DiffusionLM, unwrap
from egspo.models.loading import load_model, load_tokenizer
from egspo.rl.data import prompt_text
from egspo.seeding import stream
from egspo.tasks import Task, get_task
from egspo.tasks.base import PROTOCOLS, check_protocol, side_by_side_metrics

logger = logging.getLogger(__name__)

#: Keys every generations line has besides the row's own fields.
LINE_KEYS = ("index", "prompt", "completion")


@dataclass(frozen=True)
class Variant:
    """One model to evaluate: the base model, or the base with an adapter / full weights from ``weights``."""

    name: str
    kind: Literal["base", "adapter", "model"] = "base"
    weights: Path | None = None
    #: Training step (0 for the base model) when known: the x axis of the plot.
    step: int | None = 0


def resolve_variants(adapter: str | Path | None = None, checkpoints: str | Path | None = None) -> list[Variant]:
    """The variants to evaluate: the base alone, one adapter, or the base then every checkpoint of a run."""
    if adapter is not None and checkpoints is not None:
        raise ConfigError("Give either --adapter (one adapter) or --checkpoints (a run directory), not both.")
    if adapter is not None:
        return [_weights_variant(Path(adapter))]
    if checkpoints is None:
        return [Variant("base")]
    run_dir = Path(checkpoints)
    if not run_dir.is_dir():
        raise ConfigError(f"--checkpoints {run_dir}: no such run directory.")
    found = list_checkpoints(run_dir)
    if not found:
        raise ConfigError(f"--checkpoints {run_dir}: the directory has no checkpoint-N subdirectories.")
    return [Variant("base"), *(_weights_variant(path) for path in found)]


def _weights_variant(path: Path) -> Variant:
    """A checkpoint directory (holding ``adapter/`` or ``model/``), or an adapter / model directory itself."""
    if not path.is_dir():
        raise ConfigError(f"{path}: no such adapter or checkpoint directory.")
    name_dir = path.parent if path.name in ("adapter", "model") else path
    step = checkpoint_step(name_dir.name)
    for sub in ("adapter", "model"):  # what a trainer checkpoint holds
        if (path / sub).is_dir():
            path = path / sub
            break
    if (path / "adapter_config.json").is_file():
        return Variant(name_dir.name, "adapter", path, step)
    if (path / "config.json").is_file():
        return Variant(name_dir.name, "model", path, step)
    raise ConfigError(
        f"{path} holds neither a peft adapter (adapter_config.json) nor model weights (config.json): give a "
        "checkpoint-N directory of a run or the adapter directory saved by save_pretrained."
    )


# -- generation ---------------------------------------------------------------------------------


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices grouped into batches of similar prompt length, longest first (an OOM shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate_batch(
    dlm: DiffusionLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    sampler_cfg: SamplerConfig,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Completions (decoded, special tokens skipped) of one batch of prompt texts."""
    # Evaluation never truncates a prompt: the widest prompt of the batch sets the width.
    ids, mask = encode_texts(tokenizer, prompts, dlm.device)
    traj = sample_batches(dlm, ids, mask, sampler_cfg, generator)
    return tokenizer.batch_decode(traj.completions, skip_special_tokens=True)


def _generator(device: torch.device, seed: int, first_item: int) -> torch.Generator:
    # Seeded by the batch's first item, so sampled (temperature > 0) completions do not depend on which
    # process generated the batch.
    return stream("eval", seed, first_item, device=device)


def prompt_texts(task: Task | None, tokenizer: PreTrainedTokenizerBase, rows: Sequence[dict[str, Any]]) -> list[str]:
    """The evaluation prompts of ``rows`` (a row's own ``prompt``, else the task's eval messages through the
    chat template: :func:`egspo.rl.data.prompt_text`)."""
    return [prompt_text(tokenizer, row, task, for_eval=True) for row in rows]


def evaluate_rows(
    dlm: DiffusionLM,
    tokenizer: PreTrainedTokenizerBase,
    task: Task | None,
    rows: Sequence[dict[str, Any]],
    sampler_cfg: SamplerConfig,
    *,
    batch_size: int = 16,
    seed: int = 0,
    protocol: str = "default",
    metrics: bool = True,
) -> tuple[list[str], dict[str, float]]:
    """Generate for ``rows`` in this process (no files) and score: (completions in row order, task metrics;
    empty with ``metrics=False``). ``task`` builds the prompts of rows without a ``prompt`` column.

    The metrics hold both scoring protocols: ``protocol``'s under their names (``accuracy``), the other's
    suffixed (``accuracy_reference``, or ``accuracy_default`` when ``protocol`` is "reference").
    """
    check_protocol(protocol)
    prompts = prompt_texts(task, tokenizer, rows)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    completions: list[str] = [""] * len(rows)
    for batch in plan_batches(lengths, batch_size):
        texts = generate_batch(dlm, tokenizer, [prompts[i] for i in batch], sampler_cfg,
                               _generator(dlm.device, seed, batch[0]))
        for i, text in zip(batch, texts, strict=True):
            completions[i] = text
    if not metrics or task is None:
        return completions, {}
    return completions, side_by_side_metrics(task, completions, rows, primary=protocol)


# -- model variants -----------------------------------------------------------------------------


class VariantLoader:
    """Loads the base model once and moves it between variants.

    Adapters are swapped in place (peft ``load_adapter`` / ``set_adapter`` / ``delete_adapter``), so at
    most one adapter is held; full-model checkpoints overwrite the base weights in place, and the base
    is reloaded only if an adapter or the base itself is needed afterwards.
    """

    def __init__(self, model_cfg: ModelConfig, device: torch.device) -> None:
        self.model_cfg = model_cfg
        self.device = device
        self._dlm: DiffusionLM | None = None
        self._peft: PeftModel | None = None
        self._adapter: str | None = None
        self._overwritten = False

    def _base(self) -> DiffusionLM:
        if self._dlm is None or self._overwritten:
            self._dlm = self._peft = self._adapter = None
            dlm, _ = load_model(self.model_cfg, device=self.device)
            dlm.model.eval()
            self._dlm, self._overwritten = dlm, False
        return self._dlm

    def load(self, variant: Variant) -> DiffusionLM:
        """The model of ``variant``, ready for :func:`generate_batch`."""
        if variant.kind == "model":
            # a full checkpoint replaces every weight, so whatever the base currently holds is fine
            if self._dlm is None:
                self._base()
            self._drop_adapters()
            assert self._dlm is not None and variant.weights is not None
            load_weights_in_place(self._dlm.model, variant.weights)
            self._overwritten = True
            return self._dlm
        dlm = self._base()
        if variant.kind == "base":
            self._drop_adapters()
            assert self._dlm is not None
            return self._dlm
        assert variant.weights is not None
        name = _adapter_name(variant.name)
        try:
            if self._peft is None or self._adapter is None:  # set and cleared together
                self._peft = PeftModel.from_pretrained(dlm.model, str(variant.weights), adapter_name=name)
            else:
                self._peft.load_adapter(str(variant.weights), adapter_name=name)
                self._peft.set_adapter(name)
                self._peft.delete_adapter(self._adapter)
        except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches, missing target modules
            raise ConfigError(_adapter_mismatch(variant.weights, self.model_cfg.name_or_path, exc)) from exc
        self._adapter = name
        self._peft.eval()
        return dataclasses.replace(dlm, model=self._peft)

    def _drop_adapters(self) -> None:
        """Remove the injected LoRA layers (the base weights were never changed)."""
        if self._peft is None or self._dlm is None:
            return
        self._dlm = dataclasses.replace(self._dlm, model=self._peft.unload())
        self._peft = self._adapter = None


def load_variant(
    model: ModelConfig | str, weights: str | Path | None = None, *, device: str | torch.device | None = None
) -> tuple[DiffusionLM, PreTrainedTokenizerBase]:
    """The base ``model`` with ``weights`` (an adapter, ``checkpoint-N`` or full-model directory) applied.

    For :func:`evaluate_rows` on one trained checkpoint; :func:`evaluate` swaps between many instead.
    """
    model_cfg = ModelConfig(name_or_path=model) if isinstance(model, str) else model
    variant = Variant("base") if weights is None else _weights_variant(Path(weights))
    return VariantLoader(model_cfg, torch.device(device or "cpu")).load(variant), load_tokenizer(model_cfg)


def _adapter_mismatch(adapter: Path, base: str, exc: BaseException) -> str:
    """The sentence for an adapter that does not fit the base model it is applied to."""
    recorded = None
    config = adapter / "adapter_config.json"
    if config.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            recorded = json.loads(config.read_text()).get("base_model_name_or_path")
    trained_on = f"was trained on {recorded!r}" if recorded else "names no base model"
    hint = f"--model {recorded}" if recorded else "--model"
    first_line = (str(exc).splitlines() or [""])[0][:200]
    return (f"The adapter {adapter} {trained_on} and does not fit the base model {base!r} "
            f"({type(exc).__name__}: {first_line}). Pass the base it was trained on ({hint}).")


def _adapter_name(variant: str) -> str:
    # peft adapter names become module attribute names: no dots or dashes
    return re.sub(r"\W", "_", variant)


def load_weights_in_place(model: nn.Module, directory: Path) -> None:
    """Copy a ``save_pretrained`` directory's safetensors weights into ``model`` (one shard in memory at a time)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{directory}: no *.safetensors weights to load.")
    core = unwrap(model)
    params = core.state_dict()
    loaded: set[str] = set()
    with torch.no_grad():
        for file in files:
            for name, value in load_file(str(file)).items():
                if name not in params:
                    raise ConfigError(
                        f"{file} has weight {name!r} that {type(core).__name__} lacks: a checkpoint of another "
                        "architecture than --model?"
                    )
                params[name].copy_(value)
                loaded.add(name)
    # Tied weights (e.g. an LM head tied to the embedding) are saved once, under one of their names.
    loaded_storage = {params[n].data_ptr() for n in loaded}
    missing = [n for n, t in params.items() if n not in loaded and t.data_ptr() not in loaded_storage]
    if missing:
        raise ConfigError(f"{directory} lacks weights of the model, e.g. {missing[:3]}: not a full-model checkpoint.")


# -- files --------------------------------------------------------------------------------------


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The complete JSON lines of a generations file; a torn line (a killed write) is skipped."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is incomplete (a killed run?); its item will be generated again.",
                               path, number)
                continue
            if isinstance(item, dict) and isinstance(item.get("index"), int):
                yield item


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(row, default=str))


def make_line(index: int, prompt: str, row: dict[str, Any], completion: str) -> dict[str, Any]:
    """One generations line. Row fields win over ``prompt`` so ground truth named "prompt" survives."""
    line: dict[str, Any] = {"index": index, "prompt": prompt, **_json_row(row)}
    line["index"], line["completion"] = index, completion
    return line


@dataclass
class _Paths:
    generations: Path
    metrics: Path

    def parts(self) -> list[Path]:
        return sorted(self.generations.parent.glob(self.generations.name.replace(".jsonl", ".part*.jsonl")))

    def part(self, rank: int) -> Path:
        return self.generations.with_name(self.generations.name.replace(".jsonl", f".part{rank}.jsonl"))


def _paths(output_dir: Path, variant: str, task: str, gen_length: int) -> _Paths:
    stem = output_dir / variant / f"{task}_{gen_length}"
    return _Paths(Path(f"{stem}.generations.jsonl"), Path(f"{stem}.metrics.json"))


def _finished(paths: _Paths, prompts: Sequence[str], rows: Sequence[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Lines already generated for the current items, after checking that they belong to the same items."""
    done: dict[int, dict[str, Any]] = {}
    for path in [paths.generations, *paths.parts()]:
        for line in _read_lines(path):
            index = line["index"]
            if index >= len(rows) or index in done:
                continue
            expected = make_line(index, prompts[index], rows[index], line.get("completion", ""))
            if any(line.get(k) != v for k, v in expected.items() if k != "completion"):
                raise ConfigError(
                    f"{path}: item {index} was generated for another prompt or row than the current data "
                    "(different --data, --num-eval, --seed or task options?). Use another --output or delete "
                    f"{paths.generations.parent}."
                )
            done[index] = line
    return done


def _append_lines(path: Path, lines: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size > 0 and _last_byte(path) != b"\n"
    with path.open("a", encoding="utf-8") as f:
        if torn:
            f.write("\n")  # end a torn line from a killed run, so it stays one unreadable line
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_variant_record(output_dir: Path, variant: Variant, record: dict[str, Any], write: bool) -> None:
    """Refuse to resume a variant directory that was written by another model or other settings."""
    path = output_dir / variant.name / "variant.json"
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in record.items() if old.get(k) != v]
        if changed:
            raise ConfigError(
                f"{path.parent} holds generations of another model or settings ({'; '.join(changed)}): use another "
                f"--output or delete {path.parent}."
            )
    elif write:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, record)


# -- the whole evaluation -----------------------------------------------------------------------


def process_state() -> PartialState:
    """This process's place among those started by ``accelerate launch`` / ``torchrun`` (or alone).

    Without CUDA the process group must be asked for on CPU: PartialState, unlike the Accelerator, does
    not read ``accelerate launch --cpu``'s ACCELERATE_USE_CPU, and would otherwise see one process each.
    """
    return PartialState(cpu=not torch.cuda.is_available() or parse_flag_from_env("ACCELERATE_USE_CPU"))


def _generate_variant_length(
    dlm: DiffusionLM | None,
    tokenizer: PreTrainedTokenizerBase,
    rows: Sequence[dict[str, Any]],
    prompts: Sequence[str],
    lengths: Sequence[int],
    sampler_cfg: SamplerConfig,
    paths: _Paths,
    *,
    batch_size: int,
    seed: int,
    state: PartialState,
    task: Task | None = None,
) -> tuple[int, int, float]:
    """Generate the unfinished items (this process's share) and merge; return (reused, generated, seconds).

    ``dlm`` may be None when nothing is left to generate (the model was not loaded).
    """
    done = _finished(paths, prompts, rows)
    state.wait_for_everyone()  # every process has read the files before any is appended to
    pending = [i for i in range(len(rows)) if i not in done]
    if pending and dlm is None:
        raise RuntimeError(f"{paths.generations}: {len(pending)} items to generate but no model was loaded.")
    batches = [[pending[j] for j in b] for b in plan_batches([lengths[i] for i in pending], batch_size)]
    # Whole batches are dealt round-robin, so each batch is the one a single process would form and the
    # completions do not depend on the number of processes.
    mine = batches[state.process_index :: state.num_processes]
    if state.is_main_process:
        logger.info("%s: %d of %d items already generated (skipped), %d to generate on %d process(es).",
                    paths.generations, len(done), len(rows), len(pending), state.num_processes)
    start = time.perf_counter()
    part = paths.part(state.process_index)
    # progress of this process's share (the main process's bar speaks for all): items/s, running accuracy
    bar = tqdm(total=sum(len(b) for b in mine), desc=f"{paths.generations.name}", unit="item", dynamic_ncols=True,
               disable=not state.is_main_process or not mine)
    correct = 0.0
    for batch in mine:
        assert dlm is not None
        texts = generate_batch(dlm, tokenizer, [prompts[i] for i in batch], sampler_cfg,
                               _generator(dlm.device, seed, batch[0]))
        _append_lines(part, [make_line(i, prompts[i], rows[i], t) for i, t in zip(batch, texts, strict=True)])
        logger.debug("%s: generated items %s", part, batch)
        if task is not None and not bar.disable:
            correct += task.metrics(texts, [rows[i] for i in batch])["accuracy"] * len(batch)
            bar.set_postfix(accuracy=f"{correct / (bar.n + len(batch)):.1f}%")
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if state.is_main_process:
        merged = _finished(paths, prompts, rows)
        missing = [i for i in range(len(rows)) if i not in merged]
        if missing:
            raise RuntimeError(f"{paths.generations}: items {missing[:5]} were not generated by any process.")
        ordered = [merged[i] for i in range(len(rows))]
        # Left untouched when it already holds exactly these items, so a finished file is never rewritten.
        if paths.parts() or list(_read_lines(paths.generations)) != ordered:
            tmp = paths.generations.with_name(paths.generations.name + ".tmp")
            with tmp.open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(line, ensure_ascii=False) + "\n" for line in ordered)
            os.replace(tmp, paths.generations)
            for extra in paths.parts():
                extra.unlink()
    state.wait_for_everyone()
    return len(done), len(pending), seconds


def load_eval_rows(
    task: Task, data: str | None, *, num_eval: int, seed: int, limit: int | None, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The test rows: ``data`` (file or hub name) or the task's generator (``num_eval`` rows), first ``limit``."""
    try:
        rows = task.load(data, "test", num_eval, seed, **(options or {}))
    except (TypeError, ValueError) as exc:  # bad data files and unknown/invalid task options
        source = data or "its generator"
        raise ConfigError(f"Could not load the {task.name} evaluation data from {source}: {exc}") from exc
    rows = rows[:limit] if limit is not None else rows
    if not rows:
        raise ConfigError(f"No evaluation items for task {task.name} from {data or 'its generator'}.")
    return rows


def get_task_or_fail(name: str) -> Task:
    """``get_task`` with an unknown name turned into a ConfigError (a clean CLI error)."""
    try:
        return get_task(name)
    except (KeyError, ValueError) as exc:
        message = exc.args[0] if exc.args else str(exc)
        raise ConfigError(f"Unknown task {name!r}: {message}") from exc


def evaluate(
    model: ModelConfig | str,
    task_name: str,
    *,
    eval_cfg: EvalConfig,
    output_dir: str | Path,
    adapter: str | Path | None = None,
    checkpoints: str | Path | None = None,
    data: str | None = None,
    rows: Sequence[dict[str, Any]] | None = None,
    num_eval: int = 200,
    seed: int = 42,
    task_options: dict[str, Any] | None = None,
    protocol: str = "default",
) -> dict[str, Any]:
    """Evaluate the variants (see :func:`resolve_variants`) at every ``eval_cfg.gen_lengths``; resumable.

    The items are ``rows`` if given, else read from ``data`` (a test file or hub dataset), else
    ``num_eval`` items of the task's generator drawn with ``seed`` (by default the config's default ``seed``);
    then the first ``eval_cfg.limit``. Returns this task's summary, also merged into
    ``OUTPUT/summary.json``: ``results[variant][gen_length]`` is the metrics dict (``accuracy`` in percent,
    the task's other metrics, ``n``, ``seconds``, ...). Every process returns it. Metrics are scored
    under both protocols: ``protocol``'s keep their names (and make the plot), the other's are
    suffixed (``accuracy_reference`` or ``accuracy_default``).
    """
    try:
        check_protocol(protocol)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    model_cfg = ModelConfig(name_or_path=model) if isinstance(model, str) else model
    task = get_task_or_fail(task_name)
    variants = resolve_variants(adapter, checkpoints)
    samplers = {length: eval_cfg.sampler_for(length) for length in eval_cfg.gen_lengths}
    output = Path(output_dir)
    state = process_state()
    if rows is None:
        rows = load_eval_rows(task, data, num_eval=num_eval, seed=seed, limit=eval_cfg.limit, options=task_options)
    elif data is not None:
        raise ConfigError("Give the evaluation items either as rows or as a data source, not both.")
    else:
        rows = list(rows)[: eval_cfg.limit]
        if not rows:
            raise ConfigError("evaluate(rows=...) got no rows.")
    model_id = str(Path(model_cfg.name_or_path).resolve()) if Path(model_cfg.name_or_path).exists() \
        else model_cfg.name_or_path
    settings = {"block_length": eval_cfg.block_length, "steps_ratio": eval_cfg.steps_ratio,
                "temperature": eval_cfg.temperature,
                "sampling_seed": seed if eval_cfg.temperature > 0 else None}
    for variant in variants:
        _check_variant_record(output, variant, {
            "variant": variant.name, "model": model_id, "kind": variant.kind,
            "weights": str(variant.weights.resolve()) if variant.weights else None, **settings},
            write=state.is_main_process)
    state.wait_for_everyone()

    tokenizer = load_tokenizer(model_cfg)
    prompts = prompt_texts(task, tokenizer, rows)
    lengths = [len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    loader = VariantLoader(model_cfg, state.device)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for variant in variants:
        all_paths = {length: _paths(output, variant.name, task.name, length) for length in samplers}
        # A finished variant is not even loaded, so resuming after the last checkpoint costs no model load.
        unfinished = any(len(_finished(p, prompts, rows)) < len(rows) for p in all_paths.values())
        dlm = loader.load(variant) if unfinished else None
        results[variant.name] = {}
        for length, sampler_cfg in samplers.items():
            paths = all_paths[length]
            reused, generated, seconds = _generate_variant_length(
                dlm, tokenizer, rows, prompts, lengths, sampler_cfg, paths,
                batch_size=eval_cfg.batch_size, seed=seed, state=state, task=task)
            if state.is_main_process:
                completions = [line["completion"] for line in _read_lines(paths.generations)]
                metrics = {
                    **side_by_side_metrics(task, completions, rows, primary=protocol), "protocol": protocol,
                    "n": len(rows), "variant": variant.name, "step": variant.step, "task": task.name,
                    "gen_length": length, "seconds": round(seconds, 3), "generated": generated, "reused": reused,
                    "settings": {**dataclasses.asdict(sampler_cfg), "batch_size": eval_cfg.batch_size,
                                 "num_processes": state.num_processes, "model": model_id,
                                 "weights": str(variant.weights) if variant.weights else None},
                }
                _write_json(paths.metrics, metrics)
                other = next(p for p in PROTOCOLS if p != protocol)
                logger.info("%s %s L=%d: accuracy %.2f%% (%s protocol), %.2f%% (%s) (n=%d)", variant.name, task.name,
                            length, metrics["accuracy"], protocol, metrics[f"accuracy_{other}"], other, len(rows))
            state.wait_for_everyone()
            results[variant.name][length] = json.loads(paths.metrics.read_text(encoding="utf-8"))

    plot = output / f"{task.name}_accuracy.png" if len(variants) > 1 else None
    summary = {"task": task.name, "metric": "accuracy", "protocol": protocol,
               "gen_lengths": list(eval_cfg.gen_lengths),
               "variants": [{"name": v.name, "step": v.step, "kind": v.kind,
                             "weights": str(v.weights) if v.weights else None} for v in variants],
               "results": results, "plot": str(plot) if plot else None}
    if state.is_main_process:
        if plot is not None:
            plot_accuracy(summary, plot)
        _write_summary(output / "summary.json", summary)
        logger.debug("Results (%s accuracy, %%):\n%s", task.name, format_table(summary))
    state.wait_for_everyone()
    return summary


def _write_summary(path: Path, summary: dict[str, Any]) -> None:
    """``summary.json`` maps task -> summary, so evaluations of several tasks can share an output dir."""
    existing: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(json.JSONDecodeError):
            existing = json.loads(path.read_text(encoding="utf-8"))
    existing[summary["task"]] = summary
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, existing)


def format_table(summary: dict[str, Any], metric: str = "accuracy") -> str:
    """Rows = variants, columns = completion lengths, cells = ``metric``."""
    lengths = summary["gen_lengths"]
    names = list(summary["results"])
    width = max(len("variant"), *(len(n) for n in names))
    header = f"{'variant':<{width}}" + "".join(f"{'L=' + str(n):>10}" for n in lengths)
    lines = [header, "-" * len(header)]
    for name in names:
        cells = []
        for length in lengths:
            value = summary["results"][name].get(length, summary["results"][name].get(str(length), {})).get(metric)
            cells.append(f"{value:>10.2f}" if isinstance(value, (int, float)) else f"{'-':>10}")
        lines.append(f"{name:<{width}}" + "".join(cells))
    return "\n".join(lines)


def plot_accuracy(summary: dict[str, Any], path: Path) -> Path:
    """Accuracy per checkpoint step (the base model at 0), one line per completion length."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on clusters
    import matplotlib.pyplot as plt

    variants = summary["variants"]
    # Variants without a known step (e.g. an adapter directory not named checkpoint-N) are placed by order.
    xs = [v["step"] if v["step"] is not None else i for i, v in enumerate(variants)]
    fig, ax = plt.subplots(figsize=(6, 4))
    try:
        for length in summary["gen_lengths"]:
            ys = [summary["results"][v["name"]][length]["accuracy"] for v in variants]
            ax.plot(xs, ys, marker="o", label=f"L={length}")
        ax.set_xlabel("checkpoint step")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{summary['task']}: accuracy per checkpoint")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
    return path
