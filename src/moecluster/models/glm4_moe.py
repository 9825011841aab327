"""GLM-4.5 / GLM-4.5-Air, beside transformers' modeling_glm4_moe.py: RMSNorm, grouped-query attention with
optional q/k/v biases (`attention_bias`) and per-head q/k RMSNorm (`use_qk_norm`), rotate-half RoPE on the
first `rotary_dim` dims of each head only (partial rotary); the first `first_k_dense_replace` layers have a
dense MLP, the others an MoE: sigmoid router with a correction bias and group-limited top-k
(sigmoid_group_topk), plus `n_shared_experts` shared experts as one gated MLP whose output is added as is
(replicated on every rank). Experts on disk per expert as `mlp.experts.{e}.{gate,up,down}_proj`.
The multi-token-prediction layer the released checkpoints ship (layer index num_hidden_layers) is not run.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import re
from functools import partial

from torch import nn

from moecluster.models.configs import Glm4MoeConfig
from moecluster.models.hub import (
    DenseMap,
    embed_norm_head,
    hf_attention,
    hf_gated_mlp,
    mlp_expert_weights,
    read_mlp_expert,
)
from moecluster.models.layers import Attention, DecoderModel, GatedMLP, PreNormBlock, RMSNorm
from moecluster.models.moe import MoE, RoutedExperts, Router, sigmoid_group_topk


class Glm4MoeForCausalLM(DecoderModel):
    def __init__(self, cfg: Glm4MoeConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(
            sigmoid_group_topk,
            k=cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            renorm=cfg.norm_topk_prob,
            scale=cfg.routed_scaling_factor,
        )
        moe_layers = set(cfg.moe_layer_ids())

        def block(i: int) -> PreNormBlock:
            attn = Attention(
                D,
                cfg.num_attention_heads,
                cfg.kv_heads,
                cfg.dim_per_head,
                qkv_bias=cfg.attention_bias,
                qk_norm="head" if cfg.use_qk_norm else None,
                norm_eps=eps,
            )
            mlp: nn.Module = GatedMLP(D, cfg.intermediate_size)
            if i in moe_layers:
                experts = RoutedExperts(E, D, cfg.expert_hidden, list(range(E)), device="meta")
                shared = GatedMLP(D, cfg.shared_hidden) if cfg.shared_hidden else None
                mlp = MoE(Router(D, E, score, correction_bias=True), experts, shared)
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
            rotary_dim=cfg.rotary_dim,
        )


def dense_weights(cfg: Glm4MoeConfig) -> DenseMap:
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
            qk_norm="head" if cfg.use_qk_norm else None,
        )
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
        }
        if i not in moe_layers:
            out |= hf_gated_mlp(f"layers.{i}.mlp", f"{p}.mlp", D, cfg.intermediate_size)
            continue
        E = cfg.routed_experts
        out[f"layers.{i}.mlp.router.gate.weight"] = ([f"{p}.mlp.gate.weight"], (E, D))
        out[f"layers.{i}.mlp.router.e_score_correction_bias"] = ([f"{p}.mlp.gate.e_score_correction_bias"], (E,))
        if cfg.shared_hidden:
            out |= hf_gated_mlp(f"layers.{i}.mlp.shared", f"{p}.mlp.shared_experts", D, cfg.shared_hidden)
    return out


def ignored_on_disk(cfg: Glm4MoeConfig, name: str) -> bool:
    """Tensors the checkpoint ships that we do not run: the multi-token-prediction layer(s) after the last
    decoder layer (`model.layers.{num_hidden_layers + j}.*`)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


# the common per-expert layout `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj`
expert_weights = mlp_expert_weights
read_expert = read_mlp_expert
