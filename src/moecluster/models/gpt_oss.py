"""gpt-oss, beside transformers' modeling_gpt_oss.py: RMSNorm, grouped-query attention with q/k/v/o biases and
a learned per-head sink logit in every softmax (layers.sink_attention), `layer_types` alternating sliding-window
layers (a ring cache of `sliding_window` positions, layers.SlidingKVCache) and full layers, YaRN RoPE; every
layer an MoE: a router with a bias, top-k of the logits then softmax over those k (topk_softmax), experts with
biases and the clamped SwiGLU (moe.clamped_swiglu: alpha `swiglu_alpha`, limit `swiglu_limit`).

Experts on disk (bf16/fp32, as transformers 5.23 saves them), fused per layer, x @ W layout:
`mlp.experts.gate_up_proj` [E, D, 2F] with gate and up interleaved in the last dim (gate = [..., ::2],
up = [..., 1::2]), `gate_up_proj_bias` [E, 2F] (interleaved alike), `down_proj` [E, F, D], `down_proj_bias`
[E, D]. read_expert slices one expert (row e of dim 0), de-interleaves into our w13_GD (gate rows, then up rows)
and transposes into our [out, in] layout.

MXFP4 (the Hub's gpt-oss checkpoints, `quantization_config` {"quant_method": "mxfp4", "modules_to_not_convert":
[attention, router, embeddings, lm_head]}): `gate_up_proj_blocks` [E, 2F, D/32, 16] uint8 + `gate_up_proj_scales`
[E, 2F, D/32] e8m0 and `down_proj_blocks` [E, D, F/32, 16] + `down_proj_scales` [E, D, F/32] are already
[out, in] (the 32-groups run along the input), so one expert is again row e of dim 0 and the de-interleave is a
permutation of the 2F output rows (gate_up_rows) that applies unchanged to blocks and scales, without
dequantizing. expert_weights lists these names when the config says mxfp4; read_expert_mxfp4 returns one
expert's permuted blocks and scales for the loader's quant.QuantizedStack (the biases stay in the compute dtype).

Shape legend: D model dim, F expert hidden dim, G = 2F, E experts, K top-k, H heads, Hk kv heads, Hd head dim,
S cached positions, T new tokens, B batch rows.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.configs import GptOssConfig
from moecluster.models.hub import DenseMap, ExpertOut, ReadRows, embed_norm_head, hf_attention
from moecluster.models.invariance import rowwise
from moecluster.models.layers import (
    Attention,
    DecoderModel,
    Linear,
    PreNormBlock,
    RMSNorm,
    SlidingKVCache,
    Step,
    apply_rope,
    rope_tables,
    sink_attention,
    yarn_inv_freq,
    yarn_mscale,
)
from moecluster.models.moe import MoE, RoutedExperts, Router, clamped_swiglu, topk_softmax


def yarn_rope_tables(
    head_dim: int, max_seq_len: int, rope: dict, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SHd, sin_SHd with YaRN frequencies and attention factor (transformers' _compute_yarn_parameters),
    from the shared YaRN primitives in layers.py."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else yarn_mscale(factor)
        )
    inv_freq = yarn_inv_freq(
        head_dim,
        base,
        factor,
        int(rope["original_max_position_embeddings"]),
        float(rope.get("beta_fast") or 32),
        float(rope.get("beta_slow") or 1),
        truncate=bool(rope.get("truncate", True)),
    )
    return rope_tables(head_dim, max_seq_len, base, dtype, inv_freq=inv_freq, scale=float(attention_factor))


class GptOssAttention(Attention):
    """Attention with q/k/v/o biases and sinks; `sliding_window` None: full attention over the slot cache,
    else a ring cache of the window only."""

    def __init__(
        self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, *, bias: bool, sliding_window: int | None
    ):
        super().__init__(dim, n_heads, n_kv_heads, head_dim, qkv_bias=bias)
        self.wo = Linear(n_heads * head_dim, dim, bias=bias)
        self.sinks = nn.Parameter(torch.empty(n_heads))
        self.sliding_window = sliding_window
        self.ring: SlidingKVCache | None = None

    def make_cache(self, num_slots: int, max_seq_len: int, dtype: torch.dtype) -> None:
        if self.sliding_window is None:
            super().make_cache(num_slots, max_seq_len, dtype)
        else:  # a window longer than the cache: the ring holds every position the cache can
            self.ring = SlidingKVCache(
                num_slots, self.n_kv_heads, min(self.sliding_window, max_seq_len), self.head_dim, dtype
            )

    def forward(self, x_BTD: torch.Tensor, step: Step) -> torch.Tensor:
        if (out := rowwise(self.forward, x_BTD, step)) is not None:  # batched decode: each row as if alone
            return out
        B, T, _ = x_BTD.shape
        H, Hk, Hd = self.n_heads, self.n_kv_heads, self.head_dim
        qk, v = self.wqkv(x_BTD).split([(H + Hk) * Hd, Hk * Hd], dim=-1)
        qk = qk.view(B, T, H + Hk, Hd).transpose(1, 2)
        q, k = apply_rope(qk, step.cos_BTHd, step.sin_BTHd).split([H, Hk], dim=1)
        v = v.reshape(B, T, Hk, Hd).transpose(1, 2)
        if self.sliding_window is not None and self.ring is not None:
            k, v, mask = self.ring.update(step.rows, k, v, self.sliding_window)
        elif self.cache is not None:
            k, v = self.cache.update(step.rows, k, v, span=step.span)
            mask = step.mask_B1TS
        else:
            raise MoeClusterError("internal: call model.setup_cache() before forward")
        out = sink_attention(q, k, v, self.sinks, mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, H * Hd))


class GptOssForCausalLM(DecoderModel):
    def __init__(self, cfg: GptOssConfig):
        D, E, eps = cfg.hidden_size, cfg.routed_experts, cfg.rms_norm_eps
        score = partial(topk_softmax, k=cfg.num_experts_per_tok)
        act = partial(clamped_swiglu, alpha=float(cfg.swiglu_alpha), limit=float(cfg.swiglu_limit))
        sliding = cfg.sliding_layers

        def block(i: int) -> PreNormBlock:
            attn = GptOssAttention(
                D,
                cfg.num_attention_heads,
                cfg.kv_heads,
                cfg.dim_per_head,
                bias=cfg.attention_bias,
                sliding_window=cfg.sliding_window if sliding[i] else None,
            )
            experts = RoutedExperts(E, D, cfg.expert_hidden, list(range(E)), device="meta", bias=True, activation=act)
            return PreNormBlock(RMSNorm(D, eps), attn, RMSNorm(D, eps), MoE(Router(D, E, score, bias=True), experts))

        rope = cfg.rope
        yarn = partial(yarn_rope_tables, cfg.dim_per_head, rope=rope) if rope["rope_type"] == "yarn" else None
        super().__init__(
            cfg.vocab_size,
            D,
            [block(i) for i in range(cfg.num_hidden_layers)],
            RMSNorm(D, eps),
            head_dim=cfg.dim_per_head,
            rope_theta=cfg.rope_base,
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_word_embeddings,
            rope=None if yarn is None else lambda seq, dtype: yarn(seq, dtype=dtype),
        )


def dense_weights(cfg: GptOssConfig) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D, E, H = cfg.hidden_size, cfg.routed_experts, cfg.num_attention_heads
    out = embed_norm_head(cfg.vocab_size, D, cfg.tie_word_embeddings)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out |= hf_attention(
            f"layers.{i}.attn", f"{p}.self_attn", D, H, cfg.kv_heads, cfg.dim_per_head, bias=cfg.attention_bias
        )
        out[f"layers.{i}.attn.sinks"] = ([f"{p}.self_attn.sinks"], (H,))
        if cfg.attention_bias:
            out[f"layers.{i}.attn.wo.bias"] = ([f"{p}.self_attn.o_proj.bias"], (D,))
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
            f"layers.{i}.mlp.router.gate.weight": ([f"{p}.mlp.router.weight"], (E, D)),
            f"layers.{i}.mlp.router.gate.bias": ([f"{p}.mlp.router.bias"], (E,)),
        }
    return out


def is_mxfp4(cfg: GptOssConfig) -> bool:
    """The checkpoint ships its experts in MXFP4 (as the Hub's); any other quantization: one clear error."""
    if not cfg.quantization_config:
        return False
    method = str(cfg.quantization_config.get("quant_method", "?")).lower()
    if method != "mxfp4":
        raise MoeClusterError(
            f"this gpt-oss checkpoint is quantized ({method}); the engine reads gpt-oss as "
            "the Hub ships it (mxfp4) or unquantized (bf16/fp32)"
        )
    D, F = cfg.hidden_size, cfg.expert_hidden
    if D % 32 or F % 32:
        raise MoeClusterError(
            f"mxfp4 experts need hidden_size and intermediate_size to be multiples of 32 "
            f"(groups of 32 inputs); this config has {D} and {F}"
        )
    return True


def expert_weights(cfg: GptOssConfig, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensors of one MoE layer with their shapes (fused over experts)."""
    E, D, F = cfg.routed_experts, cfg.hidden_size, cfg.expert_hidden
    p = f"model.layers.{layer}.mlp.experts"
    biases = {f"{p}.gate_up_proj_bias": (E, 2 * F), f"{p}.down_proj_bias": (E, D)}
    if is_mxfp4(cfg):
        return biases | {
            f"{p}.gate_up_proj_blocks": (E, 2 * F, D // 32, 16),
            f"{p}.gate_up_proj_scales": (E, 2 * F, D // 32),
            f"{p}.down_proj_blocks": (E, D, F // 32, 16),
            f"{p}.down_proj_scales": (E, D, F // 32),
        }
    return biases | {f"{p}.gate_up_proj": (E, D, 2 * F), f"{p}.down_proj": (E, F, D)}


# ((blocks13, scales13), (blocks2, scales2)) views of one expert's slots in the mxfp4 stacks
Mxfp4Out = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None


def gate_up_rows(hidden: int) -> torch.Tensor:
    """The interleaved gate/up index of each of our w13 rows: gate rows (even), then up rows (odd)."""
    return torch.cat((torch.arange(0, 2 * hidden, 2), torch.arange(1, 2 * hidden, 2)))


def _read_biases(read_rows: ReadRows, cfg: GptOssConfig, layer: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    p = f"model.layers.{layer}.mlp.experts"
    b13_G = read_rows(f"{p}.gate_up_proj_bias", e, e + 1)[0][gate_up_rows(cfg.expert_hidden)]
    return b13_G, read_rows(f"{p}.down_proj_bias", e, e + 1)[0]


def _deinterleaved(w13_G: torch.Tensor) -> torch.Tensor:
    """A view [F, 2, ...] of our w13 rows (gate rows, then up rows) indexed as the checkpoint's interleaved rows
    2g + k: reading the interleaved rows into it de-interleaves them in place."""
    return w13_G.view(2, w13_G.shape[0] // 2, *w13_G.shape[1:]).transpose(0, 1)


def read_expert(
    read_rows: ReadRows, cfg: GptOssConfig, layer: int, expert: int, out: ExpertOut = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF, b13_G, b2_D) from a bf16/fp32 checkpoint (weights into `out` when given:
    on disk gate_up is [E, D, 2F interleaved] and down [E, F, D], so they land in transposed views)."""
    if is_mxfp4(cfg):
        raise MoeClusterError("internal: an mxfp4 gpt-oss checkpoint is read by read_expert_mxfp4")
    p, e = f"model.layers.{layer}.mlp.experts", expert
    if out is not None:
        w13_GD, w2_DF = out
        read_rows(f"{p}.gate_up_proj", e, e + 1, out=_deinterleaved(w13_GD).permute(2, 0, 1).unsqueeze(0))
        read_rows(f"{p}.down_proj", e, e + 1, out=w2_DF.t().unsqueeze(0))
        return w13_GD, w2_DF, *_read_biases(read_rows, cfg, layer, e)
    w13_GD = read_rows(f"{p}.gate_up_proj", e, e + 1)[0].T[gate_up_rows(cfg.expert_hidden)]
    w2_DF = read_rows(f"{p}.down_proj", e, e + 1)[0].T
    return w13_GD, w2_DF, *_read_biases(read_rows, cfg, layer, e)


def read_expert_mxfp4(
    read_rows: ReadRows, cfg: GptOssConfig, layer: int, expert: int, out: Mxfp4Out = None
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One expert of an mxfp4 checkpoint, as shipped (read_rows gives blocks and scales as uint8, the biases in
    the compute dtype): ((blocks13 [G, D/32, 16], scales13 [G, D/32]), (blocks2 [D, F/32, 16],
    scales2 [D, F/32]), b13_G, b2_D); the 2F rows de-interleaved (gate rows, then up rows) by a row permutation.
    With `out` (views of the stacks' slots, shaped as the result), blocks and scales are read into them."""
    p, e = f"model.layers.{layer}.mlp.experts", expert
    if out is not None:
        (b13, s13), (b2, s2) = out
        for part, dst in (("blocks", b13), ("scales", s13)):
            read_rows(f"{p}.gate_up_proj_{part}", e, e + 1, out=_deinterleaved(dst).unsqueeze(0))
        for part, dst in (("blocks", b2), ("scales", s2)):
            read_rows(f"{p}.down_proj_{part}", e, e + 1, out=dst.unsqueeze(0))
        return (b13, s13), (b2, s2), *_read_biases(read_rows, cfg, layer, e)
    rows = gate_up_rows(cfg.expert_hidden)
    w13 = tuple(read_rows(f"{p}.gate_up_proj_{part}", e, e + 1)[0][rows].contiguous() for part in ("blocks", "scales"))
    w2 = tuple(read_rows(f"{p}.down_proj_{part}", e, e + 1)[0] for part in ("blocks", "scales"))
    return (w13[0], w13[1]), (w2[0], w2[1]), *_read_biases(read_rows, cfg, layer, e)
