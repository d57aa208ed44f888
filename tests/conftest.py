"""Shared fixtures: tiny diffusion LMs built locally (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from egspo.models.adapter import DiffusionLM

TOY_VOCAB = 40
TOY_MASK = 3
TOY_EOS = 2


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
