"""DeepSeek-V2/V3 specifics: MLA's absorbed decode form against the expanded form, the latent cache's size,
YaRN tables and softmax scale against transformers at DeepSeek-V3's real RoPE settings, the MTP layer skipped."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB

from moecluster.loading import load_model
from moecluster.models.configs import parse_config
from moecluster.models.layers import CacheRows, Step

ARCHS = ["deepseek_v3", "deepseek_v2"]


def make_step(model, pos_B: torch.Tensor, slots_B: torch.Tensor, T: int) -> Step:
    """The Step DecoderModel.forward builds (always with a mask)."""
    span = int(pos_B.max()) + T
    positions_BT = pos_B[:, None] + torch.arange(T)[None, :]
    mask = torch.arange(span)[None, None, None, :] <= positions_BT[:, None, :, None]
    return Step(CacheRows.of(slots_B, pos_B), model.rope_cos[positions_BT], model.rope_sin[positions_BT], mask, span)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_tokens", [1, 3])
def test_absorbed_attention_equals_expanded(tiny_models, arch, num_tokens):
    """Two rows at different positions in their slots: the decode (absorbed) form of every layer's attention
    gives the expanded form's output, with and without a mask."""
    model = load_model(tiny_models[arch], "fp32").model
    model.setup_cache(2, 64)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model(torch.randint(0, VOCAB, (1, 9), generator=gen), torch.tensor([0]), torch.tensor([0]))
        model(torch.randint(0, VOCAB, (1, 4), generator=gen), torch.tensor([0]), torch.tensor([1]))
        x = torch.randn(2, num_tokens, model.embed.weight.shape[1], generator=gen)
        step = make_step(model, torch.tensor([9, 4]), torch.tensor([0, 1]), num_tokens)
        for block in model.layers:
            absorbed, expanded = block.attn(x, step, absorb=True), block.attn(x, step, absorb=False)
            assert torch.allclose(absorbed, expanded, atol=1e-5), (absorbed - expanded).abs().max()
        one_row = make_step(model, torch.tensor([9]), torch.tensor([0]), num_tokens)._replace(mask_B1TS=None)
        if num_tokens == 1:  # the unmasked single-row decode step the engine runs
            attn = model.layers[0].attn
            assert torch.allclose(attn(x[:1], one_row, absorb=True), attn(x[:1], one_row, absorb=False), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_holds_latent_and_rope_key_per_token(tiny_models, arch):
    loaded = load_model(tiny_models[arch], "fp32")
    cfg, model = loaded.config, loaded.model
    model.setup_cache(3, 40)
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    assert width == loaded.shape.kv_elems_per_token
    for block in model.layers:
        buffers = dict(block.attn.cache.named_buffers())
        assert list(buffers) == ["kv"] and buffers["kv"].shape == (3, 40, width)
    ids = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        model(ids, torch.tensor([0]))
        attn = model.layers[0].attn
        x = model.layers[0].attn_norm(model.embed(ids))
        latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x)[..., : cfg.kv_lora_rank])
    assert torch.allclose(attn.cache.kv[0, :5, : cfg.kv_lora_rank], latent[0], atol=1e-6)
    assert not attn.cache.kv[0, 5:].any()


REAL_V3_ROPE = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


@pytest.mark.parametrize(
    "rope", [REAL_V3_ROPE, REAL_V3_ROPE | {"mscale_all_dim": 0.707, "factor": 8}, {"rope_type": "default"}]
)
def test_yarn_tables_and_scale_match_transformers(rope):
    """DeepSeek-V3's released RoPE settings (legacy `rope_scaling`, top-level rope_theta) and variants."""
    import transformers as tf
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    from moecluster.models.deepseek_v3 import mla_rope_tables

    raw = {
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 100,
        "kv_lora_rank": 16,
        "q_lora_rank": 24,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 16,
        "moe_intermediate_size": 16,
        "n_routed_experts": 16,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "max_position_embeddings": 163840,
        "rope_theta": 10000,
        "rope_scaling": dict(rope),
    }
    ours = parse_config(raw)
    hf_cfg = tf.DeepseekV3Config(**{k: v for k, v in raw.items() if k != "model_type"})
    rotary = DeepseekV3RotaryEmbedding(hf_cfg)
    positions = torch.tensor([[0, 1, 5, 1000, 4095, 4096, 60000, 163839]])
    cos_hf, sin_hf = rotary(torch.zeros(1, dtype=torch.float32), positions)
    cos, sin = mla_rope_tables(ours, 163840, torch.float32)
    assert torch.equal(cos[positions[0]], cos_hf[0]) and torch.equal(sin[positions[0]], sin_hf[0])
    assert ours.softmax_scale == DeepseekV3Attention(hf_cfg, 0).scaling


def test_mtp_layer_is_skipped_with_one_log_line(tiny_models, tmp_path, caplog):
    src = tiny_models["deepseek_v3"]
    model_dir = shutil.copytree(src, tmp_path / "mtp")
    tensors = load_file(str(src / "model.safetensors"))
    mtp = f"model.layers.{json.loads((src / 'config.json').read_text())['num_hidden_layers']}"
    tensors |= {
        f"{mtp}.eh_proj.weight": torch.zeros(64, 128),
        f"{mtp}.enorm.weight": torch.ones(64),
        f"{mtp}.self_attn.kv_b_proj.weight": torch.zeros(4, 4),
    }
    save_file(tensors, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    ids = torch.tensor([[3, 4, 5]])
    logits = []
    with caplog.at_level(logging.WARNING, logger="moecluster.loading"):
        for d in (src, model_dir):
            m = load_model(d, "fp32").model
            m.setup_cache(1)
            with torch.inference_mode():
                logits.append(m(ids, torch.tensor([0])))
    assert torch.equal(logits[0], logits[1])
    lines = [r.getMessage() for r in caplog.records if "not loading" in r.getMessage()]
    assert len(lines) == 1 and "3 checkpoint tensors" in lines[0] and mtp in lines[0]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"topk_method": "top1"}, "topk_method"),
        ({"topk_method": "noaux_tc", "scoring_func": "softmax"}, "scoring_func"),
        ({"rope_scaling": {"type": "longrope", "factor": 2.0}}, "rope_type"),
        ({"n_group": 3}, "n_group"),
        ({"first_k_dense_replace": 2}, "no MoE layer"),
        ({"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_bad_configs_get_one_clear_error(change, message):
    from moecluster.errors import MoeClusterError

    raw = {
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 2,
        "topk_group": 1,
    }
    parse_config(raw)
    with pytest.raises(MoeClusterError, match=message):
        parse_config(raw | change)
