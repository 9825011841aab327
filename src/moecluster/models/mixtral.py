"""Mixtral (Mistral AI), beside transformers' modeling_mixtral.py: RMSNorm, grouped-query attention
(q/k/v fused at load), fp32 softmax router whose top-k weights are renormalized to sum 1, every layer
MoE, experts on disk per expert as `block_sparse_moe.experts.{e}.{w1,w3,w2}`.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from functools import partial

import torch

from moecluster.models.configs import MixtralConfig
from moecluster.models.hub import (
    DenseMap,
    ExpertOut,
    ReadRows,
    embed_norm_head,
    hf_attention,
    per_expert_tensors,
    read_per_expert,
)
from moecluster.models.layers import Attention, DecoderModel, PreNormBlock, RMSNorm
from moecluster.models.moe import MoE, RoutedExperts, Router, softmax_topk

EXPERT_NAMES = ("w1", "w3", "w2")  # gate, up, down


class MixtralForCausalLM(DecoderModel):
    def __init__(self, cfg: MixtralConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(softmax_topk, k=cfg.num_experts_per_tok, renorm_p=1.0)

        def block() -> PreNormBlock:
            attn = Attention(D, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head)
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


def dense_weights(cfg: MixtralConfig) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D = cfg.hidden_size
    out = embed_norm_head(cfg.vocab_size, D, cfg.tie_word_embeddings)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out |= hf_attention(
            f"layers.{i}.attn", f"{p}.self_attn", D, cfg.num_attention_heads, cfg.kv_heads, cfg.dim_per_head
        )
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
            f"layers.{i}.mlp.router.gate.weight": ([f"{p}.block_sparse_moe.gate.weight"], (cfg.routed_experts, D)),
        }
    return out


def expert_weights(cfg: MixtralConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensors of one layer with their shapes."""
    return per_expert_tensors(
        f"model.layers.{layer}.block_sparse_moe.experts",
        cfg.routed_experts,
        cfg.hidden_size,
        cfg.expert_hidden,
        EXPERT_NAMES,
    )


def read_expert(
    read_rows: ReadRows, cfg: MixtralConfig, layer: int, expert: int, out: ExpertOut = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF) (into `out` when given)."""
    return read_per_expert(
        read_rows,
        f"model.layers.{layer}.block_sparse_moe.experts",
        expert,
        cfg.hidden_size,
        cfg.expert_hidden,
        EXPERT_NAMES,
        out=out,
    )
