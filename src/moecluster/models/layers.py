"""Primitives the architecture files compose, each configured by plain constructor arguments (never a
config object): linear, norms, rotary embeddings, the slot KV cache, grouped-query attention, the gated
MLP, and the decoder skeleton (embeddings -> blocks -> norm -> lm_head) with its cache bookkeeping.

Plain torch only: compiled kernels, tracing and expert parallelism are transformations applied to a
loaded model (kernels/, tracing.py, parallel/).

Shape legend: B batch rows (cache slots in use), T tokens per row, N = B*T flattened tokens,
D model dim, F hidden dim, G = 2F (gate and up stacked), H query heads, Hk kv heads, Hd head dim,
S cached positions, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models import invariance

if TYPE_CHECKING:
    from moecluster.models.moe import MoE

# gemm(x, weight_OI, bias_O or None) -> x @ weight.T + bias: F.linear's signature
Gemm = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]
# rope(max_seq_len, dtype) -> (cos_SR, sin_SR)
RopeTables = Callable[[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]]


class Linear(nn.Linear):
    """nn.Linear whose product function can be swapped after loading (kernels.apply_kernels)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.gemm: Gemm = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the HF Llama family does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        # a transformation may set a compiled path: (self, x) -> the normed x, or None where it does not apply
        self.kernel: Callable[[RMSNorm, torch.Tensor], torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None and (out := self.kernel(self, x)) is not None:
            return out
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def layer_norm(dim: int, eps: float = 1e-5) -> nn.Module:
    """LayerNorm without bias (DBRX)."""
    return nn.LayerNorm(dim, eps=eps, bias=False)


def rope_tables(
    head_dim: int,
    max_seq_len: int,
    theta: float,
    dtype: torch.dtype,
    *,
    inv_freq: torch.Tensor | None = None,
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SHd, sin_SHd for positions 0..S-1 (computed in fp32, stored in the model dtype like HF).
    inv_freq: the Hd/2 frequencies (default: theta ** (-2i / Hd)); scale multiplies cos and sin (YaRN's
    attention factor, as transformers applies it)."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(
    dim: int,
    theta: float,
    factor: float,
    original_max_len: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    truncate: bool = True,
) -> torch.Tensor:
    """YaRN inverse frequencies [dim/2] (transformers' _compute_yarn_parameters): high-frequency dims (more
    than beta_fast rotations over original_max_len) keep theta's frequency, low-frequency ones (fewer than
    beta_slow) are divided by `factor`, with a linear ramp between."""

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp  # weight of the unscaled frequency
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def apply_rope(x_BHTHd: torch.Tensor, cos_BTHd: torch.Tensor, sin_BTHd: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE (the HF convention: first half pairs with second half). Tables narrower than the
    head (partial rotary, R = rotary dim < Hd) rotate the first R dims of each head and pass the rest."""
    rotary = cos_BTHd.shape[-1]
    if rotary < x_BHTHd.shape[-1]:
        return torch.cat((apply_rope(x_BHTHd[..., :rotary], cos_BTHd, sin_BTHd), x_BHTHd[..., rotary:]), dim=-1)
    half = x_BHTHd.shape[-1] // 2
    rotated = torch.cat((-x_BHTHd[..., half:], x_BHTHd[..., :half]), dim=-1)
    return x_BHTHd * cos_BTHd[:, None] + rotated * sin_BTHd[:, None]


class CacheRows(NamedTuple):
    """Which cache slot and start position each batch row uses, computed once per forward."""

    slots: list[int]
    pos: list[int]
    index: slice | torch.Tensor  # a slice (a view, no copy) when the slots are consecutive
    slots_t: torch.Tensor
    pos_t: torch.Tensor

    @classmethod
    def of(cls, slots_B: torch.Tensor, pos_B: torch.Tensor) -> CacheRows:
        slots = slots_B.tolist()
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        return cls(
            slots,
            pos_B.tolist(),
            slice(slots[0], slots[0] + len(slots)) if consecutive else slots_B,
            slots_B.long(),
            pos_B.long(),
        )


class Step(NamedTuple):
    """What every attention layer needs about the current forward (built once per forward)."""

    rows: CacheRows
    cos_BTHd: torch.Tensor
    sin_BTHd: torch.Tensor
    mask_B1TS: torch.Tensor | None  # None: one row, one new token (attends to every cached position)
    span: int  # cached positions the batch attends to


class KVCache(nn.Module):
    """Preallocated per-layer cache with one row per slot; a sequence owns a slot for its lifetime."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(self, num_slots: int, n_kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        shape = (num_slots, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self, rows: CacheRows, k_BHkTHd: torch.Tensor, v_BHkTHd: torch.Tensor, span: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new keys/values at each row's positions; return the first `span` cached positions."""
        num_tokens = k_BHkTHd.shape[2]
        if num_tokens == 1 and len(rows.slots) > 1:  # batched decode: one scatter per tensor
            self.k[rows.slots_t, :, rows.pos_t] = k_BHkTHd[:, :, 0]
            self.v[rows.slots_t, :, rows.pos_t] = v_BHkTHd[:, :, 0]
            return self.k[rows.index, :, :span], self.v[rows.index, :, :span]
        for b, (slot, pos) in enumerate(zip(rows.slots, rows.pos, strict=True)):
            self.k[slot, :, pos : pos + num_tokens] = k_BHkTHd[b]
            self.v[slot, :, pos : pos + num_tokens] = v_BHkTHd[b]
        return self.k[rows.index, :, :span], self.v[rows.index, :, :span]


class SlidingKVCache(nn.Module):
    """Per-layer cache of a sliding-window attention layer: a ring of `size` positions per slot (position p at
    index p % size), enough for a window of `size` keys (a query at q sees keys q-size+1..q).

    update() returns the ring as it was before this forward (the keys the new queries may still see), the new
    keys after it, and the mask of which of those each query sees; only then is the ring overwritten."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(self, num_slots: int, n_kv_heads: int, size: int, head_dim: int, dtype: torch.dtype):
        super().__init__()
        self.size = size
        shape = (num_slots, n_kv_heads, size, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(
        self, rows: CacheRows, k_BHkTHd: torch.Tensor, v_BHkTHd: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_BHkSHd, v_BHkSHd, mask_B1TS) with S = size + T: ring keys first, then the T new ones."""
        T, R = k_BHkTHd.shape[2], self.size
        k_all = torch.cat((self.k[rows.index], k_BHkTHd), dim=2)  # a copy: the ring can be overwritten below
        v_all = torch.cat((self.v[rows.index], v_BHkTHd), dim=2)
        last_B1 = rows.pos_t[:, None] - 1  # each row's last cached position
        ring_pos_BR = last_B1 - (last_B1 - torch.arange(R)[None, :]).remainder(R)  # < 0: never written
        q_pos_BT = rows.pos_t[:, None] + torch.arange(T)[None, :]
        k_pos_BS = torch.cat((ring_pos_BR, q_pos_BT), dim=1)[:, None, :]
        mask_BTS = (k_pos_BS >= 0) & (k_pos_BS <= q_pos_BT[..., None]) & (k_pos_BS > q_pos_BT[..., None] - window)
        if T == 1 and len(rows.slots) > 1:  # batched decode: one scatter per tensor
            self.k[rows.slots_t, :, rows.pos_t % R] = k_BHkTHd[:, :, 0]
            self.v[rows.slots_t, :, rows.pos_t % R] = v_BHkTHd[:, :, 0]
        else:
            keep = min(T, R)  # a prefill longer than the ring keeps its last R positions
            for b, (slot, pos) in enumerate(zip(rows.slots, rows.pos, strict=True)):
                idx = torch.arange(pos + T - keep, pos + T) % R
                self.k[slot, :, idx] = k_BHkTHd[b, :, T - keep :]
                self.v[slot, :, idx] = v_BHkTHd[b, :, T - keep :]
        return k_all, v_all, mask_BTS[:, None]


def sink_attention(
    q_BHTHd: torch.Tensor,
    k_BHkSHd: torch.Tensor,
    v_BHkSHd: torch.Tensor,
    sinks_H: torch.Tensor,
    mask_B1TS: torch.Tensor | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Grouped-query attention with attention sinks (gpt-oss): a learned logit per head joins each softmax's
    denominator (and no value), so a query may attend to "nothing". SDPA takes no sinks, hence explicit.
    mask_B1TS: True where a query sees a key (None: every key). Softmax in fp32. -> out_BHTHd."""
    B, H, T, Hd = q_BHTHd.shape
    Hk, S = k_BHkSHd.shape[1], k_BHkSHd.shape[2]
    G = H // Hk  # query heads per kv head: heads g*G..g*G+G-1 read kv head g, without repeating k and v
    scores = q_BHTHd.reshape(B, Hk, G * T, Hd) @ k_BHkSHd.transpose(-1, -2)
    scores_BHTS = scores.view(B, H, T, S).float() * (Hd**-0.5 if scale is None else scale)
    if mask_B1TS is not None:
        scores_BHTS = scores_BHTS.masked_fill(~mask_B1TS, float("-inf"))
    sinks_BHT1 = sinks_H.float().view(1, H, 1, 1).expand(B, H, T, 1)
    probs_BHTS = torch.softmax(torch.cat((scores_BHTS, sinks_BHT1), dim=-1), dim=-1)[..., :S]
    out = probs_BHTS.to(v_BHkSHd.dtype).reshape(B, Hk, G * T, S) @ v_BHkSHd
    return out.view(B, H, T, Hd)


class Attention(nn.Module):
    """Grouped-query attention with a fused qkv projection (the loader concatenates q, k, v) and a slot cache.

    qk_norm: None; "head" (RMSNorm over each head's Hd, Qwen3); "full" (RMSNorm over the whole q / k
    projection, OLMoE). clip_qkv clamps q, k, v (DBRX, OLMoE: after the q/k norm)."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool = False,
        qk_norm: str | None = None,
        norm_eps: float = 1e-6,
        clip_qkv: float | None = None,
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.clip_qkv = clip_qkv
        self.wqkv = Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.wo = Linear(n_heads * head_dim, dim)
        self.qk_norm = qk_norm
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, norm_eps), RMSNorm(head_dim, norm_eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(n_heads * head_dim, norm_eps), RMSNorm(n_kv_heads * head_dim, norm_eps)
        elif qk_norm is not None:
            raise ValueError(f"qk_norm {qk_norm!r}")
        self.cache: KVCache | None = None
        # a transformation may set a compiled decode path (one new token per row, after wqkv):
        # (self, qkv_BX, step) -> attention output [B, H * Hd], or None where it does not apply
        self.decode_kernel: Callable[..., torch.Tensor | None] | None = None

    def make_cache(self, num_slots: int, max_seq_len: int, dtype: torch.dtype) -> None:
        self.cache = KVCache(num_slots, self.n_kv_heads, max_seq_len, self.head_dim, dtype)

    def forward(self, x_BTD: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, Hk, Hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv(x_BTD)
        if T == 1 and self.decode_kernel is not None:
            out = self.decode_kernel(self, qkv.view(B, -1), step)
            if out is not None:
                return self.wo(out.view(B, 1, H * Hd))
        if self.clip_qkv is not None and self.qk_norm is None:
            qkv = qkv.clamp(-self.clip_qkv, self.clip_qkv)
        qk, v = qkv.split([(H + Hk) * Hd, Hk * Hd], dim=-1)
        if self.qk_norm is not None:
            q, k = qk.split([H * Hd, Hk * Hd], dim=-1)
            if self.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q, k = self.q_norm(q.view(B, T, H, Hd)), self.k_norm(k.view(B, T, Hk, Hd))
            qk = torch.cat((q.reshape(B, T, H * Hd), k.reshape(B, T, Hk * Hd)), dim=-1)
            if self.clip_qkv is not None:  # OLMoE clips after the norm
                qk, v = qk.clamp(-self.clip_qkv, self.clip_qkv), v.clamp(-self.clip_qkv, self.clip_qkv)
        # query and key heads rotated in one pass (fewer small ops on the decode path)
        qk = qk.view(B, T, H + Hk, Hd).transpose(1, 2)
        q, k = apply_rope(qk, step.cos_BTHd, step.sin_BTHd).split([H, Hk], dim=1)
        v = v.reshape(B, T, Hk, Hd).transpose(1, 2)
        if self.cache is None:
            raise MoeClusterError("internal: call model.setup_cache() before forward")
        if T == 1 and B > 1 and invariance.ENABLED and isinstance(self.cache, KVCache):  # batch-invariant rows
            self.cache.update(step.rows, k, v, span=0)
            out = decode_rows_attention(q, self.cache, step.rows)
        else:
            k, v = self.cache.update(step.rows, k, v, span=step.span)
            if T == 1 and step.mask_B1TS is None:  # one row, one new token: every cached position
                out = decode_attention(q, k, v)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask_B1TS, enable_gqa=H != Hk)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * Hd))


def decode_attention(
    q_1H1Hd: torch.Tensor, k_1HkSHd: torch.Tensor, v_1HkSHv: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Attention of one new token over every cached position (no mask), in fp32 like SDPA's flash kernel: two
    batched products and a softmax, the query heads of one kv head as one matrix (no repeated k, v). SDPA's
    CPU kernel is slow for a single query: 0.1 / 0.8 / 1.9 ms against 0.04 / 0.08 / 0.2 ms here for 20 / 200 /
    500 cached positions (32 heads of 128, 4 kv heads, bf16, 2 threads). scale: default Hd^-0.5.
    -> out_1H1Hv in q's dtype."""
    H, Hd = q_1H1Hd.shape[1], q_1H1Hd.shape[-1]
    Hk, Hv = k_1HkSHd.shape[1], v_1HkSHv.shape[-1]
    q_HkGHd = q_1H1Hd.reshape(Hk, H // Hk, Hd).float()
    scores_HkGS = torch.bmm(q_HkGHd, k_1HkSHd[0].float().transpose(1, 2)).mul_(Hd**-0.5 if scale is None else scale)
    # rounded as SDPA's flash kernel rounds (so bf16 greedy text matches transformers'): unnormalized exp(s - max)
    # in fp32, cast to the model dtype for the product with v (fp32 accumulation), divided by the fp32 sum last
    exp_HkGS = (scores_HkGS - scores_HkGS.amax(dim=-1, keepdim=True)).exp_()
    total_HkG1 = exp_HkGS.sum(dim=-1, keepdim=True)
    out_HkGHv = torch.bmm(exp_HkGS.to(q_1H1Hd.dtype).float(), v_1HkSHv[0].float()).div_(total_HkG1)
    return out_HkGHv.view(1, H, 1, Hv).to(q_1H1Hd.dtype)


def decode_rows_attention(q_BH1Hd: torch.Tensor, cache: KVCache, rows: CacheRows) -> torch.Tensor:
    """Batched decode attention, one decode_attention per row over exactly its own cached positions: the call
    a row makes when it decodes alone (B = 1, no mask), so its bits do not depend on the rest of the batch
    (a masked attention over the batch's longest span rounds differently). -> out_BH1Hd."""
    return torch.cat(
        [
            decode_attention(
                q_BH1Hd[b : b + 1], cache.k[slot : slot + 1, :, : pos + 1], cache.v[slot : slot + 1, :, : pos + 1]
            )
            for b, (slot, pos) in enumerate(zip(rows.slots, rows.pos, strict=True))
        ]
    )


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up stacked in one weight w13 [G = 2F, D] (dense layers,
    shared experts)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = Linear(dim, 2 * hidden)
        self.w2 = Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class DecoderModel(nn.Module):
    """The skeleton every architecture shares: embed -> blocks -> norm -> lm_head, the KV caches and the
    per-forward bookkeeping (positions, RoPE rows, mask). Each block is `block(x_BTD, step) -> x_BTD`
    and has `.attn` (an Attention) and `.mlp` (a dense MLP or an MoE). rotary_dim (default head_dim):
    RoPE on the first rotary_dim dims of each head only (partial rotary, GLM-4.5). rope(S, dtype) -> (cos_SR,
    sin_SR): tables other than plain RoPE (YaRN, DeepSeek), built when the cache is set up."""

    layers: Any  # nn.ModuleList of blocks (each with .attn and .mlp)
    lm_head: Any  # a Linear, or a transformation's wrapper of one

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        blocks: list[nn.Module],
        norm: nn.Module,
        *,
        head_dim: int,
        rope_theta: float,
        max_seq_len: int,
        tie_embeddings: bool = False,
        rotary_dim: int | None = None,
        rope: RopeTables | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(blocks)
        self.norm = norm
        self.lm_head = Linear(dim, vocab_size)
        self.head_dim, self.rope_theta, self.max_seq_len = head_dim, rope_theta, max_seq_len
        self.rotary_dim = head_dim if rotary_dim is None else rotary_dim
        self.tie_embeddings = tie_embeddings
        self.rope = rope
        self.num_slots = self.cache_len = 0
        self.rope_cos: torch.Tensor | None = None
        self.rope_sin: torch.Tensor | None = None

    def moe_layers(self) -> list[MoE]:
        """The MoE modules, in layer order (the contract with loading, parallelism, metrics, placement)."""
        from moecluster.models.moe import MoE

        return [block.mlp for block in self.layers if isinstance(block.mlp, MoE)]

    def setup_cache(self, num_slots: int, max_seq_len: int | None = None) -> None:
        """Preallocate the KV cache for `num_slots` concurrent sequences of up to max_seq_len positions."""
        seq = min(max_seq_len or self.max_seq_len, self.max_seq_len)
        dtype = self.embed.weight.dtype
        for block in self.layers:
            block.attn.make_cache(num_slots, seq, dtype)
        self.num_slots, self.cache_len = num_slots, seq
        self.rope_cos, self.rope_sin = (
            rope_tables(self.rotary_dim, seq, self.rope_theta, dtype) if self.rope is None else self.rope(seq, dtype)
        )

    def forward(
        self, tokens_BT: torch.Tensor, pos_B: torch.Tensor, slots_B: torch.Tensor | None = None, last_only: bool = False
    ) -> torch.Tensor:
        """fp32 logits_BTV for tokens_BT (or logits_B1V with last_only), row b starting at position
        pos_B[b] in cache slot slots_B[b]."""
        B, T = tokens_BT.shape
        if slots_B is None:
            slots_B = torch.arange(B)
        span = int(pos_B.max()) + T
        if self.rope_cos is None or self.rope_sin is None or span > self.cache_len:
            raise MoeClusterError(f"sequence of {span} positions exceeds the cache of {self.cache_len}")
        positions_BT = pos_B[:, None] + torch.arange(T)[None, :]
        # one row, one new token: it attends to every cached position, so no mask (SDPA's fast path)
        mask = None if B == 1 and T == 1 else torch.arange(span)[None, None, None, :] <= positions_BT[:, None, :, None]
        step = Step(CacheRows.of(slots_B, pos_B), self.rope_cos[positions_BT], self.rope_sin[positions_BT], mask, span)
        x_BTD = self.embed(tokens_BT)
        for block in self.layers:
            x_BTD = block(x_BTD, step)
        if last_only:
            x_BTD = x_BTD[:, -1:]
        return self.lm_head(self.norm(x_BTD)).float()


class PreNormBlock(nn.Module):
    """x + attn(attn_norm(x)), then + mlp(mlp_norm(x)); the MLP sees flattened tokens x_ND."""

    attn: Any  # an Attention, or a transformation's wrapper of one
    mlp: Any

    def __init__(self, attn_norm: nn.Module, attn: nn.Module, mlp_norm: nn.Module, mlp: nn.Module):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x_BTD: torch.Tensor, step: Step) -> torch.Tensor:
        h_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), step)
        B, T, D = h_BTD.shape
        return h_BTD + self.mlp(self.mlp_norm(h_BTD).reshape(B * T, D)).view(B, T, D)


def check_dims(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(expected):
        raise MoeClusterError(
            f"checkpoint tensor {name} has shape {list(shape)}, config implies {list(expected)}; "
            "config.json and the weights disagree"
        )
