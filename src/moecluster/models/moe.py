"""Mixture-of-experts pieces: routers (small functions the architecture file picks: softmax-top-k,
top-k-softmax, sigmoid with correction bias and group-limited top-k, softmax with group-limited top-k), the
routed experts (prestacked), and `MoE(router, experts, shared=None)`.

`RoutedExperts.forward(x_ND, ids_NK, weights_NK) -> out_ND` is the seam expert parallelism swaps.
Its products go through `self.gemm` (moe_gemm's signature), plain torch unless a kernel is swapped in
after loading (kernels.apply_kernels).

Shape legend: N tokens (flattened batch), D model dim, F expert hidden dim, G = 2F, E experts,
e experts held here, K top-k, P (token, expert) pairs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.layers import GatedMLP, Linear

# gemm(w_eOI, local experts, pairs per expert, x_nI, x row of each pair, out_mO, out row of each pair) -> out
MoEGemm = Callable[[torch.Tensor, list[int], list[int], torch.Tensor, list[int], torch.Tensor, list[int]], torch.Tensor]
# score function: router logits_NE -> (ids_NK, fp32 weights_NK)
ScoreFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# gated activation: (gate_PF, up_PF) -> h_PF, elementwise, each pair's bits independent of the others. ATen's
# flat elementwise loops end with a scalar tail whose exp/sigmoid may differ in the last bit from the vector
# body, so transcendental ops must run row by row: on row-strided views (gate_PF, up_PF are views of [P, 2F]).
GluFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def silu_glu(gate_PF: torch.Tensor, up_PF: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: the SwiGLU of the Llama/Mixtral/Qwen families."""
    return F.silu(gate_PF) * up_PF


def clamped_swiglu(
    gate_PF: torch.Tensor, up_PF: torch.Tensor, *, alpha: float = 1.702, limit: float = 7.0
) -> torch.Tensor:
    """gpt-oss: gate clamped above at `limit`, up clamped to +-limit, then (up + 1) * gate * sigmoid(alpha * gate)."""
    gate_PF = gate_PF.clamp(max=limit)
    up_PF = up_PF.clamp(-limit, limit)
    # the sigmoid on a view with a row stride of 2F, so each row is one vector loop (see GluFn)
    hidden = gate_PF.shape[-1]
    sig_PF = gate_PF.new_empty(*gate_PF.shape[:-1], 2 * hidden)[..., :hidden]
    torch.mul(gate_PF, alpha, out=sig_PF).sigmoid_()
    return (up_PF + 1) * (gate_PF * sig_PF)


def softmax_topk(
    logits_NE: torch.Tensor, k: int, *, renorm_p: float | None = None, fp32: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts, then top-k; optionally renormalize the k weights by their p-norm
    (p = 1: they sum to 1). fp32=False runs the softmax in the logits' dtype (DBRX)."""
    probs_NE = torch.softmax(logits_NE.float() if fp32 else logits_NE, dim=-1)
    weights_NK, ids_NK = torch.topk(probs_NE, k, dim=-1)
    if renorm_p is not None:
        weights_NK = weights_NK / torch.linalg.vector_norm(weights_NK, ord=renorm_p, dim=-1, keepdim=True)
    return ids_NK, weights_NK.float()


def topk_softmax(logits_NE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the logits, then softmax over those k only (Mistral's reference formulation)."""
    top_NK, ids_NK = torch.topk(logits_NE.float(), k, dim=-1)
    return ids_NK, torch.softmax(top_NK, dim=-1)


def sigmoid_group_topk(
    logits_NE: torch.Tensor,
    k: int,
    *,
    bias_E: torch.Tensor,
    n_group: int = 1,
    topk_group: int = 1,
    renorm: bool = True,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / GLM-4.5 routing ("noaux_tc"): scores = sigmoid(logits) in fp32; experts are chosen by
    scores + bias_E (the correction bias), only within the `topk_group` best of `n_group` expert groups
    (a group scores the sum of its two best biased scores); the weights are the chosen experts' unbiased
    scores, renormalized to sum 1 when `renorm`, times `scale` (routed_scaling_factor)."""
    scores_NE = torch.sigmoid(logits_NE.float())
    choice_NE = scores_NE + bias_E.float()
    if n_group > 1:  # with one group the mask keeps every expert
        N, E = choice_NE.shape
        group_NG = choice_NE.view(N, n_group, E // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        best_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(
            1, torch.topk(group_NG, topk_group, dim=-1)[1], True
        )
        choice_NE = choice_NE.masked_fill(~best_NG.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids_NK = torch.topk(choice_NE, k, dim=-1)[1]
    weights_NK = scores_NE.gather(1, ids_NK)
    if renorm:
        weights_NK = weights_NK / (weights_NK.sum(dim=-1, keepdim=True) + 1e-20)
    return ids_NK, weights_NK * scale


def softmax_group_topk(
    logits_NE: torch.Tensor, k: int, *, n_group: int = 1, topk_group: int = 1, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2 routing: softmax over all experts in fp32, top-k, weights times `scale`
    (routed_scaling_factor), not renormalized. n_group > 1 ("group_limited_greedy"): only experts in the
    `topk_group` of `n_group` groups with the highest single-expert score compete; n_group 1: "greedy"."""
    scores_NE = torch.softmax(logits_NE.float(), dim=-1)
    if n_group > 1:
        N, E = scores_NE.shape
        group_NG = scores_NE.view(N, n_group, E // n_group).amax(dim=-1)
        best_NG = torch.zeros_like(group_NG, dtype=torch.bool).scatter_(
            1, torch.topk(group_NG, topk_group, dim=-1)[1], True
        )
        scores_NE = scores_NE.masked_fill(~best_NG.repeat_interleave(E // n_group, dim=1), 0.0)
    weights_NK, ids_NK = torch.topk(scores_NE, k, dim=-1)
    return ids_NK, weights_NK * scale


class Router(nn.Module):
    """The gate projection and the architecture's score function: x_ND -> (ids_NK, fp32 weights_NK).

    correction_bias: an fp32 per-expert buffer `e_score_correction_bias` (loaded from the checkpoint) passed
    to the score function as `bias_E=` (sigmoid_group_topk). bias: the gate projection has a bias (gpt-oss)."""

    def __init__(
        self, dim: int, num_experts: int, score: ScoreFn, *, correction_bias: bool = False, bias: bool = False
    ):
        super().__init__()
        self.gate = Linear(dim, num_experts, bias=bias)
        self.score = score
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32) if correction_bias else None
        )

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.e_score_correction_bias is not None:
            return self.score(self.gate(x_ND), bias_E=self.e_score_correction_bias)  # type: ignore[call-arg]
        return self.score(self.gate(x_ND))


def torch_moe_gemm(
    w_eOI: torch.Tensor,
    local: list[int],
    counts: list[int],
    x_nI: torch.Tensor,
    x_rows: list[int],
    out_mO: torch.Tensor,
    out_rows: list[int],
) -> torch.Tensor:
    """out_mO[out_rows[p]] = w_eOI[local expert of p] @ x_nI[x_rows[p]], pairs grouped by expert (plain torch)."""
    start = 0
    for i, count in zip(local, counts, strict=True):
        if count:
            xs = torch.tensor(x_rows[start : start + count])
            outs = torch.tensor(out_rows[start : start + count])
            out_mO[outs] = F.linear(x_nI[xs], w_eOI[i])
        start += count
    return out_mO


def combine(y_NKD: torch.Tensor, weights_NK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out_ND = sum_k weights_NK * y_NKD, accumulated in fp32 in a fixed order, cast to the model dtype."""
    return (y_NKD.float() * weights_NK[..., None]).sum(dim=1).to(dtype)


def _frozen(*shape: int, dtype: torch.dtype, device: str | torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class RoutedExperts(nn.Module):
    """The routed experts this process holds, prestacked: w13_eGD (gate rows then up rows), w2_eDF, and with
    `bias` b13_eG (gate then up) and b2_eD. `activation(gate, up)` is the gated activation (silu_glu default).

    `expert_ids` lists the global expert id of each local row. Biases and activation are applied outside the
    gemm calls, elementwise per pair, so a swapped-in gemm keeps the per-pair bit-exactness contract."""

    b13_eG: nn.Parameter | None
    b2_eD: nn.Parameter | None

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden: int,
        expert_ids: list[int],
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        *,
        bias: bool = False,
        activation: GluFn = silu_glu,
    ):
        super().__init__()
        self.num_experts, self.dim, self.hidden = num_experts, dim, hidden
        self.expert_ids = list(expert_ids)
        e = len(self.expert_ids)

        self.w13_eGD = _frozen(e, 2 * hidden, dim, dtype=dtype, device=device)
        self.w2_eDF = _frozen(e, dim, hidden, dtype=dtype, device=device)
        self.b13_eG, self.b2_eD = self.make_biases(dtype, device) if bias else (None, None)
        self.activation = activation
        self._local_of = {expert: i for i, expert in enumerate(self.expert_ids)}
        self.local_of_E = torch.full((num_experts,), -1, dtype=torch.int64, device="cpu")  # the same, for kernels
        self.local_of_E[self.expert_ids] = torch.arange(e, device="cpu")
        self.gemm: MoEGemm = torch_moe_gemm
        self.combine: Callable[[torch.Tensor, torch.Tensor, torch.dtype], torch.Tensor] = combine  # swappable
        # a transformation may set a compiled path for one token: (self, x_1D, ids_1K, weights_1K) -> out_1D,
        # or None where it does not apply
        self.decode_kernel: Callable[..., torch.Tensor | None] | None = None
        self.last_num_evaluated = 0

    def make_biases(self, dtype: torch.dtype, device: str | torch.device = "cpu") -> tuple[nn.Parameter, nn.Parameter]:
        """Uninitialised b13_eG, b2_eD for the held experts (the quantized experts' biases too)."""
        e = len(self.expert_ids)
        return _frozen(e, 2 * self.hidden, dtype=dtype, device=device), _frozen(e, self.dim, dtype=dtype, device=device)

    def bias_bytes(self) -> int:
        """Bytes of one expert's biases (0 without)."""
        if not self.expert_ids or self.b13_eG is None or self.b2_eD is None:
            return 0
        return sum(b[0].numel() * b.element_size() for b in (self.b13_eG, self.b2_eD))

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up and down, and their biases)."""
        if not self.expert_ids:
            return 0
        return sum(
            p[0].numel() * p.element_size()
            for p in (self.w13_eGD, self.w2_eDF, self.b13_eG, self.b2_eD)
            if p is not None
        )

    def empty_like(self, expert_ids: list[int], dtype: torch.dtype) -> RoutedExperts:
        """Uninitialised RoutedExperts for `expert_ids` with this one's sizes, biases, activation and gemm."""
        out = RoutedExperts(
            self.num_experts,
            self.dim,
            self.hidden,
            expert_ids,
            dtype=dtype,
            bias=self.b13_eG is not None,
            activation=self.activation,
        )
        out.gemm, out.combine = self.gemm, self.combine
        return out

    def set_expert(
        self,
        i: int,
        w13_GD: torch.Tensor,
        w2_DF: torch.Tensor,
        b13_G: torch.Tensor | None = None,
        b2_D: torch.Tensor | None = None,
    ) -> None:
        """Copy one expert's weights (as an architecture's read_expert returns them) into local row i."""
        self.w13_eGD[i].copy_(w13_GD)
        self.w2_eDF[i].copy_(w2_DF)
        self.set_biases(i, b13_G, b2_D)

    def set_biases(self, i: int, b13_G: torch.Tensor | None, b2_D: torch.Tensor | None) -> None:
        """Copy one expert's biases into local row i (None and None for experts without biases)."""
        if self.b13_eG is not None and self.b2_eD is not None and b13_G is not None and b2_D is not None:
            self.b13_eG[i].copy_(b13_G)
            self.b2_eD[i].copy_(b2_D)
        elif any(t is not None for t in (b13_G, b2_D, self.b13_eG, self.b2_eD)):
            raise MoeClusterError("internal: the expert biases read do not match the model's experts")

    def subset(self, keep: list[int]) -> RoutedExperts:
        """A RoutedExperts holding only `keep` (global ids), copied out of this one (same gemm)."""
        out = self.empty_like(keep, self.w13_eGD.dtype)
        rows = [self._local(e) for e in keep]
        if rows:
            for name in ("w13_eGD", "w2_eDF", "b13_eG", "b2_eD"):
                if getattr(self, name) is not None:
                    getattr(out, name).copy_(getattr(self, name)[rows])
        return out

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
        if self.decode_kernel is not None and x_ND.shape[0] == 1:
            out_1D = self.decode_kernel(self, x_ND, ids_NK, weights_NK)
            if out_1D is not None:
                self.last_num_evaluated = ids_NK.shape[1]  # one token: its K experts are distinct
                return out_1D
        y_NKD, self.last_num_evaluated = self.pairs(x_ND, ids_NK)
        return self.combine(y_NKD, weights_NK, x_ND.dtype)

    def pairs(
        self,
        x_ND: torch.Tensor,
        ids_NK: torch.Tensor,
        mine_NK: torch.Tensor | None = None,
        out_NKD: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Each selected expert's output per (token, k) pair, y_NKD; pairs not in `mine_NK` stay zero.

        Returns y_NKD and the number of distinct experts evaluated. Pairs are kept apart (not yet weighted
        and summed) so every rank combines them in the same order: bit-identical for any rank count and
        placement. `out_NKD` (zeros) is written instead of a new tensor when given."""
        N, K = ids_NK.shape
        y_NKD = x_ND.new_zeros(N, K, x_ND.shape[1]) if out_NKD is None else out_NKD
        if N == 1:  # decode, one token: no sort needed
            ids = ids_NK[0].tolist()
            mine = [True] * K if mine_NK is None else mine_NK[0].tolist()
            ks = [k for k in range(K) if mine[k]]
            return self._run(x_ND, y_NKD, ks, [ids[k] for k in ks], [1] * len(ks))
        flat_ids = ids_NK.reshape(-1)
        pair_order = torch.argsort(flat_ids, stable=True)
        if mine_NK is not None:
            pair_order = pair_order[mine_NK.reshape(-1)[pair_order]]
        experts, counts = torch.unique_consecutive(flat_ids[pair_order], return_counts=True)
        return self._run(x_ND, y_NKD, pair_order.tolist(), experts.tolist(), counts.tolist())

    def _run(
        self, x_ND: torch.Tensor, y_NKD: torch.Tensor, pairs: list[int], experts: list[int], counts: list[int]
    ) -> tuple[torch.Tensor, int]:
        """Every expert's weights read once for all its pairs (`pairs` = flat (token, k) indices grouped
        by expert, `counts` per expert), two gemm calls for the whole layer."""
        K, D = y_NKD.shape[1], y_NKD.shape[2]
        if not pairs:
            return y_NKD, 0
        local = [self._local(e) for e in experts]
        P = len(pairs)
        h_PG = self.gemm(
            self.w13_eGD,
            local,
            counts,
            x_ND.contiguous(),
            [p // K for p in pairs],
            x_ND.new_empty(P, 2 * self.hidden),
            list(range(P)),
        )
        local_P: torch.Tensor | None = None  # local expert row of each pair (for the biases)
        if self.b13_eG is not None:
            local_P = torch.tensor(local).repeat_interleave(torch.tensor(counts))
            h_PG = h_PG + self.b13_eG[local_P]
        gate_PF, up_PF = h_PG.chunk(2, dim=-1)
        h_PF = self.activation(gate_PF, up_PF)
        if self.b2_eD is None or local_P is None:
            self.gemm(self.w2_eDF, local, counts, h_PF, list(range(P)), y_NKD.view(-1, D), pairs)
        else:  # the down bias is added per pair before the pairs are scattered to their (token, k) rows
            out_PD = self.gemm(self.w2_eDF, local, counts, h_PF, list(range(P)), x_ND.new_empty(P, D), list(range(P)))
            y_NKD.view(-1, D)[torch.tensor(pairs)] = out_PD + self.b2_eD[local_P]
        return y_NKD, len(experts)

    def _local(self, expert: int) -> int:
        i = self._local_of.get(expert)
        if i is None:
            raise MoeClusterError(f"internal: expert {expert} was assigned here but is not held by this process")
        return i


class MoE(nn.Module):
    """router -> routed experts (-> + shared experts, optionally gated): x_ND -> out_ND.

    shared_gate: None (shared output added as is, DeepSeek-style) or a Linear [1, D] whose sigmoid
    scales the shared output per token (Qwen2-MoE)."""

    # transformations replace router and experts (expert parallelism, timers): typed loosely on purpose
    router: Any
    experts: Any
    recorder: Any
    index: int

    def __init__(
        self, router: Router, experts: RoutedExperts, shared: GatedMLP | None = None, shared_gate: Linear | None = None
    ):
        super().__init__()
        self.router, self.experts, self.shared, self.shared_gate = router, experts, shared, shared_gate
        self.index = 0  # position among the model's MoE layers (placement's layer id); set by the loader
        self.recorder = None  # routing statistics / metrics: .record(index, ids_NK as lists), set by them

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        ids_NK, weights_NK = self.router(x_ND)
        if self.recorder is not None:
            self.recorder.record(self.index, ids_NK.tolist())
        out_ND = self.experts(x_ND, ids_NK, weights_NK)
        if self.shared is not None:
            shared_ND = self.shared(x_ND)
            if self.shared_gate is not None:
                shared_ND = torch.sigmoid(self.shared_gate(x_ND)) * shared_ND
            out_ND = out_ND + shared_ND
        return out_ND
