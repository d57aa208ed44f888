"""Third-party chatter stays off the console by default; -v shows it."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import yaml

from egspo.quiet import DEEPSPEED_LOGGER, _deepspeed_filter, quiet_third_party

SRC = Path(__file__).resolve().parents[1] / "src"


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "egspo.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300, check=False)


def _noise(text: str) -> list[str]:
    marks = ("[WARNING]", "real_accelerator", "Setting accelerator", "FutureWarning", "DeprecationWarning")
    return [line for line in text.splitlines() if any(mark in line for mark in marks)]


def test_config_prints_only_the_config(tmp_path):
    proc = _cli("config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc.stderr) == [] and _noise(proc.stdout) == []
    assert "model_name_or_path" in yaml.safe_load(proc.stdout)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs the deepspeed package")
def test_new_model_hides_deepspeed_accelerator_message(tmp_path):
    # new-model imports deepspeed (through transformers), which prints its accelerator detection to stdout
    proc = _cli("new-model", "--out", str(tmp_path / "m"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _noise(proc.stdout + proc.stderr) == []


@pytest.fixture
def deepspeed_logger():
    logger = logging.getLogger(DEEPSPEED_LOGGER)
    yield logger
    logger.removeFilter(_deepspeed_filter)


@pytest.mark.parametrize("verbose", [False, True])
def test_filters_hide_library_deprecations_and_deepspeed_detection(deepspeed_logger, verbose):
    record = logging.LogRecord(DEEPSPEED_LOGGER, logging.WARNING, "real_accelerator.py", 213,
                               "Setting accelerator to CPU. If you have GPU ...", None, None)
    other = logging.LogRecord(DEEPSPEED_LOGGER, logging.WARNING, "engine.py", 1, "ZeRO stage 3 needs ...", None, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party(verbose=verbose)
        for module in ("transformers.modeling_utils", "peft.peft_model", "egspo.models.lora"):
            warnings.warn_explicit("`is_gradient_checkpointing` is deprecated", FutureWarning, "x.py", 1,
                                   module=module, registry={})
    shown = [w.filename for w in caught]
    assert len(shown) == (3 if verbose else 1)  # egspo's own deprecations always show
    assert deepspeed_logger.filter(record) is verbose
    assert deepspeed_logger.filter(other)
