"""Shared fixtures: the tiny model for fast tests, the offline model for the few slow ones."""

from __future__ import annotations

import pytest
import torch

from loracore.models import load_base_model


@pytest.fixture
def tiny():
    """A fresh tiny Qwen2 and its byte tokenizer (same seed, same weights, every time)."""
    return load_base_model("tiny-qwen2", verbose=False)


@pytest.fixture
def smollm2():
    """A fresh SmolLM2-135M-Instruct from the offline cache (about a second once cached)."""
    return load_base_model("smollm2-135m", verbose=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
