"""Expert parallelism with real processes: distributed output equals the single-process output."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from ep_worker import PROMPT
from safetensors.torch import load_file

from moecluster.distributed.launch import launch_local
from moecluster.engine.generate import Engine
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model

WORKER = str(Path(__file__).parent / "ep_worker.py")
_single_cache: dict = {}


def single_rank(model_dir: Path) -> tuple[torch.Tensor, list[int]]:
    if model_dir not in _single_cache:
        torch.set_num_threads(1)  # as each rank runs (fp32 BLAS may split reductions by thread count)
        engine = Engine(load_model(model_dir, "fp32"))
        with torch.inference_mode():
            logits = engine.model(torch.tensor([PROMPT]), torch.tensor([0]))[0]
        _, tokens, _ = engine.generate(PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))
        _single_cache[model_dir] = (logits, tokens)
    return _single_cache[model_dir]


def replicated_placement(path: Path, num_experts: int, num_layers: int, world_size: int) -> str:
    """Every expert on two ranks; in the last MoE layer rank world_size-1 holds nothing at all."""
    layers = []
    for layer in range(num_layers):
        if layer == num_layers - 1:
            layers.append([[e % (world_size - 1)] for e in range(num_experts)])
        else:
            layers.append([[e % world_size, (e + 1) % world_size] for e in range(num_experts)])
    path.write_text(
        json.dumps(
            {
                "format": "moecluster-placement/1",
                "num_experts": num_experts,
                "num_layers": num_layers,
                "world_size": world_size,
                "layers": layers,
            }
        )
    )
    return str(path)


def run_jobs(jobs: list[dict], backend: str, world_size: int, tmp_path: Path) -> dict[str, tuple]:
    """Run every (model, placement) job in one launch of `world_size` ranks; rank 0's outputs by job name."""
    jobs_path = tmp_path / "jobs.json"
    jobs_path.write_text(json.dumps(jobs))
    code = launch_local(
        [sys.executable, WORKER, str(jobs_path), backend, str(tmp_path)], world_size, backend, timeout_s=120
    )
    assert code == 0
    out = {}
    for job in jobs:
        data = load_file(str(tmp_path / f"{job['name']}.safetensors"))
        out[job["name"]] = (data["logits"], data["tokens"].tolist())
    return out


CASES = [("mpi", 2), ("mpi", 3), ("mpi", 4), ("torch", 2)]


@pytest.mark.parametrize("backend, world_size", CASES)
@pytest.mark.multirank
def test_distributed_bit_identical_to_single(backend, world_size, tiny_models, tmp_path):
    """Every architecture, contiguous / round-robin / replicated placement: logits and 32 greedy tokens on
    N ranks are bit-identical to one process."""
    from moecluster.loading import read_config

    archs = tiny_models if backend == "mpi" else {a: tiny_models[a] for a in ("dbrx", "qwen2_moe")}
    jobs = []
    for arch, model_dir in archs.items():
        shape = read_config(model_dir)[1].shape()
        replicated = replicated_placement(
            tmp_path / f"{arch}-replicated.json", shape.num_experts, shape.num_moe_layers, world_size
        )
        for name, placement in (
            ("contiguous", "contiguous"),
            ("round-robin", "round-robin"),
            ("replicated", replicated),
        ):
            jobs.append({"name": f"{arch}-{name}", "model": str(model_dir), "placement": placement})
    results = run_jobs(jobs, backend, world_size, tmp_path)
    for job in jobs:
        logits, tokens = results[job["name"]]
        ref_logits, ref_tokens = single_rank(Path(job["model"]))
        assert torch.equal(logits, ref_logits), (job["name"], (logits - ref_logits).abs().max())
        assert tokens == ref_tokens, job["name"]


@pytest.mark.multirank
@pytest.mark.slow
def test_cli_generate_two_ranks_matches_one(tiny_mixtral, tmp_path):
    outs = []
    for nodes in (1, 2):
        report = tmp_path / f"r{nodes}.json"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "moecluster.cli",
                "generate",
                "--model",
                str(tiny_mixtral),
                "--prompt",
                "Hello world",
                "--max-tokens",
                "16",
                "--ignore-eos",
                "--dtype",
                "fp32",
                "--nodes",
                str(nodes),
                "--placement",
                "round-robin",
                "--report",
                str(report),
                "--trace",
                str(tmp_path / f"t{nodes}.json"),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        outs.append(json.loads(report.read_text()))
    assert outs[0]["tokens"] == outs[1]["tokens"] and outs[0]["text"] == outs[1]["text"]
    ranks = outs[1]["ranks"]
    assert [r["experts_layer0"] for r in ranks] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert ranks[0]["trace"]["per_step"]["all_reduce"] > 0
    trace = json.loads((tmp_path / "t2.json").read_text())
    assert trace["world_size"] == 2 and len(trace["ranks"]) == 2
    assert all("all_reduce" in step["layers"]["0"] for step in trace["ranks"][1]["steps"])


def _rank_process(parent: psutil.Process, rank: int) -> psutil.Process | None:
    for child in parent.children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "--rank-worker" in " ".join(child.cmdline()) and env.get("PMI_RANK", env.get("RANK")) == str(rank):
            return child
    return None


@pytest.mark.parametrize("backend", ["mpi", "torch"])
@pytest.mark.multirank
@pytest.mark.slow
def test_killed_rank_stops_the_others(tiny_dbrx, backend):
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moecluster.cli",
            "generate",
            "--model",
            str(tiny_dbrx),
            "--prompt",
            "Hello",
            "--max-tokens",
            "100000",
            "--ignore-eos",
            "--nodes",
            "2",
            "--backend",
            backend,
            "--timeout",
            "20",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        proc.stdout.read(1)  # rank 0 has produced text: generation is under way
        victim = _rank_process(psutil.Process(proc.pid), 1)
        assert victim is not None
        everyone = psutil.Process(proc.pid).children(recursive=True)
        t0 = time.monotonic()
        victim.kill()
        _, err = proc.communicate(timeout=40)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert elapsed < 30, elapsed
    assert "rank 1" in err, err
    time.sleep(0.5)
    assert not [p for p in everyone if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.multirank
@pytest.mark.slow
def test_each_rank_holds_only_its_experts_in_memory(tmp_path):
    """Peak RSS of each of 2 ranks reflects half the experts (each reads only its rows of the shards)."""
    from moecluster.builtin import build_dbrx_checkpoint

    model = build_dbrx_checkpoint(tmp_path / "m", "rss", dtype=torch.float32)  # 384 MB of experts in fp32
    reports = {}
    for nodes in (1, 2):
        out = tmp_path / f"r{nodes}.json"
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "moecluster.cli",
                "generate",
                "--model",
                str(model),
                "--prompt",
                "Hello",
                "--max-tokens",
                "2",
                "--nodes",
                str(nodes),
                "--report",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr
        reports[nodes] = json.loads(out.read_text())["ranks"]
    one = reports[1][0]
    expert_bytes = one["expert_bytes"]
    assert expert_bytes > 350e6
    for rank in reports[2]:
        assert abs(rank["expert_bytes"] - expert_bytes / 2) < 1e6
        # half the experts fewer resident (allow 25% of that for allocator and page-cache noise)
        assert rank["peak_rss_bytes"] < one["peak_rss_bytes"] - 0.75 * expert_bytes / 2, (rank, one)
