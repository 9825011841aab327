"""Quantized formats (moecluster.quant) and the quantized expert kernel (kernels.moe_gemm_q).

Tolerances, per format, against a float64 reference on the exactly dequantized weights:
- fp8 / mxfp4 (weights converted exactly, x in bf16, fp32 accumulation): |err| <= 1e-5 * (|W| @ |x|).
- int8 / int4: the kernel quantizes x per group to int8 (s_x = amax / 127). Against the reference on that
  same quantized x: 1e-5 * (|W| @ |x|); against the unquantized x: sum over groups of |w| * s_x / 2.
- the torch path (x used as is): 1e-5 * (|W| @ |x|).
bf16 outputs are additionally within one bf16 rounding (2^-8 relative) of the fp32 ones.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moecluster import kernels
from moecluster.errors import MoeClusterError
from moecluster.quant import (
    FORMATS,
    QuantizedStack,
    dequantize_fp8_block,
    dequantize_mxfp4,
    format_from_quantization_config,
    quantize_int4,
    quantize_int8,
)

needs_kernel = pytest.mark.skipif(
    not kernels.moe_gemm_q_available(), reason=f"moe_gemm_q unavailable: {kernels.q_unavailable_reason}"
)
# (format, O, I, group): O not a multiple of 4; fp8 with a partial 128-block (160) and one the kernel leaves to
# torch (200); mxfp4 with an odd number of 32-groups (96)
SHAPES = [
    ("int8", 37, 256, 64),
    ("int8", 64, 384, 128),
    ("int4", 37, 256, 128),
    ("int4", 64, 384, 64),
    ("fp8", 37, 256, None),
    ("fp8", 130, 160, None),
    ("fp8", 12, 200, None),
    ("mxfp4", 37, 256, None),
    ("mxfp4", 21, 96, None),
]


def random_stack(fmt: str, e: int, O: int, I: int, group: int | None, seed: int = 0) -> QuantizedStack:
    gen = torch.Generator().manual_seed(seed)
    return QuantizedStack.quantize(fmt, torch.randn(e, O, I, generator=gen) * 0.05, group)


def quantize_x_like_kernel(x_nI: torch.Tensor, g: int) -> torch.Tensor:
    """The kernel's activation quantization, emulated op for op in IEEE fp32: q = rint(x * (127 / amax)).
    In numpy: torch's scalar / tensor division is not correctly rounded (63.5 became 63.499996 and rounded down)."""
    x = x_nI.float().unflatten(-1, (-1, g)).numpy()
    amax = np.abs(x).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    return torch.from_numpy(np.rint(x * inv) * (amax / np.float32(127.0))).flatten(-2)


def pairs_reference(stack, local, counts, x_nI, x_rows) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 W @ x per pair and the magnitude |W| @ |x| that scales the fp32 rounding bound."""
    ws = [stack.dequantize(e).double() for e, c in zip(local, counts) for _ in range(c)]
    xs = [x_nI[r].double() for r in x_rows]
    ref = torch.stack([w @ x for w, x in zip(ws, xs)])
    mag = torch.stack([w.abs() @ x.abs() for w, x in zip(ws, xs)])
    return ref, mag


def run(fn, stack, local, counts, x, x_rows, out_dtype=torch.float32):
    return fn(
        stack, local, counts, x, x_rows, torch.zeros(len(x_rows), stack.O, dtype=out_dtype), list(range(len(x_rows)))
    )


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("g", [64, 128, 256])
def test_int_round_trip_within_half_a_step(fmt, g):
    w = torch.randn(48, 512, generator=torch.Generator().manual_seed(g)) * 0.1
    w[3, :g] = 0.0  # an all-zero group stays zero
    q, s = (quantize_int8 if fmt == "int8" else quantize_int4)(w, g)
    stack = QuantizedStack.empty(fmt, 1, 48, 512, g)
    stack.set_expert(0, q, s)
    err = (stack.dequantize(0) - w).abs().unflatten(-1, (-1, g))
    assert (err <= s[..., None] / 2 * (1 + 1e-6)).all()
    assert (stack.dequantize(0)[3, :g] == 0).all()


def test_fp8_dequantization_matches_transformers():
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    gen = torch.Generator().manual_seed(1)
    for O, I in ((256, 384), (300, 200)):
        bits = torch.randint(0, 256, (2, O, I), generator=gen, dtype=torch.uint8)
        bits[(bits & 0x7F) == 0x7F] = 0  # no NaNs
        weight = bits.view(torch.float8_e4m3fn)
        scale_inv = torch.rand(2, -(-O // 128), -(-I // 128), generator=gen) * 1e-2
        theirs = _dequantize_fp8_weight(weight, scale_inv, [128, 128], torch.float32)
        assert torch.equal(dequantize_fp8_block(weight, scale_inv), theirs)


def test_mxfp4_dequantization_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    gen = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 40, 6, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 40, 6), generator=gen, dtype=torch.uint8)
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)  # [E, I, O]
    assert torch.equal(dequantize_mxfp4(blocks, scales), theirs.transpose(1, 2))


def test_quantization_config_formats_and_errors():
    assert format_from_quantization_config(None) is None
    assert format_from_quantization_config({"quant_method": "mxfp4"}) == "mxfp4"
    assert (
        format_from_quantization_config(
            {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3", "activation_scheme": "dynamic"}
        )
        == "fp8"
    )
    for method in ("gptq", "awq", "bitsandbytes"):
        with pytest.raises(MoeClusterError, match=f"'{method}'.*not supported.*'fp8', 'mxfp4'"):
            format_from_quantization_config({"quant_method": method, "bits": 4})
    with pytest.raises(MoeClusterError, match="weight_block_size"):
        format_from_quantization_config({"quant_method": "fp8", "weight_block_size": [64, 64]})


def test_stack_rejects_bad_shapes():
    with pytest.raises(MoeClusterError, match="multiple of 64"):
        QuantizedStack.empty("int8", 2, 16, 192, 128)
    with pytest.raises(MoeClusterError, match="unknown quantized format"):
        QuantizedStack.empty("nf4", 2, 16, 128)
    stack = QuantizedStack.empty("int4", 2, 16, 128)
    with pytest.raises(MoeClusterError, match=r"data must be torch.uint8 \[16, 64\]"):
        stack.set_expert(0, torch.zeros(16, 128, dtype=torch.uint8), torch.zeros(16, 1))
    assert stack.nbytes() == 2 * 16 * 64 + 2 * 16 * 1 * 4


@pytest.mark.parametrize("fmt,O,I,g", SHAPES)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_torch_path_equals_reference(fmt, O, I, g, x_dtype):
    stack = random_stack(fmt, 4, O, I, g)
    x = torch.randn(3, I, generator=torch.Generator().manual_seed(5)).to(x_dtype)
    local, counts, x_rows = [2, 0], [2, 1], [0, 2, 1]
    ref, mag = pairs_reference(stack, local, counts, x, x_rows)
    out = run(kernels.moe_gemm_q_torch, stack, local, counts, x, x_rows)
    assert ((out.double() - ref).abs() <= 1e-5 * mag + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize("fmt,O,I,g", SHAPES)
def test_kernel_equals_reference(fmt, O, I, g):
    stack = random_stack(fmt, 5, O, I, g)
    x = torch.randn(4, I, generator=torch.Generator().manual_seed(7)).bfloat16()
    local, counts, x_rows = [3, 1, 4], [2, 3, 1], [0, 3, 0, 1, 2, 2]
    out = run(kernels.moe_gemm_q, stack, local, counts, x, x_rows)
    if fmt in ("int8", "int4"):
        ref, mag = pairs_reference(stack, local, counts, quantize_x_like_kernel(x, stack.group_size), x_rows)
        assert ((out.double() - ref).abs() <= 1e-5 * mag).all()
        # against the unquantized x: half a step of x per element, weighted by |w|
        exact, _ = pairs_reference(stack, local, counts, x, x_rows)
        step_nI = (
            (x.float().unflatten(-1, (-1, stack.group_size)).abs().amax(-1, keepdim=True) / 127)
            .expand(-1, -1, stack.group_size)
            .flatten(-2)
        )
        _, wabs = pairs_reference(stack, local, counts, step_nI / 2, x_rows)
        assert ((out.double() - exact).abs() <= wabs * (1 + 1e-4) + 1e-5 * mag).all()
    else:
        ref, mag = pairs_reference(stack, local, counts, x, x_rows)
        assert ((out.double() - ref).abs() <= 1e-5 * mag).all()
    out_bf16 = run(kernels.moe_gemm_q, stack, local, counts, x, x_rows, torch.bfloat16)
    assert torch.equal(out_bf16, out.bfloat16())  # one rounding of the same fp32 sums


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_fp32_activations(fmt):
    """fp32 x: int formats quantize it directly; fp8 / mxfp4 round it to bf16 first."""
    stack = random_stack(fmt, 3, 20, 256, None)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(3))
    out = run(kernels.moe_gemm_q, stack, [1, 2], [1, 1], x, [0, 1])
    x_eff = quantize_x_like_kernel(x, stack.group_size) if fmt in ("int8", "int4") else x.bfloat16().double()
    ref, mag = pairs_reference(stack, [1, 2], [1, 1], x_eff, [0, 1])
    assert ((out.double() - ref).abs() <= 1e-5 * mag).all()


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
def test_kernel_bits_do_not_depend_on_threads_or_companions(fmt):
    """A pair's output is computed by one thread in one order: alone on 1 thread, or in a batch with other
    experts and pairs on 2 threads (and grouped 2-by-2 with another pair of its expert), the same bits."""
    stack = random_stack(fmt, 6, 130, 512, None, seed=11)
    x = torch.randn(5, 512, generator=torch.Generator().manual_seed(12)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = run(kernels.moe_gemm_q, stack, [4], [1], x, [3])
        torch.set_num_threads(2)
        batch = run(kernels.moe_gemm_q, stack, [0, 4, 2], [2, 3, 1], x, [0, 1, 2, 3, 4, 0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], batch[3])


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_linear_q_equals_moe_gemm_q_of_one_expert(fmt, x_dtype):
    """kernels.linear_q (QuantizedLinear's compiled product: rows as pairs, no row lists) gives moe_gemm_q's bits."""
    stack = random_stack(fmt, 1, 36, 256, None, seed=5)
    for n in (1, 3, 20):
        x = torch.randn(n, 256, generator=torch.Generator().manual_seed(n)).to(x_dtype)
        want = run(kernels.moe_gemm_q, stack, [0], [n], x, list(range(n)), x_dtype)
        assert torch.equal(kernels.linear_q(stack, x), want)


@needs_kernel
def test_kernel_writes_only_named_rows():
    stack = random_stack("int4", 2, 16, 128, None)
    x = torch.randn(1, 128).bfloat16()
    out = torch.full((4, 16), 7.0, dtype=torch.bfloat16)
    kernels.moe_gemm_q(stack, [1, 0], [1, 1], x, [0, 0], out, [3, 1])
    assert (out[[0, 2]] == 7.0).all() and not (out[[1, 3]] == 7.0).all()


def test_bad_arguments_are_named():
    stack = random_stack("int8", 2, 16, 128, None)
    x, out = torch.zeros(1, 128, dtype=torch.bfloat16), torch.zeros(1, 16, dtype=torch.bfloat16)
    for fn in (kernels.moe_gemm_q, kernels.moe_gemm_q_torch):
        with pytest.raises(ValueError, match="out of range"):
            fn(stack, [2], [1], x, [0], out, [0])
        with pytest.raises(ValueError, match="x must have contiguous rows of 128"):
            fn(stack, [0], [1], torch.zeros(1, 64, dtype=torch.bfloat16), [0], out, [0])
        with pytest.raises(ValueError, match="bf16 or fp32"):
            fn(stack, [0], [1], x.half(), [0], out, [0])
        with pytest.raises(ValueError, match="counts"):
            fn(stack, [0, 1], [1, 1], x, [0], out, [0])
        with pytest.raises(ValueError, match="index past"):
            fn(stack, [0], [1], x, [1], out, [0])
