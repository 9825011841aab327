"""DBRX (Databricks): LayerNorm without bias, fused Wqkv with clipping, softmax router in the model dtype
with p-norm renormalization, experts fused on disk as ffn.experts.mlp.{w1,v1,w2} of shape [E*F, D].

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, V vocab.
"""

from __future__ import annotations

import torch

from moecluster.errors import MoeClusterError
from moecluster.models.common import ReadRows, eos_list, get_required, rope_theta_of
from moecluster.models.layers import ModelArgs

MODEL_TYPE = "dbrx"


def from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a DBRX config.json dict (unknown keys ignored)."""
    attn = cfg.get("attn_config") or {}
    ffn = cfg.get("ffn_config") or {}
    act = (ffn.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
    if act != "silu":
        raise MoeClusterError(f"config: DBRX ffn_act_fn {act!r} is not supported (only silu)")
    num_experts = int(get_required(ffn, "moe_num_experts", "ffn_config"))
    return ModelArgs(
        arch=MODEL_TYPE,
        dim=int(get_required(cfg, "d_model")),
        n_layers=int(get_required(cfg, "n_layers")),
        n_heads=int(get_required(cfg, "n_heads")),
        n_kv_heads=int(attn.get("kv_n_heads", cfg.get("num_key_value_heads", 1))),
        vocab_size=int(get_required(cfg, "vocab_size")),
        ffn_dim=int(get_required(ffn, "ffn_hidden_size", "ffn_config")),
        num_experts=num_experts,
        top_k=int(get_required(ffn, "moe_top_k", "ffn_config")),
        max_seq_len=int(cfg.get("max_seq_len", 2048)),
        norm="layernorm",
        norm_eps=1e-5,
        rope_theta=rope_theta_of(cfg, attn, default=500000.0),
        clip_qkv=attn.get("clip_qkv"),
        router_softmax_fp32=False,
        router_norm_p=ffn.get("moe_normalize_expert_weights", 1.0),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_list(cfg.get("eos_token_id")),
    )


def _blk(i: int) -> str:
    return f"transformer.blocks.{i}"


def dense_tensors(args: ModelArgs) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    d = args.dim
    out = {
        "embed.weight": (["transformer.wte.weight"], (args.vocab_size, d)),
        "norm.weight": (["transformer.norm_f.weight"], (d,)),
        "lm_head.weight": (["lm_head.weight"], (args.vocab_size, d)),
    }
    for i in range(args.n_layers):
        b = _blk(i)
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{b}.norm_attn_norm.norm_1.weight"], (d,)),
            f"layers.{i}.attn.wqkv.weight": ([f"{b}.norm_attn_norm.attn.Wqkv.weight"], (args.qkv_dim, d)),
            f"layers.{i}.attn.wo.weight": ([f"{b}.norm_attn_norm.attn.out_proj.weight"], (d, args.n_heads * args.head_dim)),
            f"layers.{i}.moe_norm.weight": ([f"{b}.norm_attn_norm.norm_2.weight"], (d,)),
            f"layers.{i}.moe.router.gate.weight": ([f"{b}.ffn.router.layer.weight"], (args.num_experts, d)),
        }
    return out


def expert_tensors(args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensor names of one layer with their shapes."""
    shape = (args.num_experts * args.ffn_dim, args.dim)
    return {f"{_blk(layer)}.ffn.experts.mlp.{w}": shape for w in ("w1", "v1", "w2")}


def read_expert(read_rows: ReadRows, args: ModelArgs, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF) read from only its rows of the fused tensors."""
    base = f"{_blk(layer)}.ffn.experts.mlp"
    lo, hi = expert * args.ffn_dim, (expert + 1) * args.ffn_dim
    w13_GD = torch.cat([read_rows(f"{base}.w1", lo, hi), read_rows(f"{base}.v1", lo, hi)], dim=0)
    w2_DF = read_rows(f"{base}.w2", lo, hi).t()  # DBRX applies w2 untransposed (h @ w2): store it for linear
    return w13_GD, w2_DF
