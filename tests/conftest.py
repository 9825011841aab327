"""Fixtures: tiny random-weight DBRX and Mixtral checkpoints written by transformers itself (the oracle),
with a tokenizer trained on the spot."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import ARCHES, build_tiny  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_dbrx(tmp_path_factory) -> Path:
    return build_tiny("dbrx", tmp_path_factory.mktemp("dbrx"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> Path:
    return build_tiny("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_dbrx, tiny_mixtral) -> dict[str, Path]:
    """Every supported architecture's tiny checkpoint (DBRX and Mixtral shared with their own fixtures)."""
    out = {"dbrx": tiny_dbrx, "mixtral": tiny_mixtral}
    for arch in ARCHES:
        if arch not in out:
            out[arch] = build_tiny(arch, tmp_path_factory.mktemp(arch))
    return out


@pytest.fixture(params=ARCHES)
def tiny_model(request, tiny_models) -> Path:
    return tiny_models[request.param]


# The machine's two cores, split between pytest-xdist workers (scripts/test.sh runs the fast subset on two):
# two workers with two intra-op threads each oversubscribe the cores, and OpenMP spin-waits burn the excess.
THREADS = max(1, 2 // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


@pytest.fixture(autouse=True)
def _threads():
    import torch  # here, not at the top: the xdist controller loads this file but runs no test

    torch.set_num_threads(THREADS)
