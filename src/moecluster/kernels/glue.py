"""The decoder's small steps between weight streams as compiled calls (glue.c): RMSNorm, the router's softmax
(and renormalization), SwiGLU and the experts' combine, bf16 only; one token's routed experts in one call.

Each replaces 3-10 small torch ops; glue.c says why that pays. Built into one library with moe_gemv.c
(kernels/__init__.py); call only if `available()`.
Shape legend: N rows, D model dim, E experts, K top-k, P pairs, F expert hidden dim.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch

from moecluster import kernels

_BF = torch.bfloat16


def declare(lib: Any) -> None:
    """Argument types of glue.c's functions (built into both kernel libraries)."""
    i64, ptr, f32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float
    lib.rms_norm_bf16.argtypes = [i64, i64, ptr, ptr, f32, ptr]
    lib.rms_norm_bf16.restype = None
    lib.combine_bf16.argtypes = [i64, i64, i64, ptr, ptr, ptr]
    lib.combine_bf16.restype = None
    lib.silu_mul_bf16.argtypes = [i64, i64, ptr, ptr, i64, ptr]
    lib.silu_mul_bf16.restype = None
    lib.softmax_bf16.argtypes = [i64, i64, ptr, ptr]
    lib.softmax_bf16.restype = None
    lib.renorm_f32.argtypes = [i64, i64, ptr]
    lib.renorm_f32.restype = None


def _get() -> Any:
    return kernels._get()


def available() -> bool:
    return kernels.moe_gemv_available()


def _ok(*ts: torch.Tensor) -> bool:
    return all(t.dtype == _BF and t.is_cpu and t.is_contiguous() for t in ts)


def rms_norm(x_ND: torch.Tensor, w_D: torch.Tensor, eps: float) -> torch.Tensor:
    """bf16(w * bf16(x / rms(x))) per row of size D (HF's RMSNorm)."""
    D = w_D.shape[0]
    if not _ok(x_ND, w_D) or x_ND.shape[-1] != D or w_D.dim() != 1:
        raise ValueError("rms_norm: needs contiguous bf16 CPU tensors x [..., D] and w [D]")
    out = torch.empty_like(x_ND)
    _get().rms_norm_bf16(x_ND.numel() // D, D, x_ND.data_ptr(), w_D.data_ptr(), eps, out.data_ptr())
    return out


def combine(y_NKD: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """out_ND = bf16(sum_k fp32(y_NKD) * weights_NK), k in order (moe.combine's contract)."""
    N, K, D = y_NKD.shape
    w_ok = weights_NK.dtype == torch.float32 and weights_NK.is_contiguous() and weights_NK.shape == (N, K)
    if not _ok(y_NKD) or not w_ok:
        raise ValueError("combine: needs contiguous y [N, K, D] bf16 and weights [N, K] fp32")
    out = y_NKD.new_empty(N, D)
    _get().combine_bf16(N, K, D, y_NKD.data_ptr(), weights_NK.data_ptr(), out.data_ptr())
    return out


def silu_mul(gate_PF: torch.Tensor, up_PF: torch.Tensor) -> torch.Tensor:
    """out_PF = bf16(bf16(silu(gate)) * up); gate and up may be row-strided views (the halves of [P, 2F])."""
    P, F = gate_PF.shape
    if (
        gate_PF.dtype != _BF
        or up_PF.dtype != _BF
        or up_PF.shape != (P, F)
        or gate_PF.stride(1) != 1
        or up_PF.stride(1) != 1
        or gate_PF.stride(0) != up_PF.stride(0)
        or not (gate_PF.is_cpu and up_PF.is_cpu)
    ):
        raise ValueError("silu_mul: needs bf16 CPU gate and up [P, F] with contiguous rows, equally strided")
    out = gate_PF.new_empty(P, F)
    _get().silu_mul_bf16(P, F, gate_PF.data_ptr(), up_PF.data_ptr(), gate_PF.stride(0), out.data_ptr())
    return out


def softmax(logits_NE: torch.Tensor) -> torch.Tensor:
    """p_NE = softmax(fp32(logits_NE)) per row, fp32."""
    if not _ok(logits_NE) or logits_NE.dim() != 2:
        raise ValueError("softmax: needs contiguous bf16 CPU logits [N, E]")
    p = torch.empty(logits_NE.shape, dtype=torch.float32)
    _get().softmax_bf16(*logits_NE.shape, logits_NE.data_ptr(), p.data_ptr())
    return p


def renorm_(w_NK: torch.Tensor) -> torch.Tensor:
    """w_NK divided in place by its rows' sums of absolute values (summed in order)."""
    if w_NK.dtype != torch.float32 or not w_NK.is_contiguous() or not w_NK.is_cpu or w_NK.dim() != 2:
        raise ValueError("renorm_: needs a contiguous fp32 CPU tensor [N, K]")
    _get().renorm_f32(*w_NK.shape, w_NK.data_ptr())
    return w_NK


def moe_decode(
    w13_eGD: torch.Tensor,
    w2_eDF: torch.Tensor,
    local_of_E: torch.Tensor,
    ids_1K: torch.Tensor,
    weights_1K: torch.Tensor,
    x_1D: torch.Tensor,
) -> torch.Tensor | None:
    """One token's routed experts in one call (moe_gemv.c moe_decode_bf16): out_1D = sum_k weights[k] *
    w2[e_k] @ silu_glu(w13[e_k] @ x), bit-identical to the per-pair path with the kernels. local_of_E: int64
    local row of each global expert (-1 where not held). None when an expert is not held here. Callers check
    dtypes (bf16 stacks and x, int64 ids, fp32 weights) and contiguity."""
    (_, G, D), K = w13_eGD.shape, ids_1K.shape[1]
    out = x_1D.new_empty(1, D)
    rc = _get().moe_decode_bf16(
        w13_eGD.data_ptr(),
        w2_eDF.data_ptr(),
        D,
        G // 2,
        local_of_E.data_ptr(),
        local_of_E.shape[0],
        ids_1K.data_ptr(),
        weights_1K.data_ptr(),
        K,
        x_1D.data_ptr(),
        kernels.scratch_ptr(2 * K * (3 * G // 2 + D)),  # h13, h, y: bf16
        out.data_ptr(),
    )
    return out if rc == 0 else None


def moe_decode_q(
    w13, w2, local_of_E: torch.Tensor, ids_1K: torch.Tensor, weights_1K: torch.Tensor, x_1D: torch.Tensor
) -> torch.Tensor | None:
    """moe_decode for QuantizedStacks w13 [E, 2F, D] and w2 [E, D, F] of one format and group size (moe_gemm_q.c
    moe_decode_q): the bits of the per-pair path with kernels.moe_gemm_q. None when an expert is not held here
    or the quantized kernel is unavailable."""
    lib = kernels._get_q()
    if lib is None:
        return None
    fmt, g, K = kernels._Q_FORMAT_IDS[w13.fmt], w13.group_size, ids_1K.shape[1]
    D, F = w13.I, w2.I
    h_bytes = -(-2 * K * (3 * F + D) // 64) * 64  # h13, h, y: bf16, then moe_gemm_q's scratch 64-byte aligned
    q_bytes = max(kernels.q_row_bytes(lib, fmt, D, g), K * kernels.q_row_bytes(lib, fmt, F, g))
    base = kernels.scratch_ptr(h_bytes + q_bytes)
    out = x_1D.new_empty(1, D)
    rc = lib.moe_decode_q(
        fmt,
        w13.data.data_ptr(),
        w13.scales.data_ptr(),
        w2.data.data_ptr(),
        w2.scales.data_ptr(),
        D,
        F,
        g,
        local_of_E.data_ptr(),
        local_of_E.shape[0],
        ids_1K.data_ptr(),
        weights_1K.data_ptr(),
        K,
        x_1D.data_ptr(),
        base,
        base + h_bytes,
        out.data_ptr(),
    )
    return out if rc == 0 else None
