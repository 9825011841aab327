"""On-disk weight maps in the layouts the Hub ships: helpers the architecture files share.

A dense map is `our parameter name -> (on-disk names concatenated along dim 0, our shape)`; expert
tensors are read one expert at a time by row range (`ReadRows`), so a rank touches only its experts.

Shape legend: D model dim, F hidden dim, G = 2F, H heads, Hk kv heads, Hd head dim, V vocab.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch


class ReadRows(Protocol):
    """read_rows(on_disk_name, first_row, end_row) -> tensor in the target dtype; with `out` (a view of the
    final storage, e.g. one expert's slice of w13_eGD) the rows are read into it and it is returned."""

    def __call__(self, name: str, start: int, end: int, *, out: torch.Tensor | None = None) -> torch.Tensor: ...


# (w13_GD, w2_DF) views of one expert's slot in the prestacked storage, for read_expert(..., out=...)
ExpertOut = tuple[torch.Tensor, torch.Tensor] | None
DenseMap = dict[str, tuple[list[str], tuple[int, ...]]]


def embed_norm_head(
    vocab: int,
    dim: int,
    tie: bool,
    embed: str = "model.embed_tokens.weight",
    norm: str = "model.norm.weight",
    head: str = "lm_head.weight",
) -> DenseMap:
    """Embeddings, final norm and lm_head (tied: the head reads the embedding matrix)."""
    return {
        "embed.weight": ([embed], (vocab, dim)),
        "norm.weight": ([norm], (dim,)),
        "lm_head.weight": ([embed if tie else head], (vocab, dim)),
    }


def hf_attention(
    ours: str,
    disk: str,
    dim: int,
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    *,
    bias: bool = False,
    qk_norm: str | None = None,
) -> DenseMap:
    """q/k/v/o_proj (+ biases, + q_norm/k_norm) of one layer -> our fused wqkv and wo."""
    qkv_rows = (n_heads + 2 * n_kv_heads) * head_dim
    out: DenseMap = {
        f"{ours}.wqkv.weight": ([f"{disk}.{w}_proj.weight" for w in "qkv"], (qkv_rows, dim)),
        f"{ours}.wo.weight": ([f"{disk}.o_proj.weight"], (dim, n_heads * head_dim)),
    }
    if bias:
        out[f"{ours}.wqkv.bias"] = ([f"{disk}.{w}_proj.bias" for w in "qkv"], (qkv_rows,))
    if qk_norm == "head":
        out |= {
            f"{ours}.q_norm.weight": ([f"{disk}.q_norm.weight"], (head_dim,)),
            f"{ours}.k_norm.weight": ([f"{disk}.k_norm.weight"], (head_dim,)),
        }
    elif qk_norm == "full":
        out |= {
            f"{ours}.q_norm.weight": ([f"{disk}.q_norm.weight"], (n_heads * head_dim,)),
            f"{ours}.k_norm.weight": ([f"{disk}.k_norm.weight"], (n_kv_heads * head_dim,)),
        }
    return out


def hf_gated_mlp(
    ours: str, disk: str, dim: int, hidden: int, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
) -> DenseMap:
    """gate/up/down projections -> our GatedMLP's w13 (gate rows, then up rows) and w2."""
    gate, up, down = names
    return {
        f"{ours}.w13.weight": ([f"{disk}.{gate}.weight", f"{disk}.{up}.weight"], (2 * hidden, dim)),
        f"{ours}.w2.weight": ([f"{disk}.{down}.weight"], (dim, hidden)),
    }


def per_expert_tensors(
    prefix: str,
    num_experts: int,
    dim: int,
    hidden: int,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
) -> dict[str, tuple[int, ...]]:
    """On-disk names and shapes of per-expert tensors `{prefix}.{e}.{name}.weight` (Mixtral, Qwen, OLMoE)."""
    gate, up, down = names
    out: dict[str, tuple[int, ...]] = {}
    for e in range(num_experts):
        out |= {
            f"{prefix}.{e}.{gate}.weight": (hidden, dim),
            f"{prefix}.{e}.{up}.weight": (hidden, dim),
            f"{prefix}.{e}.{down}.weight": (dim, hidden),
        }
    return out


def read_per_expert(
    read_rows: ReadRows,
    prefix: str,
    expert: int,
    dim: int,
    hidden: int,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    out: ExpertOut = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF) from per-expert tensors; with `out`, read straight into those views."""
    gate, up, down = names
    p = f"{prefix}.{expert}"
    if out is not None:  # gate rows, then up rows: no concatenated temporary
        w13_GD, w2_DF = out
        read_rows(f"{p}.{gate}.weight", 0, hidden, out=w13_GD[:hidden])
        read_rows(f"{p}.{up}.weight", 0, hidden, out=w13_GD[hidden:])
        return w13_GD, read_rows(f"{p}.{down}.weight", 0, dim, out=w2_DF)
    w13_GD = torch.cat([read_rows(f"{p}.{gate}.weight", 0, hidden), read_rows(f"{p}.{up}.weight", 0, hidden)])
    return w13_GD, read_rows(f"{p}.{down}.weight", 0, dim)


def mlp_expert_weights(cfg: Any, layer: int) -> dict[str, tuple[int, ...]]:
    """expert_weights for the common layout `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj` (Qwen MoE,
    OLMoE, GLM-4.5); `cfg` has hidden_size, routed_experts and expert_hidden."""
    return per_expert_tensors(
        f"model.layers.{layer}.mlp.experts", cfg.routed_experts, cfg.hidden_size, cfg.expert_hidden
    )


def read_mlp_expert(
    read_rows: ReadRows, cfg: Any, layer: int, expert: int, out: ExpertOut = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """read_expert for that layout: one expert's (w13_GD, w2_DF) (into `out` when given)."""
    return read_per_expert(
        read_rows, f"model.layers.{layer}.mlp.experts", expert, cfg.hidden_size, cfg.expert_hidden, out=out
    )
