"""Mixtral (Mistral AI): RMSNorm, separate q/k/v projections (fused here at load), fp32 softmax router
with top-k renormalized to sum 1, experts on disk per expert as block_sparse_moe.experts.{e}.{w1,w3,w2}.

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, V vocab.
"""

from __future__ import annotations

import torch

from moecluster.errors import MoeClusterError
from moecluster.models.common import ReadRows, eos_list, get_required, rope_theta_of
from moecluster.models.layers import ModelArgs

MODEL_TYPE = "mixtral"


def from_hf_config(cfg: dict) -> ModelArgs:
    """ModelArgs from a Mixtral config.json dict (unknown keys ignored)."""
    if cfg.get("hidden_act", "silu") != "silu":
        raise MoeClusterError(f"config: hidden_act {cfg.get('hidden_act')!r} is not supported (only silu)")
    n_heads = int(get_required(cfg, "num_attention_heads"))
    max_seq_len = int(cfg.get("max_position_embeddings", 4096))
    if cfg.get("sliding_window"):  # attention is exact only while the whole context fits in the window
        max_seq_len = min(max_seq_len, int(cfg["sliding_window"]))
    return ModelArgs(
        arch=MODEL_TYPE,
        dim=int(get_required(cfg, "hidden_size")),
        n_layers=int(get_required(cfg, "num_hidden_layers")),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        vocab_size=int(get_required(cfg, "vocab_size")),
        ffn_dim=int(get_required(cfg, "intermediate_size")),
        num_experts=int(get_required(cfg, "num_local_experts")),
        top_k=int(cfg.get("num_experts_per_tok", 2)),
        max_seq_len=max_seq_len,
        norm="rmsnorm",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta_of(cfg, {}, default=1000000.0),
        router_softmax_fp32=True,
        router_norm_p=1.0,
        head_dim=int(cfg.get("head_dim") or 0),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_list(cfg.get("eos_token_id")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def dense_tensors(args: ModelArgs) -> dict[str, tuple[list[str], tuple[int, ...]]]:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    d, hd = args.dim, args.head_dim
    head = "model.embed_tokens.weight" if args.tie_embeddings else "lm_head.weight"
    out = {
        "embed.weight": (["model.embed_tokens.weight"], (args.vocab_size, d)),
        "norm.weight": (["model.norm.weight"], (d,)),
        "lm_head.weight": ([head], (args.vocab_size, d)),
    }
    for i in range(args.n_layers):
        p = f"model.layers.{i}"
        qkv = [f"{p}.self_attn.{w}_proj.weight" for w in ("q", "k", "v")]
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (d,)),
            f"layers.{i}.attn.wqkv.weight": (qkv, (args.qkv_dim, d)),
            f"layers.{i}.attn.wo.weight": ([f"{p}.self_attn.o_proj.weight"], (d, args.n_heads * hd)),
            f"layers.{i}.moe_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (d,)),
            f"layers.{i}.moe.router.gate.weight": ([f"{p}.block_sparse_moe.gate.weight"], (args.num_experts, d)),
        }
    return out


def expert_tensors(args: ModelArgs, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensor names of one layer with their shapes."""
    out = {}
    for e in range(args.num_experts):
        p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
        out |= {f"{p}.w1.weight": (args.ffn_dim, args.dim), f"{p}.w3.weight": (args.ffn_dim, args.dim),
                f"{p}.w2.weight": (args.dim, args.ffn_dim)}
    return out


def read_expert(read_rows: ReadRows, args: ModelArgs, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF)."""
    p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
    f, d = args.ffn_dim, args.dim
    w13_GD = torch.cat([read_rows(f"{p}.w1.weight", 0, f), read_rows(f"{p}.w3.weight", 0, f)], dim=0)
    return w13_GD, read_rows(f"{p}.w2.weight", 0, d)
