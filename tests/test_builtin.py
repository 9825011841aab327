"""Built-in checkpoint writers against transformers: what they write loads there and gives our logits."""

from __future__ import annotations

import json

import pytest
import torch

from moecluster.builtin import (
    QWEN3_MOE_PRESETS,
    build_qwen3_moe_checkpoint,
    qwen3_moe_tensors,
)
from moecluster.loading import load_model


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    # a small shard limit so the sharded (index + several files) path is the one exercised
    return build_qwen3_moe_checkpoint(
        tmp_path_factory.mktemp("qwen3"), "tiny", dtype=torch.float32, max_shard_bytes=256 * 1024
    )


def test_qwen3_moe_writer_loads_in_transformers_with_our_logits(tiny_qwen3):
    from transformers import Qwen3MoeForCausalLM

    assert len(set(json.loads((tiny_qwen3 / "model.safetensors.index.json").read_text())["weight_map"].values())) > 1
    ref = Qwen3MoeForCausalLM.from_pretrained(tiny_qwen3, dtype=torch.float32).eval()
    cfg = QWEN3_MOE_PRESETS["tiny"]
    assert ref.config.num_experts == cfg["num_local_experts"] and ref.config.norm_topk_prob
    assert ref.config.mlp_only_layers == cfg["mlp_only_layers"]
    ours = load_model(tiny_qwen3, "fp32").model
    ours.setup_cache(1)
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got, want = ours(ids, torch.tensor([0])), ref(ids).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_qwen3_moe_bench_preset_is_qwen3_30b_a3b_layer():
    cfg = {**QWEN3_MOE_PRESETS["bench"], "num_hidden_layers": 1}
    shapes = {n: s for n, s, _ in qwen3_moe_tensors(cfg)}
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (32 * 128, 2048)
    assert shapes["model.layers.0.self_attn.k_norm.weight"] == (128,)
    assert shapes["model.layers.0.mlp.experts.127.down_proj.weight"] == (2048, 768)
    assert shapes["model.layers.0.mlp.gate.weight"] == (128, 2048)
