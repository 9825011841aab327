"""Build tiny random-weight checkpoints with transformers (XxxConfig + XxxForCausalLM.save_pretrained)."""

from __future__ import annotations

import sys
from pathlib import Path

VOCAB = 384
ARCHES = ("dbrx", "mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2", "gpt_oss")
COMMON = dict(
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)
# each exercises its family's options: dense layers, renormalized top-k, shared expert, q/k norms, clipping
HF_COMMON = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            intermediate_size=80,
            head_dim=24,
            mlp_only_layers=[1],
            norm_topk_prob=True,
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            num_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            intermediate_size=80,
            shared_expert_intermediate_size=40,
            decoder_sparse_step=1,
            mlp_only_layers=[0],
        ),
    ),
    "olmoe": (
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(num_experts=8, num_experts_per_tok=2, intermediate_size=48, clip_qkv=6.0, pad_token_id=0, eos_token_id=1),
    ),
    # dense first layer, group-limited sigmoid routing with a correction bias (randomized in hf_model),
    # renormalized and scaled weights, shared experts, partial rotary, q/k norm, attention bias
    "glm4_moe": (
        "Glm4MoeConfig",
        "Glm4MoeForCausalLM",
        dict(
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            intermediate_size=80,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            use_qk_norm=True,
            attention_bias=True,
            head_dim=32,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
    ),
    # MLA with q_lora_rank, YaRN (attention factor != 1 and mscale_all_dim), interleaved RoPE, noaux_tc routing
    # with 4 groups and a random correction bias, dense first layer, 2 shared experts
    "deepseek_v3": (
        "DeepseekV3Config",
        "DeepseekV3ForCausalLM",
        dict(
            num_key_value_heads=4,
            q_lora_rank=48,
            kv_lora_rank=32,
            qk_nope_head_dim=24,
            qk_rope_head_dim=16,
            v_head_dim=20,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            intermediate_size=80,
            n_shared_experts=2,
            first_k_dense_replace=1,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        ),
    ),
    # MLA without q_lora_rank (plain q_proj), attention biases, group_limited_greedy softmax routing, scaled
    # weights, dense first layer, 1 shared expert
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        dict(
            num_key_value_heads=4,
            q_lora_rank=None,
            kv_lora_rank=32,
            qk_nope_head_dim=16,
            qk_rope_head_dim=8,
            v_head_dim=24,
            n_routed_experts=8,
            num_experts_per_tok=2,
            moe_intermediate_size=48,
            intermediate_size=80,
            n_shared_experts=1,
            first_k_dense_replace=1,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=1.5,
            attention_bias=True,
        ),
    ),
    # sinks, sliding window 8 on layers 0 and 2 (the 64-token tests cross it), YaRN whose ramp falls inside
    # head_dim, biases everywhere, a SwiGLU limit low enough that the clamps act
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        dict(
            num_local_experts=8,
            num_experts_per_tok=2,
            intermediate_size=48,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            swiglu_limit=2.0,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 2.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "original_max_position_embeddings": 128,
                "truncate": False,
            },
        ),
    ),
}


def hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model of the given architecture, fp32, random weights (scaled so routing is not flat)."""
    import torch  # here, not at the top, as transformers: conftest imports this file in the xdist controller too
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "dbrx":
        cfg = tf.DbrxConfig(
            d_model=64,
            n_heads=4,
            n_layers=3,
            max_seq_len=256,
            vocab_size=VOCAB,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
            ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 48},
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            **overrides,
        )
        model = tf.DbrxForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = tf.MixtralConfig(
            **(
                dict(
                    hidden_size=64,
                    intermediate_size=48,
                    num_hidden_layers=3,
                    num_attention_heads=4,
                    num_key_value_heads=2,
                    num_local_experts=8,
                    num_experts_per_tok=2,
                    vocab_size=VOCAB,
                    max_position_embeddings=256,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                )
                | overrides
            )
        )
        model = tf.MixtralForCausalLM(cfg)
    elif arch in HF_COMMON:
        config_class, model_class, kwargs = HF_COMMON[arch]
        cfg = getattr(tf, config_class)(**(COMMON | kwargs | overrides))
        model = getattr(tf, model_class)(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger weights than the 0.02 init so that logits and routing are far from ties
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name or "a_layernorm" in name:  # around 1: q/k/latent norms checked
                p.normal_(1.0, 0.1)
            elif "norm" not in name:
                p.normal_(0.0, 0.2)
        for name, b in model.named_buffers():  # GLM-4.5's / DeepSeek-V3's router bias is a (saved) buffer, zero at init
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.2)
    return model.eval()


def build_tiny(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    from moecluster.builtin import write_tokenizer  # imports torch

    model = hf_model(arch, seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(out, VOCAB)
    model.config.eos_token_id = eos
    model.save_pretrained(out)
    return out


# wider tiny models whose dims the 128-input quantization groups and fp8 blocks divide
WIDE = {
    "qwen3_moe": dict(hidden_size=128, moe_intermediate_size=128, intermediate_size=256, head_dim=32),
    "mixtral": dict(hidden_size=128, intermediate_size=128),
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _fp8_target(name: str, t) -> bool:
    """What Qwen3-FP8 / DeepSeek-V3 ship in fp8: the 2-D projections, not embeddings, lm_head, norms, gates."""
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight", "block_sparse_moe.gate.weight")
    return t.dim() == 2 and name.endswith(".weight") and not any(s in name for s in skip)


def build_fp8(arch: str, out: Path) -> tuple[Path, Path]:
    """A tiny checkpoint in the official fp8 layout (`X.weight` float8_e4m3fn + `X.weight_scale_inv` fp32
    128x128 blocks, quantization_config in config.json) and beside it the same weights exactly dequantized
    to fp32 in transformers' own layout (the reference); returns both directories."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from moecluster.quant import dequantize_fp8_block, quantize_fp8_block

    ref_dir = build_tiny(arch, out / "dequantized", **WIDE[arch])
    fp8_dir = out / "fp8"
    shutil.copytree(ref_dir, fp8_dir)
    disk, dequant = {}, {}
    for name, t in load_file(str(ref_dir / "model.safetensors")).items():
        if _fp8_target(name, t):
            q, s = quantize_fp8_block(t)
            disk[name], disk[f"{name}_scale_inv"] = q.contiguous(), s.contiguous()
            dequant[name] = dequantize_fp8_block(q, s)
        else:
            disk[name] = dequant[name] = t
    save_file(disk, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(dequant, str(ref_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((fp8_dir / "config.json").read_text())
    (fp8_dir / "config.json").write_text(json.dumps(cfg | {"quantization_config": FP8_CONFIG}))
    return fp8_dir, ref_dir


if __name__ == "__main__":
    build_tiny(sys.argv[1], Path(sys.argv[2]))
