"""The kernel transformation: point a loaded model's products at the compiled kernels.

Model files use plain torch (`Linear.gemm = F.linear`, `RoutedExperts.gemm = torch_moe_gemm`); after
loading, `apply_kernels(model)` swaps in functions with the same signatures that take the fastest path
for the number of rows: the compiled bf16 kernel for few rows (decode), column-form torch products
without a kernel, and torch's F.linear for prefill. `Attention.decode_kernel` is set to the compiled decode
attention (clip, per-head q/k norms, RoPE, cache write and attention of one new token per row in one call).

Shape legend: O output features, I input features, n rows, e local experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moecluster import kernels
from moecluster.models.layers import Attention, KVCache, Linear, Step
from moecluster.models.moe import RoutedExperts, torch_moe_gemm
from moecluster.quant.experts import QuantizedLinear, QuantizedRoutedExperts

SMALL_ROWS = 16  # up to this many rows, w @ x.T streams weights faster than F.linear on CPU (bf16)


def fast_linear(x: torch.Tensor, w_OI: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias), with the kernel that streams the weights fastest for the number of rows."""
    rows = x.numel() // x.shape[-1]
    if (
        rows <= SMALL_ROWS
        and w_OI.dtype == torch.bfloat16
        and x.dtype == torch.bfloat16
        and w_OI.is_contiguous()
        and kernels.moe_gemv_available()
    ):  # weights read once for all rows
        x_nI = x.reshape(rows, -1).contiguous()
        out = kernels.linear(w_OI, x_nI, x_nI.new_empty(rows, w_OI.shape[0])).view(*x.shape[:-1], -1)
    elif rows == 1:
        out = torch.mv(w_OI, x.reshape(-1)).view(*x.shape[:-1], w_OI.shape[0])
    elif rows <= SMALL_ROWS:
        out = torch.mm(w_OI, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], w_OI.shape[0])
    else:
        return F.linear(x, w_OI, bias)
    return out if bias is None else out + bias


def fast_moe_gemm(
    w_eOI: torch.Tensor,
    local: list[int],
    counts: list[int],
    x_nI: torch.Tensor,
    x_rows: list[int],
    out_mO: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
    """torch_moe_gemm's contract; the compiled kernel when every expert has few pairs (decode): each expert's
    weights read once for all its pairs, each pair's bits independent of the others in the call."""
    if (
        counts
        and max(counts) <= SMALL_ROWS
        and w_eOI.dtype == torch.bfloat16
        and x_nI.dtype == torch.bfloat16
        and out_mO.is_contiguous()
        and kernels.moe_gemv_available()
    ):
        return kernels.moe_gemm(w_eOI, local, counts, x_nI.contiguous(), x_rows, out_mO, out_rows)
    return torch_moe_gemm(w_eOI, local, counts, x_nI, x_rows, out_mO, out_rows)


def fast_attn_decode(attn: Attention, qkv_BX: torch.Tensor, step: Step) -> torch.Tensor | None:
    """Attention.decode_kernel: the compiled decode attention (moe_gemv.c) for bf16 models with a full-length
    cache, no q/k norm or a per-head one; None (the torch path runs) otherwise."""
    cache = attn.cache
    if (
        type(cache) is not KVCache
        or qkv_BX.dtype != torch.bfloat16
        or attn.qk_norm not in (None, "head")
        or (attn.clip_qkv is not None and attn.qk_norm is not None)
        or not kernels.moe_gemv_available()
    ):
        return None
    q_norm = attn.q_norm.weight if attn.qk_norm == "head" else None
    k_norm = attn.k_norm.weight if attn.qk_norm == "head" else None
    if q_norm is not None and (q_norm.dtype != torch.bfloat16 or attn.q_norm.eps != attn.k_norm.eps):
        return None
    B = qkv_BX.shape[0]
    return kernels.attn_decode(
        qkv_BX.contiguous(),
        attn.n_heads,
        attn.n_kv_heads,
        attn.head_dim,
        step.cos_BTHd.reshape(B, -1),
        step.sin_BTHd.reshape(B, -1),
        cache.k,
        cache.v,
        step.rows.slots,
        step.rows.pos,
        clip=attn.clip_qkv,
        q_norm=q_norm,
        k_norm=k_norm,
        eps=attn.q_norm.eps if q_norm is not None else 1e-6,
    )


def apply_kernels(model: nn.Module) -> nn.Module:
    """Use the fast products in every Linear and every RoutedExperts of `model` (including those inside
    expert parallelism's modules) and the compiled decode attention in every Attention. Results are unchanged
    up to floating-point rounding."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.gemm = fast_linear
        elif isinstance(module, Attention) and type(module).forward is Attention.forward:  # not a subclass' own
            module.decode_kernel = fast_attn_decode
        elif isinstance(module, (QuantizedRoutedExperts, QuantizedLinear)):  # before RoutedExperts: a subclass
            module.gemm = kernels.moe_gemm_q  # the compiled kernel where it runs, else its torch path
        elif isinstance(module, RoutedExperts):
            module.gemm = fast_moe_gemm
    return model
