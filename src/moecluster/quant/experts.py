"""Quantized model pieces: routed experts and dense linears whose weights are QuantizedStacks.

`QuantizedRoutedExperts` is a RoutedExperts whose w13_eGD / w2_eDF are QuantizedStacks and whose `gemm`
takes a stack (kernels.moe_gemm_q's signature); routing, pair bookkeeping, `pairs()` and the combine are
RoutedExperts' own, so expert parallelism and the engine's byte accounting work unchanged. The default gemm
here is plain torch (exact dequantization, fp32 products); kernels.apply_kernels swaps in moe_gemm_q.

`QuantizedLinear` is the same for one dense weight: a stack of one "expert" [O, I].

Shape legend: N tokens, D model dim, F expert hidden dim, G = 2F, e local experts, O outputs, I inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.layers import Linear
from moecluster.models.moe import GluFn, RoutedExperts, silu_glu
from moecluster.quant.formats import DEFAULT_GROUP_SIZE, FORMATS
from moecluster.quant.stack import QuantizedStack

QUANTIZE_ON_LOAD = ("int8", "int4")  # what --quantize makes from a bf16/fp32 checkpoint
DENSE_QUANTIZE = ("int8", "int4")  # what --quantize-dense makes of dense linears (the lm_head: int8)

# gemm(stack, local experts, pairs per expert, x_nI, x row of each pair, out_mO, out row of each pair) -> out
QuantGemm = Callable[
    [QuantizedStack, list[int], list[int], torch.Tensor, list[int], torch.Tensor, list[int]], torch.Tensor
]


@dataclass(frozen=True)
class QuantOptions:
    """How to hold weights: `fmt` for the routed experts (None: the checkpoint's dtype or format),
    `group_size` for int8/int4, `dense`: also quantize the dense linears (attention, dense / shared MLPs) to
    this format and the lm_head to int8 (None: they stay in the compute dtype)."""

    fmt: str | None = None
    group_size: int = DEFAULT_GROUP_SIZE
    dense: str | None = None

    def check(self) -> QuantOptions:
        if self.fmt is not None and self.fmt not in QUANTIZE_ON_LOAD:
            raise MoeClusterError(
                f"--quantize {self.fmt!r} is not supported; choose one of "
                f"{', '.join(QUANTIZE_ON_LOAD)} (fp8 / mxfp4 are read as the checkpoint ships them)"
            )
        if self.group_size <= 0 or self.group_size % 64:
            raise MoeClusterError(f"--quant-group-size must be a positive multiple of 64, got {self.group_size}")
        if self.dense is not None and self.dense not in DENSE_QUANTIZE:
            raise MoeClusterError(
                f"--quantize-dense {self.dense!r} is not supported; choose one of {', '.join(DENSE_QUANTIZE)}"
            )
        if self.dense and self.fmt is None:
            raise MoeClusterError("--quantize-dense needs --quantize int8 or int4 for the experts")
        return self


def torch_moe_gemm_q(
    stack: QuantizedStack,
    local: list[int],
    counts: list[int],
    x_nI: torch.Tensor,
    x_rows: list[int],
    out_mO: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
    """torch_moe_gemm's contract on a QuantizedStack: each selected expert dequantized exactly to fp32 and
    applied to its pairs' rows in fp32, cast to out's dtype. Plain torch (no kernel)."""
    start = 0
    for e, count in zip(local, counts, strict=True):
        if count:
            xs = x_nI[x_rows[start : start + count]].float()
            out_mO[out_rows[start : start + count]] = (xs @ stack.dequantize(e).T).to(out_mO.dtype)
        start += count
    return out_mO


class QuantizedRoutedExperts(RoutedExperts):
    """The routed experts this process holds, as QuantizedStacks: w13_eGD [e, 2F, D], w2_eDF [e, D, F]; with
    `bias`, b13_eG / b2_eD in compute_dtype, and `activation`, applied by RoutedExperts' own pair loop (gpt-oss)."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        expert_ids: list[int],
        fmt: str,
        group_size: int | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
        *,
        bias: bool = False,
        activation: GluFn = silu_glu,
    ):
        super().__init__(
            num_experts, dim, hidden, expert_ids, dtype=compute_dtype, device="meta", bias=bias, activation=activation
        )
        del self.w13_eGD, self.w2_eDF  # the meta placeholders: the weights live in the stacks below
        if bias:  # small, kept unquantized in the compute dtype as the float experts keep them
            self.b13_eG, self.b2_eD = self.make_biases(compute_dtype)
        if fmt not in FORMATS:
            raise MoeClusterError(f"unknown quantized format {fmt!r}; known: {', '.join(FORMATS)}")
        e = len(self.expert_ids)
        self.fmt, self.group_size, self.compute_dtype = fmt, group_size, compute_dtype
        self.w13_eGD: QuantizedStack = QuantizedStack.empty(fmt, e, 2 * hidden, dim, group_size)  # type: ignore[assignment]
        self.w2_eDF: QuantizedStack = QuantizedStack.empty(fmt, e, dim, hidden, group_size)  # type: ignore[assignment]
        self.gemm = torch_moe_gemm_q  # type: ignore[assignment]

    def expert_bytes(self) -> int:
        """Bytes of one expert as held: packed weights and their scales (gate, up and down), and its biases."""
        if not self.expert_ids:
            return 0
        return self.w13_eGD.expert_nbytes() + self.w2_eDF.expert_nbytes() + self.bias_bytes()

    @classmethod
    def like(
        cls,
        template: RoutedExperts,
        expert_ids: list[int],
        fmt: str,
        group_size: int | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> QuantizedRoutedExperts:
        """Empty quantized experts with `template`'s sizes, biases and activation, holding `expert_ids`."""
        return cls(
            template.num_experts,
            template.dim,
            template.hidden,
            expert_ids,
            fmt,
            group_size,
            compute_dtype,
            bias=template.b13_eG is not None,
            activation=template.activation,
        )

    def subset(self, keep: list[int]) -> QuantizedRoutedExperts:
        """A QuantizedRoutedExperts holding only `keep` (global ids), copied out of this one (same gemm)."""
        out = QuantizedRoutedExperts.like(self, keep, self.fmt, self.group_size, self.compute_dtype)
        for i, expert in enumerate(keep):
            j = self._local(expert)
            for src, dst in ((self.w13_eGD, out.w13_eGD), (self.w2_eDF, out.w2_eDF)):
                dst.copy_expert(i, src, j)
            if self.b13_eG is not None and self.b2_eD is not None:
                out.set_biases(i, self.b13_eG[j], self.b2_eD[j])
        out.gemm, out.combine = self.gemm, self.combine
        return out

    def extra_repr(self) -> str:
        return f"{self.fmt}, experts={len(self.expert_ids)}/{self.num_experts}, dim={self.dim}, hidden={self.hidden}"


class QuantizedLinear(nn.Module):
    """A Linear whose weight [O, I] is a one-"expert" QuantizedStack: x [..., I] -> [..., O] (+ bias) in x's
    dtype. Its packed data and scales are registered as (frozen) parameters so byte counts see them."""

    def __init__(self, stack: QuantizedStack, bias: torch.Tensor | None = None):
        super().__init__()
        if stack.num_experts != 1:
            raise MoeClusterError(f"internal: a QuantizedLinear holds one weight, got a stack of {stack.num_experts}")
        self.stack = stack
        self.qdata = nn.Parameter(stack.data, requires_grad=False)
        self.qscales = nn.Parameter(stack.scales, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.gemm: QuantGemm = torch_moe_gemm_q
        # a transformation may set a compiled product (stack, x_nI) -> out_nO with gemm's bits
        self.linear: Callable[[QuantizedStack, torch.Tensor], torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int | None = None) -> QuantizedLinear:
        return cls(QuantizedStack.quantize(fmt, linear.weight.detach()[None], group_size), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_nI = x.reshape(-1, self.stack.I).contiguous()
        n = x_nI.shape[0]
        if self.linear is not None:
            out_nO = self.linear(self.stack, x_nI)
        else:
            rows = list(range(n))
            out_nO = self.gemm(self.stack, [0], [n], x_nI, rows, x_nI.new_empty(n, self.stack.O), rows)
        out = out_nO.view(*x.shape[:-1], self.stack.O)
        return out if self.bias is None else out + self.bias


def quantize_dense_linears(model: nn.Module, fmt: str = "int8", group_size: int | None = None) -> int:
    """Replace every Linear of the blocks (attention, dense and shared MLPs) whose input dim the group size
    divides by a QuantizedLinear in `fmt`, and the lm_head (unless tied to the embeddings) by an int8 one, as
    llama.cpp keeps its output tensor at 6-8 bits whatever the rest: it decides the logits. The router gates
    (they decide routing) and the embeddings (one row read per token) stay. One at a time; returns the number
    replaced."""
    g = group_size or DEFAULT_GROUP_SIZE
    head = getattr(model, "lm_head", None)
    targets = [
        (parent, name, child, "int8" if child is head else fmt)
        for parent in model.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear)
        and name != "gate"
        and not (child is head and getattr(model, "tie_embeddings", False))
        and child.in_features % g == 0
    ]
    for parent, name, child, child_fmt in targets:
        setattr(parent, name, QuantizedLinear.from_linear(child, child_fmt, g))
    return len(targets)
