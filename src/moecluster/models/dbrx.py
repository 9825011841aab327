"""DBRX (Databricks), beside transformers' modeling_dbrx.py: LayerNorm without bias, fused Wqkv with
clipping, a softmax router in the model dtype whose top-k weights are renormalized by their p-norm,
every layer MoE, experts fused on disk as `ffn.experts.mlp.{w1,v1,w2}` of shape [E*F, D] (w2 applied
untransposed: stored transposed here so every product is x @ W.T).

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, V vocab.
"""

from __future__ import annotations

from functools import partial

import torch

from moecluster.models.configs import DbrxConfig
from moecluster.models.hub import DenseMap, ExpertOut, ReadRows, embed_norm_head
from moecluster.models.layers import Attention, DecoderModel, PreNormBlock, layer_norm
from moecluster.models.moe import MoE, RoutedExperts, Router, softmax_topk


class DbrxForCausalLM(DecoderModel):
    def __init__(self, cfg: DbrxConfig):
        D, E = cfg.d_model, cfg.num_experts
        score = partial(softmax_topk, k=cfg.top_k, renorm_p=cfg.normalize_p, fp32=False)

        def block() -> PreNormBlock:
            attn = Attention(D, cfg.n_heads, cfg.kv_n_heads, cfg.head_dim, clip_qkv=cfg.clip_qkv)
            moe = MoE(Router(D, E, score), RoutedExperts(E, D, cfg.ffn_hidden_size, list(range(E)), device="meta"))
            return PreNormBlock(layer_norm(D), attn, layer_norm(D), moe)

        super().__init__(
            cfg.vocab_size,
            D,
            [block() for _ in range(cfg.n_layers)],
            layer_norm(D),
            head_dim=cfg.head_dim,
            rope_theta=cfg.rope_theta,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_word_embeddings,
        )


def _blk(i: int) -> str:
    return f"transformer.blocks.{i}"


def dense_weights(cfg: DbrxConfig) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D, qkv = cfg.d_model, (cfg.n_heads + 2 * cfg.kv_n_heads) * cfg.head_dim
    out = embed_norm_head(
        cfg.vocab_size, D, cfg.tie_word_embeddings, embed="transformer.wte.weight", norm="transformer.norm_f.weight"
    )
    for i in range(cfg.n_layers):
        b = f"{_blk(i)}.norm_attn_norm"
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{b}.norm_1.weight"], (D,)),
            f"layers.{i}.attn.wqkv.weight": ([f"{b}.attn.Wqkv.weight"], (qkv, D)),
            f"layers.{i}.attn.wo.weight": ([f"{b}.attn.out_proj.weight"], (D, cfg.n_heads * cfg.head_dim)),
            f"layers.{i}.mlp_norm.weight": ([f"{b}.norm_2.weight"], (D,)),
            f"layers.{i}.mlp.router.gate.weight": ([f"{_blk(i)}.ffn.router.layer.weight"], (cfg.num_experts, D)),
        }
    return out


def expert_weights(cfg: DbrxConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensors of one layer with their shapes."""
    shape = (cfg.num_experts * cfg.ffn_hidden_size, cfg.d_model)
    return {f"{_blk(layer)}.ffn.experts.mlp.{w}": shape for w in ("w1", "v1", "w2")}


def read_expert(
    read_rows: ReadRows, cfg: DbrxConfig, layer: int, expert: int, out: ExpertOut = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF), read from only its rows of the fused tensors (into `out` when given;
    w2 is stored [F, D] on disk, so it lands in the transposed view of w2_DF)."""
    base = f"{_blk(layer)}.ffn.experts.mlp"
    lo, hi = expert * cfg.ffn_hidden_size, (expert + 1) * cfg.ffn_hidden_size
    if out is not None:
        w13_GD, w2_DF = out
        read_rows(f"{base}.w1", lo, hi, out=w13_GD[: hi - lo])
        read_rows(f"{base}.v1", lo, hi, out=w13_GD[hi - lo :])
        read_rows(f"{base}.w2", lo, hi, out=w2_DF.t())
        return w13_GD, w2_DF
    w13_GD = torch.cat([read_rows(f"{base}.w1", lo, hi), read_rows(f"{base}.v1", lo, hi)], dim=0)
    return w13_GD, read_rows(f"{base}.w2", lo, hi).t()
