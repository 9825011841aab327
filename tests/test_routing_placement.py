"""Placement driven by routing recorded from a real model: the optimizer beats contiguous on it, and the
placement it writes gives the same greedy tokens as one process."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from test_expert_parallel import run_jobs, single_rank

from moecluster.parallel.placement import load_placement_file
from moecluster.planning.placement_metrics import observed_max_rank_load
from moecluster.planning.routing_stats import RoutingStats

PROMPTS = [
    "The quick brown fox jumps over the lazy dog",
    "Mixture of experts models route every token",
    "Hello world! How are you today?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9",
    "A small cluster of ordinary machines can serve a large model",
]


def cli(*args: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "moecluster.cli", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.multirank
@pytest.mark.slow
def test_recorded_routing_optimized_beats_contiguous_and_keeps_output(tiny_dbrx, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS * 4))
    stats_path = tmp_path / "stats.json"
    cli(
        "profile-routing",
        "--model",
        str(tiny_dbrx),
        "--prompts",
        str(prompts),
        "--out",
        str(stats_path),
        "--max-tokens",
        "24",
        "--dtype",
        "fp32",
    )
    stats = RoutingStats.load(str(stats_path))
    layer0 = stats.to_json()["layers"][0]
    assert layer0["tokens"] > 200 and sum(layer0["counts"]) == layer0["tokens"] * 2
    loads = {}
    for strategy in ("contiguous", "optimized"):
        out = tmp_path / f"{strategy}.json"
        cli(
            "place",
            "--model",
            str(tiny_dbrx),
            "--nodes",
            "2",
            "--stats",
            str(stats_path),
            "--strategy",
            strategy,
            "--out",
            str(out),
        )
        loads[strategy] = observed_max_rank_load(load_placement_file(str(out)), stats)
    assert sum(loads["optimized"]) < sum(loads["contiguous"]), loads
    job = {"name": "optimized", "model": str(tiny_dbrx), "placement": str(tmp_path / "optimized.json")}
    logits, tokens = run_jobs([job], "mpi", 2, tmp_path)["optimized"]
    ref_logits, ref_tokens = single_rank(tiny_dbrx)
    assert tokens == ref_tokens
    assert torch.equal(logits, ref_logits)
