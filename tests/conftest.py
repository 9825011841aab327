"""Fixtures: tiny random-weight DBRX and Mixtral checkpoints written by transformers itself (the oracle),
with a tokenizer trained on the spot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import build_tiny  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dbrx(tmp_path_factory) -> Path:
    return build_tiny("dbrx", tmp_path_factory.mktemp("dbrx"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    return build_tiny("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(params=["dbrx", "mixtral"])
def tiny_model(request, tiny_dbrx, tiny_mixtral) -> Path:
    return {"dbrx": tiny_dbrx, "mixtral": tiny_mixtral}[request.param]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
