"""OLMoE (AllenAI), beside transformers' modeling_olmoe.py: RMSNorm, grouped-query attention with an
RMSNorm over the whole query and key projections (not per head), optional clipping of q/k/v after it,
fp32 softmax router (top-k renormalized when `norm_topk_prob`), every layer MoE, experts on disk per
expert as `mlp.experts.{e}.{gate,up,down}_proj`.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from functools import partial

from moecluster.models.configs import OlmoeConfig
from moecluster.models.hub import (
    DenseMap,
    embed_norm_head,
    hf_attention,
    mlp_expert_weights,
    read_mlp_expert,
)
from moecluster.models.layers import Attention, DecoderModel, PreNormBlock, RMSNorm
from moecluster.models.moe import MoE, RoutedExperts, Router, softmax_topk


class OlmoeForCausalLM(DecoderModel):
    def __init__(self, cfg: OlmoeConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(softmax_topk, k=cfg.num_experts_per_tok, renorm_p=1.0 if cfg.norm_topk_prob else None)

        def block() -> PreNormBlock:
            attn = Attention(
                D,
                cfg.num_attention_heads,
                cfg.kv_heads,
                cfg.dim_per_head,
                qkv_bias=cfg.attention_bias,
                qk_norm="full",
                norm_eps=eps,
                clip_qkv=cfg.clip_qkv,
            )
            moe = MoE(Router(D, E, score), RoutedExperts(E, D, cfg.expert_hidden, list(range(E)), device="meta"))
            return PreNormBlock(RMSNorm(D, eps), attn, RMSNorm(D, eps), moe)

        super().__init__(
            cfg.vocab_size,
            D,
            [block() for _ in range(cfg.num_hidden_layers)],
            RMSNorm(D, eps),
            head_dim=cfg.dim_per_head,
            rope_theta=cfg.rope_base,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_word_embeddings,
        )


def dense_weights(cfg: OlmoeConfig) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D = cfg.hidden_size
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
            qk_norm="full",
        )
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
            f"layers.{i}.mlp.router.gate.weight": ([f"{p}.mlp.gate.weight"], (cfg.routed_experts, D)),
        }
    return out


# the common per-expert layout `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`
expert_weights = mlp_expert_weights
read_expert = read_mlp_expert
