"""Evaluation: outputs, resume, checkpoint variants, accuracy bookkeeping, errors, and 2 CPU processes.

Everything runs a shrunk random-init tiny LLaDA (wide init, so that completions differ between items)
on a few generated Sudoku items at completion length 32 with block 16: milliseconds per batch on CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import egspo.evaluate as ev
from egspo import generation
from egspo.cli import main
from egspo.config import EvalConfig, ModelConfig
from egspo.models.loading import load_model
from egspo.models.lora import apply_lora
from egspo.models.tiny import new_model, random_model
from egspo.tasks import get_task

SMALL = {"n_layers": 2, "d_model": 64, "n_heads": 2, "mlp_hidden_size": 128, "init_std": 0.3}
FAST = ["--task", "sudoku", "--num-eval", "6", "--gen-lengths", "32", "--block-length", "16", "--batch-size", "4"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return new_model(tmp_path_factory.mktemp("models") / "tiny", **SMALL)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A fake LoRA run: checkpoint-2 and checkpoint-4 hold different random adapters (peft save_pretrained)."""
    run = tmp_path_factory.mktemp("run")
    for step in (2, 4):
        model, _ = random_model("tiny", seed=0, **SMALL)
        peft_model = apply_lora(model, ModelConfig(lora_r=4, lora_alpha=8, lora_dropout=0.0))
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:  # lora_B starts at zero: make the adapter change the model
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        peft_model.save_pretrained(run / f"checkpoint-{step}" / "adapter")
    return run


class CountingSample:
    """Wraps the sampler to count the rows it generates."""

    def __init__(self, sample) -> None:
        self.sample = sample
        self.rows = 0

    def __call__(self, dlm, prompt_ids, *args, **kwargs):
        self.rows += prompt_ids.shape[0]
        return self.sample(dlm, prompt_ids, *args, **kwargs)


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> CountingSample:
    counting = CountingSample(generation.sample)  # evaluation samples through egspo.generation
    monkeypatch.setattr(generation, "sample", counting)
    return counting


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_outputs_and_resume(
    model_dir: Path, tmp_path: Path, counter: CountingSample, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = []
    monkeypatch.setattr(ev, "load_model", lambda *a, **k: loads.append(1) or load_model(*a, **k))
    out = tmp_path / "out"
    argv = ["eval", "--model", str(model_dir), *FAST, "--output", str(out)]
    assert main(argv) == 0
    generations = out / "base" / "sudoku_32.generations.jsonl"
    metrics = json.loads((out / "base" / "sudoku_32.metrics.json").read_text())
    lines = read_jsonl(generations)
    assert counter.rows == 6 and [line["index"] for line in lines] == list(range(6))
    assert {"prompt", "completion", "question", "puzzle", "solution"} <= set(lines[0])
    assert metrics["n"] == 6 and metrics["settings"]["steps"] == 16 and metrics["settings"]["temperature"] == 0
    summary = json.loads((out / "summary.json").read_text())["sudoku"]
    assert summary["results"]["base"]["32"]["accuracy"] == metrics["accuracy"]
    assert "base" in capsys.readouterr().out

    # accuracy is task.metrics recomputed from the JSONL alone (what `egspo score` does)
    rows = [{k: v for k, v in line.items() if k not in ev.LINE_KEYS} for line in lines]
    recomputed = get_task("sudoku").metrics([line["completion"] for line in lines], rows)
    assert recomputed["accuracy"] == pytest.approx(metrics["accuracy"])
    from egspo.scoring import score_file

    assert score_file(get_task("sudoku"), generations)["accuracy"] == pytest.approx(metrics["accuracy"])
    # both protocols side by side; the reference one is what `egspo score --protocol reference` gives
    assert metrics["protocol"] == "default" and summary["protocol"] == "default"
    assert {"accuracy_reference", "puzzle_accuracy_reference"} <= set(metrics)
    reference = score_file(get_task("sudoku"), generations, protocol="reference")
    assert reference["accuracy"] == pytest.approx(metrics["accuracy_reference"])

    # a finished evaluation: nothing generated, the file not even rewritten
    before, mtime = generations.read_bytes(), generations.stat().st_mtime_ns
    assert main(argv) == 0
    assert counter.rows == 6 and generations.stat().st_mtime_ns == mtime
    assert len(loads) == 1  # the finished variant was not even loaded

    # a run killed mid-write: the last two items in a process's part file, the second one torn
    generations.write_bytes(b"".join(before.splitlines(keepends=True)[:4]))
    tail = before.splitlines(keepends=True)[4:]
    generations.with_name("sudoku_32.generations.part0.jsonl").write_bytes(tail[0] + tail[1][: len(tail[1]) // 2])
    assert main(argv) == 0
    assert counter.rows == 7  # only the torn item was generated again
    assert generations.read_bytes() == before
    assert not list(generations.parent.glob("*.part*"))


def test_checkpoints_adapters_and_plot(model_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    eval_cfg = EvalConfig(gen_lengths=[32], block_length=16, batch_size=4)
    summary = ev.evaluate(str(model_dir), "sudoku", eval_cfg=eval_cfg, output_dir=out, checkpoints=run_dir, num_eval=6)
    assert [v["name"] for v in summary["variants"]] == ["base", "checkpoint-2", "checkpoint-4"]
    assert [v["step"] for v in summary["variants"]] == [0, 2, 4]
    assert Path(summary["plot"]).is_file() and Path(summary["plot"]).read_bytes()[:4] == b"\x89PNG"
    table = ev.format_table(summary)
    assert all(name in table for name in ("base", "checkpoint-2", "checkpoint-4", "L=32"))

    # each swapped-in adapter generates what a fresh base + that adapter generates
    task, cfg = get_task("sudoku"), EvalConfig(gen_lengths=[32], block_length=16).sampler_for(32)
    rows = task.load(None, "test", 6, 42)
    completions = {}
    for name in ("base", "checkpoint-2", "checkpoint-4"):
        completions[name] = [line["completion"] for line in read_jsonl(out / name / "sudoku_32.generations.jsonl")]
    dlm, tokenizer = load_model(ModelConfig(name_or_path=str(model_dir)))
    from peft import PeftModel

    dlm.model = PeftModel.from_pretrained(dlm.model, str(run_dir / "checkpoint-4" / "adapter"))
    expected, metrics = ev.evaluate_rows(dlm, tokenizer, task, rows, cfg, batch_size=4)
    assert expected == completions["checkpoint-4"]
    assert metrics["accuracy"] == summary["results"]["checkpoint-4"][32]["accuracy"]
    assert metrics["accuracy_reference"] == summary["results"]["checkpoint-4"][32]["accuracy_reference"]
    assert completions["checkpoint-2"] != completions["base"]


def test_full_model_checkpoint(model_dir: Path, tmp_path: Path) -> None:
    other = new_model(tmp_path / "other", seed=1, **SMALL)
    run = tmp_path / "run"
    (run / "checkpoint-5" / "model").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(other / name, run / "checkpoint-5" / "model" / name)
    summary = ev.evaluate(str(model_dir), "sudoku", eval_cfg=EvalConfig(gen_lengths=[32], block_length=16),
                          output_dir=tmp_path / "out", adapter=run / "checkpoint-5", num_eval=4)
    assert [v["name"] for v in summary["variants"]] == ["checkpoint-5"] and summary["plot"] is None
    dlm, tokenizer = load_model(ModelConfig(name_or_path=str(other)))
    task = get_task("sudoku")
    expected, _ = ev.evaluate_rows(dlm, tokenizer, task, task.load(None, "test", 4, 42),
                                   EvalConfig(block_length=16).sampler_for(32))
    lines = read_jsonl(tmp_path / "out" / "checkpoint-5" / "sudoku_32.generations.jsonl")
    assert [line["completion"] for line in lines] == expected
    dlm, tokenizer = ev.load_variant(str(model_dir), run / "checkpoint-5")
    assert ev.evaluate_rows(dlm, tokenizer, task, task.load(None, "test", 4, 42),
                            EvalConfig(block_length=16).sampler_for(32))[0] == expected


def test_plan_batches_and_row_order(model_dir: Path) -> None:
    assert ev.plan_batches([3, 9, 5, 9], 2) == [[1, 3], [2, 0]]  # longest first, ties by index
    dlm, tokenizer = load_model(ModelConfig(name_or_path=str(model_dir)))
    task, cfg = get_task("sudoku"), EvalConfig(block_length=16).sampler_for(32)
    rows = task.load(None, "test", 3, 42)
    for k, row in enumerate(rows):  # different prompt lengths, so sorting reorders the items
        row["question"] += " Think." * (2 - k)
    completions, _ = ev.evaluate_rows(dlm, tokenizer, task, rows, cfg, batch_size=1)
    assert completions == [ev.evaluate_rows(dlm, tokenizer, task, [row], cfg)[0][0] for row in rows]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "nope"], "Unknown task 'nope'"),
        (["--task", "sudoku", "--checkpoints", "/nonexistent/run"], "no such run directory"),
        (["--task", "sudoku", "--gen-lengths", "40", "--block-length", "16"],
         "not a positive multiple of block_length=16"),
    ],
)
def test_bad_inputs_fail_clearly(model_dir: Path, tmp_path: Path, caplog, args: list[str], message: str) -> None:
    assert main(["eval", "--model", str(model_dir), "--output", str(tmp_path), *args]) != 0
    assert message in caplog.text


def test_resume_with_other_settings_is_refused(model_dir: Path, tmp_path: Path, caplog) -> None:
    argv = ["eval", "--model", str(model_dir), *FAST, "--limit", "2", "--output", str(tmp_path)]
    assert main(argv) == 0
    assert main([*argv, "--steps-ratio", "1.0"]) == 2
    assert "another model or settings" in caplog.text


def test_two_processes_match_one(model_dir: Path, tmp_path: Path) -> None:
    common = ["--model", str(model_dir), *FAST, "--batch-size", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    assert main(["eval", *common, "--output", str(tmp_path / "one")]) == 0
    # `accelerate launch --cpu` starts one process unless MPI is set up; --multi_gpu starts torchrun, and
    # on a machine without CUDA the processes form a CPU (gloo) group.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "-m", "egspo.cli", "eval", *common, "--output", str(tmp_path / "two")]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    one = (tmp_path / "one" / "base" / "sudoku_32.generations.jsonl").read_text()
    two = (tmp_path / "two" / "base" / "sudoku_32.generations.jsonl").read_text()
    assert one == two
    metrics = json.loads((tmp_path / "two" / "base" / "sudoku_32.metrics.json").read_text())
    assert metrics["settings"]["num_processes"] == 2 and metrics["n"] == 6
    assert not list((tmp_path / "two" / "base").glob("*.part*"))
