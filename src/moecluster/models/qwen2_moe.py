"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B), beside transformers' modeling_qwen2_moe.py: RMSNorm,
grouped-query attention with q/k/v biases, fp32 softmax router (top-k renormalized when
`norm_topk_prob`), and in every MoE layer a shared expert whose output is scaled per token by
sigmoid(shared_expert_gate(x)); the shared expert is replicated on every rank. Dense MLP layers where
`mlp_only_layers` / `decoder_sparse_step` say so.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from moecluster.models.configs import Qwen2MoeConfig
from moecluster.models.hub import (
    DenseMap,
    embed_norm_head,
    hf_attention,
    hf_gated_mlp,
    mlp_expert_weights,
    read_mlp_expert,
)
from moecluster.models.layers import Attention, DecoderModel, GatedMLP, Linear, PreNormBlock, RMSNorm
from moecluster.models.moe import MoE, RoutedExperts, Router, softmax_topk


class Qwen2MoeForCausalLM(DecoderModel):
    def __init__(self, cfg: Qwen2MoeConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(softmax_topk, k=cfg.num_experts_per_tok, renorm_p=1.0 if cfg.norm_topk_prob else None)
        moe_layers = set(cfg.moe_layer_ids())

        def block(i: int) -> PreNormBlock:
            attn = Attention(D, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head, qkv_bias=cfg.qkv_bias)
            mlp: nn.Module = GatedMLP(D, cfg.intermediate_size)
            if i in moe_layers:
                experts = RoutedExperts(E, D, cfg.expert_hidden, list(range(E)), device="meta")
                shared = GatedMLP(D, cfg.shared_hidden) if cfg.shared_hidden else None
                mlp = MoE(Router(D, E, score), experts, shared, Linear(D, 1) if shared is not None else None)
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


def dense_weights(cfg: Qwen2MoeConfig) -> DenseMap:
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
            bias=cfg.qkv_bias,
        )
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
        }
        if i not in moe_layers:
            out |= hf_gated_mlp(f"layers.{i}.mlp", f"{p}.mlp", D, cfg.intermediate_size)
            continue
        out[f"layers.{i}.mlp.router.gate.weight"] = ([f"{p}.mlp.gate.weight"], (cfg.routed_experts, D))
        if cfg.shared_hidden:
            out |= hf_gated_mlp(f"layers.{i}.mlp.shared", f"{p}.mlp.shared_expert", D, cfg.shared_hidden)
            out[f"layers.{i}.mlp.shared_gate.weight"] = ([f"{p}.mlp.shared_expert_gate.weight"], (1, D))
    return out


# the common per-expert layout `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`
expert_weights = mlp_expert_weights
read_expert = read_mlp_expert
