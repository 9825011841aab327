"""Model types the MLX engine adapts mlx-lm's model files to: gpt-oss from transformers' checkpoint layout (against
mlx-lm's own sanitize of OpenAI's layout; each rank reads only its experts' rows), and the config keys mlx-lm's
qwen2_moe ignores (one clear error). 1 rank = torch and 2 ranks = 1 for these: tests/test_mlx_engine.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

import numpy as np  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from tiny_models import HF_COMMON, build_tiny  # noqa: E402

from moecluster.engine.sampling import SamplingParams  # noqa: E402
from moecluster.engines.mlx.comm import MlxComm  # noqa: E402
from moecluster.engines.mlx.expert_parallel import apply_expert_parallel, expert_parallel_layers  # noqa: E402
from moecluster.engines.mlx.generate import MlxEngine  # noqa: E402
from moecluster.engines.mlx.loading import config_fixups, load_mlx_model, switch_layers  # noqa: E402
from moecluster.engines.mlx.stacked import StackedRows  # noqa: E402
from moecluster.errors import MoeClusterError  # noqa: E402
from moecluster.parallel.placement import make_placement  # noqa: E402

# what mlx-lm's gpt_oss file hard-codes (SwiGLU limit 7, YaRN correction range rounded): its own decoding applies
MLX_LM_GPT_OSS: dict[str, Any] = dict(
    swiglu_limit=7.0, rope_parameters={**HF_COMMON["gpt_oss"][2]["rope_parameters"], "truncate": True}
)


class Rank1of2:
    def rank(self) -> int:
        return 1

    def size(self) -> int:
        return 2


def _openai_layout(src: Path, dst: Path) -> Path:
    """A copy of a transformers gpt-oss checkpoint in OpenAI's layout (what mlx-lm's sanitize reads, unquantized):
    gate_up_proj [E, 2F, D] rows interleaved, down_proj [E, D, F]; top-level config keys as the Hub's."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    for key in list(tensors):  # named "<...>.weight": mlx-lm's sanitize de-interleaves gate/up rows itself
        if key.endswith(("experts.gate_up_proj", "experts.down_proj")):
            tensors[f"{key}.weight"] = np.ascontiguousarray(tensors.pop(key).transpose(0, 2, 1))
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **config_fixups(cfg)}))
    return dst


@pytest.mark.slow
def test_gpt_oss_transformers_layout_equals_mlx_lm_on_openai_layout(tmp_path):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load_model as mlx_lm_load_model

    hf = build_tiny("gpt_oss", tmp_path / "hf", **MLX_LM_GPT_OSS)
    theirs_model, _ = mlx_lm_load_model(_openai_layout(hf, tmp_path / "openai"))  # mlx-lm alone: its sanitize
    engine = MlxEngine(hf)
    ids = engine.tokenizer.encode("hello world, the experts")
    _, ours, _ = engine.generate(ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True).validate())
    assert ours == [int(t) for t, _ in generate_step(mx.array(ids), theirs_model, max_tokens=8)]
    theirs = np.array(theirs_model(mx.array([ids]))[0].astype(mx.float32))
    assert np.abs(engine.logits(ids) - theirs).max() <= 1e-5


def test_gpt_oss_rank_reads_only_its_rows(tmp_path):
    """Rank 1 of 2 (round-robin) preads exactly its experts' rows of transformers' stacked tensors and converts
    them to the arrays a whole-checkpoint load gives."""
    hf = build_tiny("gpt_oss", tmp_path / "hf")
    placement = make_placement("round-robin", 8, 3, 2)
    disk = StackedRows(hf)
    model, _ = load_mlx_model(hf, lambda layer: placement.experts_of(1, layer), None, disk)
    apply_expert_parallel(model, MlxComm(Rank1of2()), placement, disk)
    expert_bytes = sum(i.nbytes for name, i in disk.infos.items() if ".mlp.experts." in name)
    assert len(set(disk.deferred.values())) == 4 * 3  # gate_up, its bias, down, its bias; 3 layers
    assert disk.bytes_read * 2 == expert_bytes  # half of every expert tensor, each read once
    full, _ = load_mlx_model(hf)
    ours_layer, full_layer = expert_parallel_layers(model)[2], switch_layers(full)[2][2]
    rows = mx.array([1, 3, 5, 7])
    for proj in ("gate_proj", "up_proj", "down_proj"):
        for name in ("weight", "bias"):
            got, want = getattr(ours_layer, proj)[name], getattr(full_layer, proj)[name]
            assert mx.array_equal(got, want[rows]).item(), (proj, name)


def test_qwen2_moe_keys_mlx_lm_ignores_are_one_error(tmp_path):
    hf = build_tiny("qwen2_moe", tmp_path / "hf")  # mlp_only_layers=[0]: layer 0 is dense
    with pytest.raises(MoeClusterError, match=r"ignores mlp_only_layers=\[0\].*--engine torch"):
        MlxEngine(hf)
    cfg = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**cfg, "mlp_only_layers": [], "norm_topk_prob": True}))
    with pytest.raises(MoeClusterError, match=r"norm_topk_prob=True") as e:
        load_mlx_model(hf)
    assert "mlp_only_layers" not in str(e.value)
