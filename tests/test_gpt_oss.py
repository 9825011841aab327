"""gpt-oss pieces against transformers' own (attention with sinks, router, clamped SwiGLU, YaRN), the sliding
window's ring cache on a 300-token prompt crossing a window of 128, and its config and shape."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_models import VOCAB, build_tiny

from moecluster.errors import MoeClusterError
from moecluster.loading import load_model
from moecluster.models.configs import parse_config
from moecluster.models.layers import sink_attention
from moecluster.models.moe import clamped_swiglu, topk_softmax


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("num_kv_heads, masked", [(2, True), (4, False), (1, True)])
def test_sink_attention_matches_transformers_eager(num_kv_heads, masked):
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    B, H, T, S, Hd = 2, 4, 5, 9, 16
    q = torch.randn(B, H, T, Hd, generator=_gen(0))
    k, v = (torch.randn(B, num_kv_heads, S, Hd, generator=_gen(i)) for i in (1, 2))
    sinks = torch.randn(H, generator=_gen(3)) * 2
    mask = torch.rand(B, 1, T, S, generator=_gen(4)) > 0.3 if masked else None
    if mask is not None:
        mask[..., -1] = True  # every query sees at least one key
    module = SimpleNamespace(num_key_value_groups=H // num_kv_heads, sinks=sinks, training=False)
    additive = None if mask is None else torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    want, _ = eager_attention_forward(module, q, k, v, additive, scaling=Hd**-0.5)  # [B, T, H, Hd]
    got = sink_attention(q, k, v, sinks, mask)
    assert (got.transpose(1, 2) - want).abs().max().item() < 1e-6


def test_router_and_activation_match_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts, GptOssTopKRouter

    cfg = GptOssConfig(
        hidden_size=32, num_local_experts=8, num_experts_per_tok=3, intermediate_size=16, swiglu_limit=1.5
    )
    router = GptOssTopKRouter(cfg)
    with torch.no_grad():
        router.weight.normal_(0, 1, generator=_gen(5))
        router.bias.normal_(0, 1, generator=_gen(6))
    x = torch.randn(11, 32, generator=_gen(7))
    _, want_w, want_ids = router(x)
    ids, weights = topk_softmax(torch.nn.functional.linear(x, router.weight, router.bias), k=3)
    assert torch.equal(ids, want_ids) and torch.allclose(weights, want_w, atol=1e-7)
    gate_up = torch.randn(11, 32, generator=_gen(8)) * 3  # interleaved, as the experts compute it
    want = GptOssExperts(cfg)._apply_gate(gate_up)
    got = clamped_swiglu(gate_up[..., ::2], gate_up[..., 1::2], alpha=1.702, limit=1.5)
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)


def test_pairs_bits_independent_of_the_other_pairs(tiny_models):
    """Splitting the pairs between two 'ranks' gives exactly the full output, in every layer, for pair counts
    that leave ATen's flat loops a scalar tail (the clamped SwiGLU's sigmoid runs row by row)."""
    from moecluster.kernels.apply import apply_kernels

    model = apply_kernels(load_model(tiny_models["gpt_oss"], "fp32").model)
    for block in model.moe_layers():
        for num_tokens in range(1, 40):  # with a flat sigmoid ~1 in 8 of these differed by an ulp
            x = torch.randn(num_tokens, 64, generator=_gen(num_tokens)) * 2
            with torch.inference_mode():
                ids, _ = block.router(x)
                full, _ = block.experts.pairs(x, ids)
                a, _ = block.experts.pairs(x, ids, ids < 4)
                b, _ = block.experts.pairs(x, ids, ids >= 4)
                assert torch.equal(a + b, full), num_tokens


def test_yarn_tables_match_transformers():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from moecluster.models.gpt_oss import yarn_rope_tables

    for truncate in (False, True):
        cfg = GptOssConfig(head_dim=64, max_position_embeddings=131072)  # the released yarn parameters
        cfg.rope_parameters["truncate"] = truncate
        rot = GptOssRotaryEmbedding(cfg)
        pos = torch.tensor([[0, 1, 127, 128, 4095, 4096, 70000]])
        cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        our_cos, our_sin = yarn_rope_tables(64, 70001, parse_config(cfg.to_dict()).rope, torch.float32)  # type: ignore[attr-defined]
        assert torch.allclose(our_cos[pos[0], :32], cos[0], atol=1e-6)
        assert torch.allclose(our_sin[pos[0], :32], sin[0], atol=1e-6)


@pytest.fixture(scope="module")
def gpt_oss_window_128(tmp_path_factory):
    """Sliding window 128 on alternating layers (as the released models), 300-token prompts cross it."""
    return build_tiny(
        "gpt_oss",
        tmp_path_factory.mktemp("gpt_oss_w128"),
        sliding_window=128,
        max_position_embeddings=512,
        num_hidden_layers=2,
        layer_types=["sliding_attention", "full_attention"],
    )


def test_300_tokens_across_a_window_of_128(gpt_oss_window_128):
    """Logits of a 300-token prompt vs transformers; then prefill 150 + a 100-token chunk + 50 single steps
    (ring wrapped, chunk shorter than the window) and one 300-token row beside a short one: the same logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (1, 300), generator=_gen(300))
    model = load_model(gpt_oss_window_128, "fp32").model
    model.setup_cache(2)
    ref = AutoModelForCausalLM.from_pretrained(gpt_oss_window_128, dtype=torch.float32).eval()
    with torch.inference_mode():
        full = model(ids, torch.tensor([0]))
        want = ref(ids).logits
        assert (full - want).abs().max().item() <= 1e-4
        model(ids[:, :150], torch.tensor([0]))
        chunk = model(ids[:, 150:250], torch.tensor([150]))
        steps = torch.cat([model(ids[:, p : p + 1], torch.tensor([p])) for p in range(250, 300)], dim=1)
        assert torch.allclose(torch.cat((chunk, steps), dim=1), full[:, 150:], atol=3e-5)
        # batched decode: slot 1 at position 300 (prefilled in one 300-token forward), slot 0 at position 5
        short = torch.tensor([[7, 8, 9, 10, 11]])
        model(short, torch.tensor([0]), torch.tensor([0]))
        model(ids, torch.tensor([0]), torch.tensor([1]))
        both = model(torch.tensor([[3], [4]]), torch.tensor([5, 300]), torch.tensor([0, 1]))
        alone_long = ref(torch.cat((ids, torch.tensor([[4]])), dim=1)).logits[:, -1]
        alone_short = ref(torch.cat((short, torch.tensor([[3]])), dim=1)).logits[:, -1]
    assert (both[1, -1] - alone_long[0]).abs().max().item() <= 1e-4
    assert (both[0, -1] - alone_short[0]).abs().max().item() <= 1e-4


GPT_OSS = {
    "model_type": "gpt_oss",
    "num_hidden_layers": 24,
    "num_local_experts": 32,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "num_experts_per_tok": 4,
    "rope_theta": 150000,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
}


def test_config_of_the_released_20b_and_its_shape():
    """openai/gpt-oss-20b's config.json keys (legacy rope_scaling + rope_theta): 21B params, 3.6B active;
    the sliding layers' KV cache is capped at the window."""
    cfg = parse_config(GPT_OSS)
    assert cfg.rope_base == 150000.0 and cfg.rope["rope_type"] == "yarn"  # type: ignore[attr-defined]
    shape = cfg.shape()
    assert abs(shape.total_params / 1e9 - 20.9) < 0.2 and abs(shape.active_params / 1e9 - 3.6) < 0.1
    assert (shape.num_sliding_layers, shape.sliding_window) == (12, 128)
    per_token = shape.kv_elems_per_token * shape.act_bytes  # one layer, one token
    assert shape.kv_bytes(100) == 24 * 100 * per_token
    assert shape.kv_bytes(10000) == (12 * 10000 + 12 * 128) * per_token


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(layer_types=["sliding_attention"] * 3), "layer_types has 3 entries"),
        (lambda c: c.update(layer_types=["chunked_attention"] * 24), "sliding_attention or full_attention"),
        (lambda c: c.update(rope_scaling={"rope_type": "longrope"}), "rope_type 'longrope'"),
        (lambda c: c.update(rope_scaling={"rope_type": "yarn"}), "need factor"),
    ],
)
def test_bad_gpt_oss_configs_say_what_to_fix(edit, message):
    cfg = dict(GPT_OSS)
    edit(cfg)
    with pytest.raises(MoeClusterError, match=message):
        parse_config(cfg)


def test_other_quantized_gpt_oss_is_refused_with_one_clear_error():
    """mxfp4 (as the Hub ships gpt-oss) is read (tests/test_mxfp4.py); anything else gets one clear error."""
    from moecluster.models import gpt_oss

    cfg = parse_config(GPT_OSS | {"quantization_config": {"quant_method": "mxfp4"}})
    assert "model.layers.0.mlp.experts.gate_up_proj_blocks" in gpt_oss.expert_weights(cfg, 0)  # type: ignore[arg-type]
    cfg = parse_config(GPT_OSS | {"quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(MoeClusterError, match="quantized \\(fp8\\)"):
        gpt_oss.expert_weights(cfg, 0)  # type: ignore[arg-type]
