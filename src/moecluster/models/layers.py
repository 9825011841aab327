"""Pieces shared by the MoE decoder architectures: args, norms, RoPE, attention with a slot KV cache,
router, grouped experts and the decoder itself.

Shape legend: B batch rows (cache slots in use), T tokens per row, N = B*T flattened tokens,
D model dim, F expert hidden dim, G = 2F (gate and up projections stacked), E experts,
e experts held locally, K top-k, H query heads, Hk kv heads, Hd head dim, S cached positions, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moecluster import kernels
from moecluster.errors import MoeClusterError
from moecluster.tracing import TRACER, now


@dataclass
class ModelArgs:
    """Everything the decoder needs, flat. Built by each architecture's `from_hf_config`."""

    arch: str
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_dim: int
    num_experts: int
    top_k: int
    max_seq_len: int
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (no bias)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    clip_qkv: float | None = None
    router_softmax_fp32: bool = True  # Mixtral: softmax in fp32; DBRX: in the model dtype
    router_norm_p: float | None = 1.0  # renormalize top-k weights by their p-norm (None: keep softmax)
    head_dim: int = 0
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.head_dim:
            if self.dim % self.n_heads:
                raise MoeClusterError(
                    f"config: hidden size {self.dim} is not divisible by {self.n_heads} heads; fix config.json")
            self.head_dim = self.dim // self.n_heads
        checks = [
            (self.n_layers > 0, f"number of layers must be positive, got {self.n_layers}"),
            (self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
             f"{self.n_heads} attention heads are not a multiple of {self.n_kv_heads} kv heads"),
            (self.num_experts > 0, f"number of experts must be positive, got {self.num_experts}"),
            (0 < self.top_k <= self.num_experts,
             f"top-k {self.top_k} must be between 1 and the number of experts {self.num_experts}"),
            (self.ffn_dim > 0 and self.vocab_size > 0 and self.max_seq_len > 0,
             "ffn size, vocab size and max sequence length must be positive"),
            (self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even for rotary embeddings"),
        ]
        for ok, msg in checks:
            if not ok:
                raise MoeClusterError(f"config: {msg}; fix config.json")

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim


SMALL_ROWS = 16  # up to this many rows, w @ x.T streams weights faster than F.linear on CPU (bf16)


def linear(x: torch.Tensor, w_OI: torch.Tensor) -> torch.Tensor:
    """x @ w.T, choosing the kernel that streams the weights fastest for the number of rows."""
    rows = x.numel() // x.shape[-1]
    if rows <= SMALL_ROWS and w_OI.dtype == torch.bfloat16 and x.dtype == torch.bfloat16 \
            and w_OI.is_contiguous() and kernels.moe_gemv_available():  # weights read once for all rows
        x_nI = x.reshape(rows, -1).contiguous()
        out_nO = kernels.moe_gemm(w_OI[None], [0], [rows], x_nI, list(range(rows)),
                                  x_nI.new_empty(rows, w_OI.shape[0]), list(range(rows)))
        return out_nO.view(*x.shape[:-1], w_OI.shape[0])
    if rows == 1:
        return torch.mv(w_OI, x.reshape(-1)).view(*x.shape[:-1], w_OI.shape[0])
    if rows <= SMALL_ROWS:
        return torch.mm(w_OI, x.reshape(rows, -1).t()).t().reshape(*x.shape[:-1], w_OI.shape[0])
    return F.linear(x, w_OI)


def make_norm(args: ModelArgs) -> nn.Module:
    if args.norm == "layernorm":
        return nn.LayerNorm(args.dim, eps=args.norm_eps, bias=False)
    return RMSNorm(args.dim, args.norm_eps)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the HF Llama family does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SHd, sin_SHd for positions 0..S-1 (computed in fp32, stored in the model dtype like HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x_BHTHd: torch.Tensor, cos_BTHd: torch.Tensor, sin_BTHd: torch.Tensor) -> torch.Tensor:
    half = x_BHTHd.shape[-1] // 2
    rotated = torch.cat((-x_BHTHd[..., half:], x_BHTHd[..., :half]), dim=-1)
    return x_BHTHd * cos_BTHd[:, None] + rotated * sin_BTHd[:, None]


class KVCache(nn.Module):
    """Preallocated per-layer cache with one row per slot; a sequence owns a slot for its lifetime."""

    def __init__(self, num_slots: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (num_slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, rows: "CacheRows", k_BHkTHd: torch.Tensor, v_BHkTHd: torch.Tensor,
               span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at each row's positions; return the first `span` cached positions."""
        num_tokens = k_BHkTHd.shape[2]
        if num_tokens == 1 and len(rows.slots) > 1:  # batched decode: one scatter per tensor
            self.k[rows.slots_t, :, rows.pos_t] = k_BHkTHd[:, :, 0]
            self.v[rows.slots_t, :, rows.pos_t] = v_BHkTHd[:, :, 0]
            return self.k[rows.index, :, :span], self.v[rows.index, :, :span]
        for b, (slot, pos) in enumerate(zip(rows.slots, rows.pos)):
            self.k[slot, :, pos:pos + num_tokens] = k_BHkTHd[b]
            self.v[slot, :, pos:pos + num_tokens] = v_BHkTHd[b]
        return self.k[rows.index, :, :span], self.v[rows.index, :, :span]


class CacheRows(NamedTuple):
    """Which cache slot and start position each batch row uses, computed once per forward."""

    slots: list[int]
    pos: list[int]
    index: slice | torch.Tensor  # a slice (a view, no copy) when the slots are consecutive
    slots_t: torch.Tensor
    pos_t: torch.Tensor

    @classmethod
    def of(cls, slots_B: torch.Tensor, pos_B: torch.Tensor) -> "CacheRows":
        slots = slots_B.tolist()
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(slots, pos_B.tolist(), slice(slots[0], slots[0] + len(slots)) if consecutive else slots_B,
                   slots_B.long(), pos_B.long())


class Attention(nn.Module):
    """Grouped-query attention with fused qkv projection, optional qkv clipping (DBRX) and a slot cache."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.wqkv = nn.Linear(args.dim, args.qkv_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x_BTD: torch.Tensor, cos_BTHd: torch.Tensor, sin_BTHd: torch.Tensor,
                mask_B1TS: torch.Tensor, rows: CacheRows) -> torch.Tensor:
        a = self.args
        B, T, _ = x_BTD.shape
        qkv = linear(x_BTD, self.wqkv.weight)
        if a.clip_qkv is not None:
            qkv = qkv.clamp(min=-a.clip_qkv, max=a.clip_qkv)
        qk, v = qkv.split([(a.n_heads + a.n_kv_heads) * a.head_dim, a.n_kv_heads * a.head_dim], dim=-1)
        # query and key heads rotated in one pass (fewer small ops on the decode path)
        qk = apply_rope(qk.view(B, T, a.n_heads + a.n_kv_heads, a.head_dim).transpose(1, 2), cos_BTHd, sin_BTHd)
        q, k = qk.split([a.n_heads, a.n_kv_heads], dim=1)
        v = v.view(B, T, a.n_kv_heads, a.head_dim).transpose(1, 2)
        if self.cache is None:
            raise MoeClusterError("internal: call model.setup_cache() before forward")
        k, v = self.cache.update(rows, k, v, span=mask_B1TS.shape[-1])
        # one row, one new token: it attends to every cached position, so no mask (SDPA's fast path)
        mask = None if B == 1 and T == 1 else mask_B1TS
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=a.n_heads != a.n_kv_heads)
        return linear(out.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim), self.wo.weight)


class Router(nn.Module):
    """Linear gate -> softmax -> top-k -> optional renormalization. Returns ids_NK and fp32 weights_NK."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.gate = nn.Linear(args.dim, args.num_experts, bias=False)

    def forward(self, x_ND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits_NE = linear(x_ND, self.gate.weight)
        if self.args.router_softmax_fp32:
            logits_NE = logits_NE.float()
        probs_NE = torch.softmax(logits_NE, dim=-1)
        weights_NK, ids_NK = torch.topk(probs_NE, self.args.top_k, dim=-1)
        if self.args.router_norm_p is not None:
            weights_NK = weights_NK / torch.linalg.vector_norm(weights_NK, ord=self.args.router_norm_p, dim=-1,
                                                               keepdim=True)
        return ids_NK, weights_NK.float()


class GroupedExperts(nn.Module):
    """The experts this process holds, prestacked: w13_eGD (gate rows then up rows) and w2_eDF.

    `expert_ids` lists the global expert id of each local row.
    Every product is a `linear`/`mv` on contiguous memory (the fast path for memory-bound decode).
    """

    def __init__(self, args: ModelArgs, expert_ids: list[int], dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu"):
        super().__init__()
        self.num_experts = args.num_experts
        self.expert_ids = list(expert_ids)
        e = len(self.expert_ids)
        self.w13_eGD = nn.Parameter(torch.empty(e, 2 * args.ffn_dim, args.dim, dtype=dtype, device=device),
                                    requires_grad=False)
        self.w2_eDF = nn.Parameter(torch.empty(e, args.dim, args.ffn_dim, dtype=dtype, device=device),
                                   requires_grad=False)
        self._local_of = {expert: i for i, expert in enumerate(self.expert_ids)}

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights (gate, up and down)."""
        return (self.w13_eGD[0].numel() + self.w2_eDF[0].numel()) * self.w13_eGD.element_size() if len(self.expert_ids) else 0

    def forward(self, x_ND: torch.Tensor, ids_NK: torch.Tensor, mine_NK: torch.Tensor | None = None,
                out_NKD: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Each selected expert's output per (token, k) pair, y_NKD; pairs not in `mine_NK` stay zero.

        Returns y_NKD and the number of distinct experts evaluated. Raises if a needed expert is not held.
        Keeping pairs apart (not yet weighted and summed) lets every rank combine them in the same order,
        so the result is bit-identical for any number of ranks and any placement. `out_NKD` (zeros) is
        written instead of a new tensor when given.
        """
        N, K = ids_NK.shape
        y_NKD = x_ND.new_zeros(N, K, x_ND.shape[1]) if out_NKD is None else out_NKD
        if N == 1:  # decode, one token: mat-vecs over its selected experts, no grouping
            return self._forward_single(x_ND[0], ids_NK[0].tolist(), mine_NK, y_NKD[0])
        flat_ids = ids_NK.reshape(-1)
        pair_order = torch.argsort(flat_ids, stable=True)
        if mine_NK is not None:
            pair_order = pair_order[mine_NK.reshape(-1)[pair_order]]
        experts, counts = torch.unique_consecutive(flat_ids[pair_order], return_counts=True)
        if N <= SMALL_ROWS and self.w13_eGD.dtype == torch.bfloat16 and x_ND.is_contiguous() \
                and y_NKD.is_contiguous() and kernels.moe_gemv_available():
            return self._forward_batched(x_ND, y_NKD, pair_order.tolist(), experts.tolist(), counts.tolist())
        y_PD = y_NKD.view(N * K, -1)
        start = 0
        for expert, count in zip(experts.tolist(), counts.tolist()):
            pairs = pair_order[start:start + count]
            start += count
            y_PD[pairs] = self._expert(self._local(expert), x_ND[pairs // K])
        return y_NKD, len(experts)

    def _forward_single(self, x_D, ids: list[int], mine_1K, y_KD) -> tuple[torch.Tensor, int]:
        mine = [True] * len(ids) if mine_1K is None else mine_1K[0].tolist()
        if self.w13_eGD.dtype == torch.bfloat16 and y_KD.is_contiguous() and kernels.moe_gemv_available():
            ks = [k for k in range(len(ids)) if mine[k]]  # pairs (0, k): one each per selected expert
            return self._forward_batched(x_D[None], y_KD[None], ks, [ids[k] for k in ks], [1] * len(ks))
        evaluated = 0
        for k, expert in enumerate(ids):
            if mine[k]:
                i = self._local(expert)
                gate_F, up_F = torch.mv(self.w13_eGD[i], x_D).chunk(2)
                torch.mv(self.w2_eDF[i], F.silu(gate_F) * up_F, out=y_KD[k])
                evaluated += 1
        return y_KD[None], evaluated

    def _forward_batched(self, x_ND, y_NKD, pairs: list[int], experts: list[int],
                         counts: list[int]) -> tuple[torch.Tensor, int]:
        """Few tokens: every expert's weights read once for all its pairs (`pairs` = flat (token, k)
        indices grouped by expert, `counts` per expert), in two kernel calls for the whole layer; a
        pair gets the same bits whatever else is in the batch."""
        K, D = y_NKD.shape[1], y_NKD.shape[2]
        local = [self._local(e) for e in experts]
        P = len(pairs)
        if not P:
            return y_NKD, 0
        h_PG = kernels.moe_gemm(self.w13_eGD, local, counts, x_ND, [p // K for p in pairs],
                                x_ND.new_empty(P, self.w13_eGD.shape[1]), list(range(P)))
        gate_PF, up_PF = h_PG.chunk(2, dim=-1)
        kernels.moe_gemm(self.w2_eDF, local, counts, F.silu(gate_PF) * up_PF, list(range(P)),
                         y_NKD.view(-1, D), pairs)
        return y_NKD, len(experts)

    def _local(self, expert: int) -> int:
        i = self._local_of.get(expert)
        if i is None:
            raise MoeClusterError(f"internal: expert {expert} was assigned here but is not held by this process")
        return i

    def _expert(self, i: int, x_nD: torch.Tensor) -> torch.Tensor:
        if x_nD.shape[0] <= SMALL_ROWS:  # few rows: stay in column form, w @ x.T, no transposed copies
            gate_Fn, up_Fn = torch.mm(self.w13_eGD[i], x_nD.t()).chunk(2)
            return torch.mm(self.w2_eDF[i], F.silu(gate_Fn).mul_(up_Fn)).t()
        gate_nF, up_nF = F.linear(x_nD, self.w13_eGD[i]).chunk(2, dim=-1)
        return F.linear(F.silu(gate_nF) * up_nF, self.w2_eDF[i])


def combine(y_NKD: torch.Tensor, weights_NK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out_ND = sum_k weights_NK * y_NKD, accumulated in fp32 in a fixed order, cast to the model dtype."""
    return (y_NKD.float() * weights_NK[..., None]).sum(dim=1).to(dtype)


class MoEBlock(nn.Module):
    """Router + grouped experts on one device. Expert parallelism replaces this module (see parallel/)."""

    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.router = Router(args)
        self.experts = GroupedExperts(args, list(range(args.num_experts)), device="meta")
        self.last_num_evaluated = 0
        self.recorder = None  # routing statistics (moecluster profile-routing): .record(layer, ids_TK)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        t0 = now()
        ids_NK, weights_NK = self.router(x_ND)
        if self.recorder is not None:
            self.recorder.record(self.layer_id, ids_NK.tolist())
        t1 = now()
        y_NKD, self.last_num_evaluated = self.experts(x_ND, ids_NK)
        out_ND = combine(y_NKD, weights_NK, x_ND.dtype)
        TRACER.add(self.layer_id, "router", t1 - t0)
        TRACER.add(self.layer_id, "experts", now() - t1)
        TRACER.count_evals(self.layer_id, self.last_num_evaluated)
        return out_ND


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.attn_norm = make_norm(args)
        self.attn = Attention(args)
        self.moe_norm = make_norm(args)
        self.moe: nn.Module = MoEBlock(args, layer_id)

    def forward(self, x_BTD, cos, sin, mask, rows: CacheRows) -> torch.Tensor:
        t0 = now()
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, mask, rows)
        TRACER.add(self.layer_id, "attention", now() - t0)
        B, T, D = h_BTD.shape
        return h_BTD + self.moe(self.moe_norm(h_BTD).reshape(B * T, D)).view(B, T, D)


class MoETransformer(nn.Module):
    """The single-device decoder: embeddings, layers (attention + MoE), final norm, lm_head."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.n_layers))
        self.norm = make_norm(args)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.num_slots = 0
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def setup_cache(self, num_slots: int, max_seq_len: int | None = None) -> None:
        """Preallocate the KV cache for `num_slots` concurrent sequences of up to max_seq_len positions."""
        a = self.args
        seq = min(max_seq_len or a.max_seq_len, a.max_seq_len)
        dtype = self.embed.weight.dtype
        for layer in self.layers:
            layer.attn.cache = KVCache(num_slots, a.n_kv_heads, seq, a.head_dim, dtype)
        self.num_slots, self.cache_len = num_slots, seq
        self.rope_cos, self.rope_sin = rope_tables(a.head_dim, seq, a.rope_theta, dtype)

    def forward(self, tokens_BT: torch.Tensor, pos_B: torch.Tensor, slots_B: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits for tokens_BT, row b starting at position pos_B[b] in cache slot slots_B[b].

        Returns fp32 logits_BTV (or logits_B1V with last_only)."""
        B, T = tokens_BT.shape
        if slots_B is None:
            slots_B = torch.arange(B)
        span = int(pos_B.max()) + T
        if self.rope_cos is None or span > self.cache_len:
            raise MoeClusterError(f"sequence of {span} positions exceeds the cache of {getattr(self, 'cache_len', 0)}")
        positions_BT = pos_B[:, None] + torch.arange(T)[None, :]
        cos, sin = self.rope_cos[positions_BT], self.rope_sin[positions_BT]
        mask_B1TS = torch.arange(span)[None, None, None, :] <= positions_BT[:, None, :, None]
        x_BTD = self.embed(tokens_BT)
        rows = CacheRows.of(slots_B, pos_B)
        for layer in self.layers:
            x_BTD = layer(x_BTD, cos, sin, mask_B1TS, rows)
        t0 = now()
        if last_only:
            x_BTD = x_BTD[:, -1:]
        logits = linear(self.norm(x_BTD), self.lm_head.weight).float()
        TRACER.add(-1, "head", now() - t0)
        return logits


def check_dims(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise MoeClusterError(f"checkpoint tensor {name} has shape {list(shape)}, config implies {list(expected)}; "
                              "config.json and the weights disagree")
