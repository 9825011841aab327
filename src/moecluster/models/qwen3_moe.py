"""Qwen3-MoE, beside transformers' modeling_qwen3_moe.py: RMSNorm, grouped-query attention with a
per-head RMSNorm on queries and keys (before RoPE), fp32 softmax router with top-k renormalized to sum 1
when `norm_topk_prob`, and dense MLP layers where `mlp_only_layers` / `decoder_sparse_step` say so.
Experts on disk per expert as `mlp.experts.{e}.{gate,up,down}_proj`.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from moecluster.models.configs import Qwen3MoeConfig
from moecluster.models.hub import (
    DenseMap,
    embed_norm_head,
    hf_attention,
    hf_gated_mlp,
    mlp_expert_weights,
    read_mlp_expert,
)
from moecluster.models.layers import Attention, DecoderModel, GatedMLP, PreNormBlock, RMSNorm
from moecluster.models.moe import MoE, RoutedExperts, Router, softmax_topk


class Qwen3MoeForCausalLM(DecoderModel):
    def __init__(self, cfg: Qwen3MoeConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(softmax_topk, k=cfg.num_experts_per_tok, renorm_p=1.0 if cfg.norm_topk_prob else None)
        moe_layers = set(cfg.moe_layer_ids())

        def block(i: int) -> PreNormBlock:
            attn = Attention(
                D,
                cfg.num_attention_heads,
                cfg.kv_heads,
                cfg.dim_per_head,
                qkv_bias=cfg.attention_bias,
                qk_norm="head",
                norm_eps=eps,
            )
            mlp: nn.Module = GatedMLP(D, cfg.intermediate_size)
            if i in moe_layers:
                mlp = MoE(Router(D, E, score), RoutedExperts(E, D, cfg.expert_hidden, list(range(E)), device="meta"))
            return PreNormBlock(RMSNorm(D, eps), attn, RMSNorm(D, eps), mlp)

        super().__init__(
            cfg.vocab_size,
            D,
            [block(i) for i in range(cfg.num_hidden_layers)],
            RMSNorm(D, eps),
            head_dim=cfg.dim_per_head,
            rope_theta=cfg.rope_base,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_word_embeddings,
        )


def dense_weights(cfg: Qwen3MoeConfig) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D = cfg.hidden_size
    moe_layers = set(cfg.moe_layer_ids())
    out = embed_norm_head(cfg.vocab_size, D, cfg.tie_word_embeddings)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out |= hf_attention(
            f"layers.{i}.attn",
            f"{p}.self_attn",
            D,
            cfg.num_attention_heads,
            cfg.kv_heads,
            cfg.dim_per_head,
            bias=cfg.attention_bias,
            qk_norm="head",
        )
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
        }
        if i in moe_layers:
            out[f"layers.{i}.mlp.router.gate.weight"] = ([f"{p}.mlp.gate.weight"], (cfg.routed_experts, D))
        else:
            out |= hf_gated_mlp(f"layers.{i}.mlp", f"{p}.mlp", D, cfg.intermediate_size)
    return out


# the common per-expert layout `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`
expert_weights = mlp_expert_weights
read_expert = read_mlp_expert
