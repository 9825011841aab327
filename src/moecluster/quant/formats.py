"""Quantized weight formats: quantize on load (int8, int4) and exact dequantization (all four).

Every function works on the trailing [O, I] dims (O output rows, I inputs) and broadcasts over leading ones,
so a stack [e, O, I] or one expert [O, I] go through the same code. Dequantization is exact in fp32: every
quantized value and every scale is representable, and each element is one product value * scale.
"""

from __future__ import annotations

import torch

from moecluster.errors import MoeClusterError
from moecluster.models.shape import FP8_BLOCK, format_from_quantization_config  # noqa: F401 (re-exported)

FORMATS = ("int8", "int4", "fp8", "mxfp4")
# int8/int4 group size along I. Kernel speed at 64/128/256 was within noise (benchmarks/quant_kernels.py, a
# shared machine); fp32 scales cost 6/3/1.5% (int8) and 12/6/3% (int4) extra bytes; Gaussian round-trip
# error (relative RMS) int8 0.59/0.65/0.70%, int4 10.8/11.7/12.6%. 128 is the middle.
DEFAULT_GROUP_SIZE = 128
MXFP4_GROUP = 32
# e2m1 code -> value, index = nibble (bit 3 is the sign), the table gpt-oss and transformers use.
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
_QMAX = {"int8": 127, "int4": 7}  # symmetric: -qmax..qmax, so a group's scale is amax / qmax


def _check_groups(w_OI: torch.Tensor, group_size: int) -> None:
    if group_size <= 0 or group_size % 64 or w_OI.shape[-1] % group_size:
        raise MoeClusterError(
            f"int quantization needs a group size that is a positive multiple of 64 and divides "
            f"the input dim {w_OI.shape[-1]}; got {group_size} (try 64 or 128)"
        )


def _quantize_sym(w_OI: torch.Tensor, group_size: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """q = round(w / scale) in -qmax..qmax per group of `group_size` inputs, scale = amax / qmax (fp32)."""
    _check_groups(w_OI, group_size)
    w = w_OI.float().unflatten(-1, (-1, group_size))  # [..., O, G, g]
    scale = w.abs().amax(-1) / qmax  # [..., O, G]
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))  # an all-zero group stays zero
    q = torch.round(w * inv[..., None]).clamp_(-qmax, qmax)
    return q.flatten(-2).to(torch.int8), scale


def quantize_int8(w_OI: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (q int8 [..., O, I], scales fp32 [..., O, I/group_size]); |w - dq| <= scale / 2."""
    return _quantize_sym(w_OI, group_size, _QMAX["int8"])


def dequantize_int8(q_OI: torch.Tensor, scales_OG: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> torch.Tensor:
    """(int8 [..., O, I], fp32 [..., O, I/g]) -> fp32 [..., O, I]."""
    return (q_OI.float().unflatten(-1, (-1, group_size)) * scales_OG[..., None]).flatten(-2)


def quantize_int4(w_OI: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (packed uint8 [..., O, I/2], scales fp32 [..., O, I/g]).

    Byte j holds inputs 2j (low nibble) and 2j+1 (high nibble) as q + 8 (q in -7..7), the nibble order of
    MXFP4, so one unpacking scheme serves both."""
    q, scale = _quantize_sym(w_OI, group_size, _QMAX["int4"])
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4), scale


def dequantize_int4(
    packed_OH: torch.Tensor, scales_OG: torch.Tensor, group_size: int = DEFAULT_GROUP_SIZE
) -> torch.Tensor:
    """(uint8 [..., O, I/2], fp32 [..., O, I/g]) -> fp32 [..., O, I]."""
    lo = (packed_OH & 0x0F).to(torch.int8) - 8
    hi = (packed_OH >> 4).to(torch.int8) - 8
    q = torch.stack((lo, hi), dim=-1).flatten(-2)  # interleave: low nibble first
    return dequantize_int8(q, scales_OG, group_size)


def dequantize_fp8_block(weight_OI: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """(float8_e4m3fn [..., O, I], fp32 [..., ceil(O/b), ceil(I/b)]) -> fp32 [..., O, I]; w = fp8 * scale_inv."""
    if weight_OI.dtype != torch.float8_e4m3fn:
        raise MoeClusterError(f"fp8 weights must be float8_e4m3fn, got {weight_OI.dtype}")
    O, I = weight_OI.shape[-2:]
    want = (-(-O // block), -(-I // block))
    if tuple(scale_inv.shape[-2:]) != want:
        raise MoeClusterError(
            f"fp8 weight [{O}, {I}] needs weight_scale_inv [..., {want[0]}, {want[1]}] "
            f"for {block}x{block} blocks, got {list(scale_inv.shape)}"
        )
    s = scale_inv.float().repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :O, :I]
    return weight_OI.float() * s


def quantize_fp8_block(w_OI: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> (float8_e4m3fn [..., O, I], scale_inv fp32 [..., ceil(O/b), ceil(I/b)]), amax -> 448.
    What DeepSeek-V3's conversion does; here to make test and benchmark data."""
    O, I = w_OI.shape[-2:]
    Ob, Ib = -(-O // block), -(-I // block)
    pad = torch.nn.functional.pad(w_OI.float(), (0, Ib * block - I, 0, Ob * block - O))
    blocks = pad.unflatten(-1, (Ib, block)).unflatten(-3, (Ob, block))  # [..., Ob, b, Ib, b]
    scale_inv = blocks.abs().amax(dim=(-3, -1)) / 448.0
    s = torch.where(scale_inv > 0, scale_inv, torch.ones_like(scale_inv))
    q = (blocks / s[..., :, None, :, None]).flatten(-4, -3).flatten(-2)[..., :O, :I]
    return q.to(torch.float8_e4m3fn), scale_inv


def dequantize_mxfp4(blocks_OGB: torch.Tensor, scales_OG: torch.Tensor) -> torch.Tensor:
    """gpt-oss MXFP4 (uint8 [..., O, I/32, 16], uint8 e8m0 [..., O, I/32]) -> fp32 [..., O, I].

    Element 2j of a group is byte j's low nibble, 2j+1 its high nibble; the group's scale is 2^(s - 127).
    (transformers' convert_moe_packed_tensors returns the same values transposed to [..., I, O].)"""
    if (
        blocks_OGB.dtype != torch.uint8
        or scales_OG.dtype != torch.uint8
        or blocks_OGB.shape[-1] != 16
        or blocks_OGB.shape[:-1] != scales_OG.shape
    ):
        raise MoeClusterError(
            f"mxfp4 needs uint8 blocks [..., O, I/32, 16] and uint8 scales [..., O, I/32]; got "
            f"{blocks_OGB.dtype} {list(blocks_OGB.shape)} and "
            f"{scales_OG.dtype} {list(scales_OG.shape)}"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    vals = torch.stack((lut[(blocks_OGB & 0x0F).long()], lut[(blocks_OGB >> 4).long()]), dim=-1).flatten(-2)
    vals = torch.ldexp(vals, scales_OG.to(torch.int32)[..., None] - 127)
    return vals.flatten(-2)


def quantize_mxfp4(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., O, I] -> gpt-oss MXFP4 (blocks uint8 [..., O, I/32, 16], scales uint8 [..., O, I/32]), nearest
    value after scaling each group so its amax is at most 6. Test and benchmark data."""
    if w_OI.shape[-1] % MXFP4_GROUP:
        raise MoeClusterError(f"mxfp4 needs the input dim to be a multiple of 32, got {w_OI.shape[-1]}")
    w = w_OI.float().unflatten(-1, (-1, MXFP4_GROUP))
    amax = w.abs().amax(-1).clamp_min(2.0**-126)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = w / torch.ldexp(torch.ones_like(e), e.to(torch.int32))[..., None]
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = (scaled[..., None] - lut).abs().argmin(-1).to(torch.uint8)  # first match: +0 over -0
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return blocks.contiguous(), (e.to(torch.int32) + 127).to(torch.uint8)
