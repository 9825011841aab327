"""The MLX engine (moecluster.engines.mlx) on Linux CPU: correctness only (MLX's CPU matmul is slow here).

1 rank equals mlx-lm's own greedy decoding and the torch engine; 2 ranks on MLX's ring backend are bit-identical
to 1 (logits digest) with contiguous, round-robin and replicated placements; a killed rank is named and the job
ends within the timeout. Skipped where mlx is not installed (`pip install 'moecluster[mlx]'`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tiny_models import build_tiny  # noqa: E402

from moecluster.engine.generate import Engine  # noqa: E402
from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.engines.mlx.expert_parallel import expert_parallel_layers  # noqa: E402
from moecluster.engines.mlx.generate import MlxEngine  # noqa: E402
from moecluster.engines.mlx.loading import load_mlx_model, switch_layers  # noqa: E402
from moecluster.loading import load_model  # noqa: E402

PROMPT = "hello world, the experts"
ARCHES = ("mixtral", "qwen3_moe", "deepseek_v3")
MORE_ARCHES = ("glm4_moe", "qwen2_moe", "gpt_oss")  # supported since: config fixups, gpt_oss.py's layout
# the one-rank comparisons past Mixtral take ~10 s each here: slow
ONE_RANK = [
    "mixtral",
    *(pytest.param(a, marks=pytest.mark.slow) for a in ("qwen3_moe", "deepseek_v3", "olmoe", *MORE_ARCHES)),
]
# mlx-lm's qwen2_moe makes every layer an MoE layer: a checkpoint with mlp_only_layers is refused (test_mlx_models)
OVERRIDES: dict[str, dict] = {"qwen2_moe": dict(mlp_only_layers=[])}
QUANTIZED = ("mixtral", "qwen3_moe")
# dims that 4-bit groups of 32 divide (mlx_lm.convert leaves other matrices unquantized)
QUANT_DIMS = {"mixtral": dict(intermediate_size=64), "qwen3_moe": dict(moe_intermediate_size=64, intermediate_size=128)}


class _Built(dict):
    """Tiny checkpoints by architecture, each built on first use (a test that needs Mixtral builds no other)."""

    def __init__(self, factory, mixtral: Path):
        super().__init__(mixtral=mixtral)
        self.factory = factory

    def __missing__(self, arch: str) -> Path:
        self[arch] = build_tiny(arch, self.factory.mktemp(arch), **OVERRIDES.get(arch, {}))
        return self[arch]


@pytest.fixture(scope="module")
def mlx_models(tmp_path_factory, tiny_mixtral) -> dict[str, Path]:
    return _Built(tmp_path_factory, tiny_mixtral)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> dict[str, Path]:
    """4-bit (group 32) MLX checkpoints made by `mlx_lm.convert -q` from tiny HF checkpoints, as mlx-community's."""
    from mlx_lm.convert import convert

    from moecluster.engines.mlx.loading import config_fixups

    out = {}
    for arch in QUANTIZED:
        hf = build_tiny(arch, tmp_path_factory.mktemp(arch), **QUANT_DIMS[arch])
        cfg = json.loads((hf / "config.json").read_text())  # keys mlx-lm reads at top level, as the Hub's configs
        (hf / "config.json").write_text(json.dumps({**cfg, **config_fixups(cfg)}))
        out[arch] = tmp_path_factory.mktemp("q") / f"{arch}-4bit"
        convert(str(hf), str(out[arch]), quantize=True, q_group_size=32, q_bits=4)
    return out


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True).validate()


@pytest.mark.parametrize("arch", ONE_RANK)
def test_one_rank_equals_mlx_lm_and_torch(mlx_models, arch):
    from mlx_lm.generate import generate_step

    model_dir = mlx_models[arch]
    engine = MlxEngine(model_dir)
    ids = engine.tokenizer.encode(PROMPT)
    _, ours, _ = engine.generate(ids, greedy())
    # mlx-lm's own greedy decoding (generate_step, the loop under generate/stream_generate) on its own model
    plain, _ = load_mlx_model(model_dir)
    theirs = [int(t) for t, _ in generate_step(mx.array(ids), plain, max_tokens=12)]
    assert ours == theirs
    torch_engine = Engine(load_model(model_dir, "fp32"))
    _, torch_tokens, _ = torch_engine.generate(ids, greedy())
    assert ours == torch_tokens
    # logits of a full forward within 1e-4 of the torch engine's, and of plain mlx-lm's
    model = load_model(model_dir, "fp32").model
    model.setup_cache(1)
    with torch.inference_mode():
        want = model(torch.tensor([ids]), torch.tensor([0]))[0].float().numpy()
    got = engine.logits(ids)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - np.array(plain(mx.array([ids]))[0])).max() <= 1e-5


def test_rank_loads_only_its_experts(mlx_models):
    """Experts this rank does not hold are never read: after loading, each MoE layer keeps e of E rows."""
    engine = MlxEngine(mlx_models["mixtral"])
    layers = expert_parallel_layers(engine.model)
    assert [m.expert_ids for m in layers] == [list(range(8))] * 3
    assert layers[0].gate_proj.weight.shape[0] == 8


@pytest.mark.slow
@pytest.mark.parametrize("arch", QUANTIZED)
def test_quantized_checkpoint_reads_only_this_ranks_rows(quantized, arch):
    """A 4-bit mlx_lm.convert checkpoint: 1 rank equals mlx-lm's own decoding of it; rank 1 of 2 (round-robin) reads
    from disk exactly its experts' rows of every stacked weight/scales/biases array, equal to those rows."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    from moecluster.engines.mlx.comm import MlxComm
    from moecluster.engines.mlx.expert_parallel import apply_expert_parallel
    from moecluster.engines.mlx.stacked import StackedRows
    from moecluster.parallel.placement import make_placement

    engine = MlxEngine(quantized[arch])
    ids = engine.tokenizer.encode(PROMPT)
    _, ours, _ = engine.generate(ids, greedy())
    plain, _ = load_mlx_model(quantized[arch])
    assert ours == [int(t) for t, _ in generate_step(mx.array(ids), plain, max_tokens=12)]

    class Rank1of2:
        def rank(self) -> int:
            return 1

        def size(self) -> int:
            return 2

    placement = make_placement("round-robin", 8, engine.placement.num_layers, 2)
    disk = StackedRows(quantized[arch])
    model, _ = load_mlx_model(quantized[arch], lambda layer: placement.experts_of(1, layer), None, disk)
    apply_expert_parallel(model, MlxComm(Rank1of2()), placement, disk)
    stacked_bytes = sum(disk.infos[name].nbytes for name in disk.deferred.values())
    assert len(disk.deferred) == 9 * engine.placement.num_layers  # 3 projections x weight, scales, biases
    assert disk.bytes_read * 2 == stacked_bytes
    ours_layer, full_layer = expert_parallel_layers(model)[0], switch_layers(plain)[0][2]
    assert isinstance(ours_layer.gate_proj, QuantizedSwitchLinear)
    assert ours_layer.expert_ids == [1, 3, 5, 7]
    for name in ("weight", "scales", "biases"):
        got, full = ours_layer.down_proj[name], full_layer.down_proj[name]  # type: ignore[index]
        assert got.shape[0] == 4 and mx.array_equal(got, full[mx.array([1, 3, 5, 7])]).item()


def run_cli(
    model_dir: Path, tmp_path: Path, nodes: int, placement: str, name: str, max_tokens: int = 10, timeout: float = 60.0
) -> dict:
    report = tmp_path / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "moecluster.cli",
        "generate",
        "--engine",
        "mlx",
        "--model",
        str(model_dir),
        "--prompt",
        PROMPT,
        "--max-tokens",
        str(max_tokens),
        "--ignore-eos",
        "--quiet",
        "--nodes",
        str(nodes),
        "--placement",
        placement,
        "--timeout",
        "20",
        "--report",
        str(report),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(report.read_text())


@pytest.mark.multirank
@pytest.mark.parametrize("arch", ARCHES[:2])  # DeepSeek-V3: test_three_ranks_bit_identical_to_one (suite time)
def test_two_ranks_bit_identical_to_one(mlx_models, tmp_path, arch):
    one = run_cli(mlx_models[arch], tmp_path, 1, "contiguous", "one")
    assert one["stats"]["logits_digest"]
    for placement in ("contiguous", "round-robin", "groups"):  # groups on 2 ranks: every expert on both
        two = run_cli(mlx_models[arch], tmp_path, 2, placement, placement)
        assert two["tokens"] == one["tokens"], placement
        assert two["stats"]["logits_digest"] == one["stats"]["logits_digest"], placement
        copies = two["expert_copies"]
        num_moe = one["expert_copies"][0] // 8
        assert copies == ([8 * num_moe] * 2 if placement == "groups" else [4 * num_moe] * 2), placement


@pytest.mark.multirank
@pytest.mark.parametrize("arch", QUANTIZED)
def test_quantized_two_ranks_bit_identical_to_one(quantized, tmp_path, arch):
    one = run_cli(quantized[arch], tmp_path, 1, "contiguous", "one")
    for placement in ("round-robin",):  # rows 1, 3, 5, 7 on rank 1: not one contiguous read
        two = run_cli(quantized[arch], tmp_path, 2, placement, placement)
        assert two["tokens"] == one["tokens"], placement
        assert two["stats"]["logits_digest"] == one["stats"]["logits_digest"], placement


@pytest.mark.multirank
@pytest.mark.parametrize("arch", MORE_ARCHES)
def test_more_architectures_two_ranks_bit_identical_to_one(mlx_models, tmp_path, arch):
    one = run_cli(mlx_models[arch], tmp_path, 1, "contiguous", "one", max_tokens=6)
    two = run_cli(mlx_models[arch], tmp_path, 2, "round-robin", "two", max_tokens=6)
    assert two["tokens"] == one["tokens"] and two["stats"]["logits_digest"] == one["stats"]["logits_digest"]
    assert two["expert_copies"] == [one["expert_copies"][0] // 2] * 2


@pytest.mark.multirank
def test_three_ranks_bit_identical_to_one(mlx_models, tmp_path):
    """3 ranks (8 experts: 3/3/2) with contiguous and round-robin placements, DeepSeek-V3 (shared experts,
    group-limited routing)."""
    one = run_cli(mlx_models["deepseek_v3"], tmp_path, 1, "contiguous", "one")
    for placement in ("contiguous", "round-robin"):
        three = run_cli(mlx_models["deepseek_v3"], tmp_path, 3, placement, placement, timeout=90)
        assert three["stats"]["logits_digest"] == one["stats"]["logits_digest"], placement
        assert len(three["expert_copies"]) == 3 and sum(three["expert_copies"]) == one["expert_copies"][0]


def _rank_pids(launcher: subprocess.Popen) -> dict[int, int]:
    """rank -> pid of the ranks whose watchdog helper is up (the job is past start-up)."""
    import psutil

    out = {}
    for child in psutil.Process(launcher.pid).children(recursive=True):
        try:
            rank, cmd = child.environ().get("MLX_RANK"), " ".join(child.cmdline())
            helper = any("moecluster.engines.mlx.watchdog" in " ".join(c.cmdline()) for c in child.children())
        except psutil.Error:
            continue
        if rank is not None and "moecluster.cli" in cmd and helper:
            out[int(rank)] = child.pid
    return out


@pytest.mark.multirank
def test_killed_rank_is_named_and_job_ends_within_timeout(mlx_models):
    timeout = 15
    cmd = [
        sys.executable,
        "-m",
        "moecluster.cli",
        "generate",
        "--engine",
        "mlx",
        "--model",
        str(mlx_models["mixtral"]),
        "--prompt",
        PROMPT,
        "--max-tokens",
        "100000",
        "--ignore-eos",
        "--quiet",
        "--nodes",
        "2",
        "--timeout",
        str(timeout),
    ]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        pids: dict[int, int] = {}
        while len(pids) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
            pids = _rank_pids(launcher)
        assert len(pids) == 2, "ranks did not start"
        time.sleep(3)  # loaded and decoding
        assert launcher.poll() is None
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = launcher.communicate(timeout=timeout + 10)
        elapsed = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode != 0
    assert elapsed < timeout, err
    assert "moecluster: rank 0: rank 1 stopped" in err, err
