"""Checkpoint manifests: damage is found, named, and resume falls back to the newest intact checkpoint.

The checkpoints come from the real save path: a two-step run of the micro LLaDA (full weights) that
saves after each step.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from egspo.checkpoint import MANIFEST, CheckpointError, latest_checkpoint, verify_checkpoint, write_manifest
from egspo.config import ConfigError
from egspo.rl.trainer import EGSPOTrainer
from tests.test_trainer import make_config

WEIGHTS = "model/model.safetensors"


@pytest.fixture(scope="module")
def saved_run(micro_model, prompts_file, tmp_path_factory):
    """(config maker, run directory) of a finished 2-step run with checkpoint-1 and checkpoint-2."""
    def config(out):
        return make_config(micro_model, prompts_file, out, "max_steps=2", "save_steps=1")

    run = tmp_path_factory.mktemp("saved") / "run"
    EGSPOTrainer(args=config(run)).train()
    return config, run


@pytest.fixture
def run(saved_run, tmp_path):
    """A private copy of the saved run, free to damage."""
    config, source = saved_run
    copy = tmp_path / "run"
    shutil.copytree(source, copy)
    return config, copy


def _truncate(path, keep=0.5):
    with path.open("r+b") as handle:
        handle.truncate(int(path.stat().st_size * keep))


def test_every_file_is_in_the_manifest(run):
    _, run_dir = run
    ckpt = run_dir / "checkpoint-2"
    files = json.loads((ckpt / MANIFEST).read_text())["files"]
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert set(files) == on_disk and WEIGHTS in files
    assert files[WEIGHTS]["size"] == (ckpt / WEIGHTS).stat().st_size
    verify_checkpoint(ckpt)
    assert not list(run_dir.glob(".tmp-*")) and not list(ckpt.glob("*.tmp"))


def test_resume_skips_a_truncated_newest_checkpoint(run, caplog):
    config, run_dir = run
    _truncate(run_dir / "checkpoint-2" / WEIGHTS)
    resumed = EGSPOTrainer(args=config(run_dir))
    started = []

    class RecordStart:
        def on_train_begin(self, args, state, control, **kwargs):
            started.append(state.global_step)

    resumed.callbacks.callbacks.append(RecordStart())
    with caplog.at_level(logging.WARNING, logger="egspo.checkpoint"):
        resumed.train(resume_from_checkpoint=True)
    assert started == [1]  # from checkpoint-1
    warning = next(r.getMessage() for r in caplog.records if "checkpoint-2" in r.getMessage())
    assert WEIGHTS in warning and "truncated" in warning
    verify_checkpoint(run_dir / "checkpoint-2")  # written again, whole


@pytest.mark.parametrize("damage, message", [
    (lambda c: _truncate(c / WEIGHTS), f"{WEIGHTS} has .* bytes where .* were written"),
    (lambda c: (c / "optimizer.pt").unlink(), "optimizer.pt is missing"),
    (lambda c: (c / "scheduler.pt").write_bytes(bytes(reversed((c / "scheduler.pt").read_bytes()))),
     "contents of scheduler.pt changed"),
    (lambda c: (c / MANIFEST).unlink(), f"has no {MANIFEST}"),
    (lambda c: (c / MANIFEST).write_text("{"), f"{MANIFEST} is unreadable"),
])
def test_verify_names_the_damaged_file(run, damage, message):
    _, run_dir = run
    ckpt = run_dir / "checkpoint-2"
    damage(ckpt)
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} .*{message}"):
        verify_checkpoint(ckpt)
    assert latest_checkpoint(run_dir) == run_dir / "checkpoint-1"


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(run):
    _, run_dir = run
    for step in (1, 2):
        _truncate(run_dir / f"checkpoint-{step}" / WEIGHTS)
    with pytest.raises(CheckpointError, match="no intact checkpoint: .*checkpoint-2.*checkpoint-1"):
        latest_checkpoint(run_dir)
    assert issubclass(CheckpointError, ConfigError)  # the CLI reports it as a sentence
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        verify_checkpoint(run_dir / "checkpoint-9")


def test_write_manifest_records_a_checkpoint_written_without_one(run):
    _, run_dir = run
    ckpt = run_dir / "checkpoint-2"
    (ckpt / MANIFEST).unlink()
    write_manifest(ckpt)
    verify_checkpoint(ckpt)
