"""The kernel transformation: point a loaded model's products at the compiled kernels.

Model files use plain torch (`Linear.gemm = F.linear`, `RoutedExperts.gemm = torch_moe_gemm`); after
loading, `apply_kernels(model)` swaps in functions with the same signatures that take the fastest path
for the number of rows: the compiled bf16 kernel for few rows (decode), column-form torch products
without a kernel, and torch's F.linear for prefill. `Attention.decode_kernel` is set to the compiled decode
attention (clip, per-head q/k norms, RoPE, cache write and attention of one new token per row in one call).

Shape legend: O output features, I input features, n rows, e local experts.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moecluster import kernels
from moecluster.kernels import glue
from moecluster.models.layers import Attention, DecoderModel, KVCache, Linear, PreNormBlock, RMSNorm, Step
from moecluster.models.moe import RoutedExperts, Router, combine, silu_glu, softmax_topk, torch_moe_gemm
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


def fast_rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor | None:
    """RMSNorm.kernel: glue.c's row-by-row RMSNorm for bf16 (any number of rows, so a row's bits never depend
    on the batch); None (torch) otherwise."""
    if x.dtype != torch.bfloat16 or norm.weight.dtype != torch.bfloat16 or not x.is_contiguous():
        return None
    return glue.rms_norm(x, norm.weight, norm.eps)


def fast_combine(y_NKD: torch.Tensor, weights_NK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """moe.combine's contract in one compiled call for bf16 (the same bits: k summed in order in fp32)."""
    if dtype == torch.bfloat16 and y_NKD.dtype == dtype and y_NKD.is_contiguous() and weights_NK.is_contiguous():
        return glue.combine(y_NKD, weights_NK.float())
    return combine(y_NKD, weights_NK, dtype)


def fast_silu_glu(gate_PF: torch.Tensor, up_PF: torch.Tensor) -> torch.Tensor:
    """silu_glu in one compiled call for bf16 halves of one [P, 2F] tensor."""
    if gate_PF.dtype == torch.bfloat16 and gate_PF.stride(-1) == 1 and gate_PF.stride() == up_PF.stride():
        return glue.silu_mul(gate_PF, up_PF)
    return silu_glu(gate_PF, up_PF)


def fast_softmax_topk(
    logits_NE: torch.Tensor, k: int, *, renorm_p: float | None = None, fp32: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax_topk with the softmax and the renormalization compiled for bf16 logits; the top-k stays torch's
    (its order among equal probabilities, which bf16 logits often have, is the reference models')."""
    if not fp32 or renorm_p not in (None, 1.0) or logits_NE.dtype != torch.bfloat16 or logits_NE.dim() != 2:
        return softmax_topk(logits_NE, k, renorm_p=renorm_p, fp32=fp32)
    weights_NK, ids_NK = torch.topk(glue.softmax(logits_NE.contiguous()), k, dim=-1)
    return ids_NK, glue.renorm_(weights_NK) if renorm_p is not None else weights_NK


def fast_moe_decode(
    experts: RoutedExperts, x_1D: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor
) -> torch.Tensor | None:
    """RoutedExperts.decode_kernel: one token's experts, SwiGLU and combine in one compiled call (glue.moe_decode,
    glue.moe_decode_q for quantized stacks), for experts without biases whose products, activation and combine
    are the kernels' (the same bits as that per-pair path); None otherwise."""
    quantized = isinstance(experts, QuantizedRoutedExperts)
    if (
        experts.gemm is not (kernels.moe_gemm_q if quantized else fast_moe_gemm)
        or experts.activation is not fast_silu_glu
        or experts.combine is not fast_combine
        or experts.b13_eG is not None
        or x_1D.dtype != torch.bfloat16
        or ids_1K.dtype != torch.int64
        or weights_1K.dtype != torch.float32
        or not (x_1D.is_contiguous() and ids_1K.is_contiguous() and weights_1K.is_contiguous())
    ):
        return None
    if quantized:
        w13, w2 = experts.w13_eGD, experts.w2_eDF
        if not (kernels._kernel_takes(w13) and kernels._kernel_takes(w2)) or w13.group_size != w2.group_size:
            return None
        return glue.moe_decode_q(w13, w2, experts.local_of_E, ids_1K, weights_1K, x_1D)
    if experts.w13_eGD.dtype != torch.bfloat16:
        return None
    return glue.moe_decode(experts.w13_eGD, experts.w2_eDF, experts.local_of_E, ids_1K, weights_1K, x_1D)


def apply_kernels(model: nn.Module) -> nn.Module:
    """Use the fast products in every Linear and every RoutedExperts of `model` (including those inside
    expert parallelism's modules), the compiled decode attention in every Attention and the compiled glue
    (RMSNorm of the blocks, router softmax, SwiGLU, combine) where it applies. Results are unchanged up to
    floating-point rounding."""
    use_glue = glue.available()
    for module in model.modules():
        if use_glue:
            _apply_glue(module)
        if isinstance(module, Linear):
            module.gemm = fast_linear
        elif isinstance(module, Attention) and type(module).forward is Attention.forward:  # not a subclass' own
            module.decode_kernel = fast_attn_decode
        elif isinstance(module, (QuantizedRoutedExperts, QuantizedLinear)):  # before RoutedExperts: a subclass
            module.gemm = kernels.moe_gemm_q  # the compiled kernel where it runs, else its torch path
            if isinstance(module, QuantizedLinear):
                module.linear = kernels.linear_q
        elif isinstance(module, RoutedExperts):
            module.gemm = fast_moe_gemm
    return model


def _apply_glue(module: nn.Module) -> None:
    """glue.c's calls in place of the torch ops between the weight streams (see glue.py)."""
    if isinstance(module, PreNormBlock):
        for norm in (module.attn_norm, module.mlp_norm):
            if type(norm) is RMSNorm:
                norm.kernel = fast_rms_norm
    elif isinstance(module, DecoderModel) and type(module.norm) is RMSNorm:
        module.norm.kernel = fast_rms_norm
    elif isinstance(module, Router) and isinstance(module.score, partial) and module.score.func is softmax_topk:
        module.score = partial(fast_softmax_topk, *module.score.args, **module.score.keywords)
    elif isinstance(module, RoutedExperts):
        module.combine = fast_combine
        if module.activation is silu_glu:
            module.activation = fast_silu_glu
        module.decode_kernel = fast_moe_decode  # where its products are the kernels (checked per call)
