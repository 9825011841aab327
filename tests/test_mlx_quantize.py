"""`--quantize int8|int4` on the MLX engine: MLX's own affine quantization of each rank's routed experts.

1 rank equals mlx-lm's model with its SwitchLinear layers quantized by `nn.quantize` (the same MLX kernels); 2 ranks
are bit-identical to 1; bad group sizes and already-quantized experts are one clear error each.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import numpy as np  # noqa: E402
from tiny_models import build_tiny  # noqa: E402

from moecluster.engines.mlx.expert_parallel import expert_parallel_layers  # noqa: E402
from moecluster.engines.mlx.generate import MlxEngine  # noqa: E402
from moecluster.engines.mlx.loading import load_mlx_model  # noqa: E402
from moecluster.engines.mlx.quantize import quantize_experts  # noqa: E402
from moecluster.errors import MoeClusterError  # noqa: E402

PROMPT = "hello world, the experts"


@pytest.fixture(scope="module")
def mixtral64(tmp_path_factory) -> Path:
    """Tiny Mixtral whose expert input dims (D 64, F 64) MLX groups of 32 and 64 divide."""
    return build_tiny("mixtral", tmp_path_factory.mktemp("mixtral64"), intermediate_size=64)


@pytest.mark.parametrize("fmt,bits", [("int4", 4), ("int8", 8)])
def test_one_rank_equals_mlx_quantized_switch_layers(mixtral64, fmt, bits):
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    engine = MlxEngine(mixtral64, quantize=fmt, quant_group_size=32)
    ids = engine.tokenizer.encode(PROMPT)
    plain, _ = load_mlx_model(mixtral64, dtype="fp32")
    full = np.array(plain(mx.array([ids]))[0])
    nn.quantize(plain, group_size=32, bits=bits, class_predicate=lambda _, m: isinstance(m, SwitchLinear))
    want = np.array(plain(mx.array([ids]))[0])
    got = engine.logits(ids)
    assert np.abs(got - want).max() <= 1e-5
    assert np.abs(got - full).max() > 1e-4  # the experts really are quantized
    layer = expert_parallel_layers(engine.model)[0]
    assert isinstance(layer.down_proj, QuantizedSwitchLinear) and layer.down_proj.bits == bits
    assert engine.expert_bytes() == 3 * 64 * (64 * bits // 8 + 2 * 4 * 64 // 32)  # packed + fp32 scale, bias


def test_bad_group_size_and_double_quantization_are_one_error(mixtral64):
    with pytest.raises(MoeClusterError, match=r"--quant-group-size 48: MLX's affine quantization takes 32, 64, 128"):
        MlxEngine(mixtral64, quantize="int4", quant_group_size=48)
    with pytest.raises(MoeClusterError, match=r"--quant-group-size 128.*input dims \[64\]"):
        MlxEngine(mixtral64, quantize="int8", quant_group_size=128)
    engine = MlxEngine(mixtral64, quantize="int4", quant_group_size=64)
    with pytest.raises(MoeClusterError, match="already quantized"):
        quantize_experts(expert_parallel_layers(engine.model), "int4", 64)


def _generate(model_dir: Path, tmp_path: Path, nodes: int, name: str) -> dict:
    report = tmp_path / f"{name}.json"
    cmd = [
        sys.executable, "-m", "moecluster.cli", "generate", "--engine", "mlx", "--model", str(model_dir),
        "--prompt", PROMPT, "--max-tokens", "6", "--ignore-eos", "--quiet", "--nodes", str(nodes),
        "--placement", "round-robin", "--quantize", "int4", "--quant-group-size", "32", "--timeout", "20",
        "--report", str(report),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(report.read_text())


@pytest.mark.multirank
def test_quantized_two_ranks_bit_identical_to_one(mixtral64, tmp_path):
    one = _generate(mixtral64, tmp_path, 1, "one")
    two = _generate(mixtral64, tmp_path, 2, "two")
    assert two["tokens"] == one["tokens"] and two["stats"]["logits_digest"] == one["stats"]["logits_digest"]
    assert two["expert_copies"] == [one["expert_copies"][0] // 2] * 2


def test_cli_checks_the_group_size_before_loading(mixtral64):
    from cli_runner import run_cli

    args = ["--engine", "mlx", "--model", str(mixtral64), "--quantize", "int4", "--quant-group-size", "256"]
    res = run_cli("generate", *args, "--prompt", "hi")
    assert res.returncode == 2 and "MLX's affine quantization takes 32, 64, 128" in res.stderr
    res = run_cli("generate", *args[:6], "--quantize-dense", "--prompt", "hi")
    assert res.returncode == 2 and "--engine mlx does not support --quantize-dense" in res.stderr
