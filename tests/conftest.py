"""Shared fixtures: tiny diffusion LMs built locally (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from egspo.models.adapter import DiffusionLM
from egspo.models.tiny import new_model

TOY_VOCAB = 40
TOY_MASK = 3
TOY_EOS = 2
#: A micro LLaDA for end-to-end trainer tests (seconds on a CPU).
MICRO = dict(d_model=64, n_layers=2, n_heads=2, n_kv_heads=2, mlp_hidden_size=128)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on shared cores their spin-waits cost seconds
    (``pytestmark = pytest.mark.usefixtures("one_thread")`` in a module that runs them a lot)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def bert_dlm() -> DiffusionLM:
    """A random 2-layer BERT masked LM through the generic (non-native) adapter path."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=TOY_VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForMaskedLM(config).eval()
    return DiffusionLM(model=model, mask_id=TOY_MASK, stop_ids=(TOY_EOS,))


@pytest.fixture(scope="module")
def micro_model(tmp_path_factory) -> Path:
    return new_model(tmp_path_factory.mktemp("micro") / "model", preset="tiny", seed=0, **MICRO)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"say {i}"}) + "\n" for i in range(16)))
    return path
