"""DeepSeek-V3 (and Kimi K2, same architecture) and DeepSeek-V2, beside transformers' modeling_deepseek_v3.py /
modeling_deepseek_v2.py: RMSNorm; multi-head latent attention (MLA) with a latent KV cache; optional YaRN
RoPE on the `qk_rope_head_dim` dims of each head; the first `first_k_dense_replace` layers dense, then MoE
layers (every `moe_layer_freq`-th) with `n_shared_experts` shared experts (one gated MLP, replicated on every
rank) and routing by `topk_method`: noaux_tc (sigmoid + correction bias, group-limited; V3), greedy /
group_limited_greedy (softmax; V2). Experts on disk per expert as `mlp.experts.{e}.{gate,up,down}_proj`.
The multi-token-prediction layer the released checkpoints ship (layer index num_hidden_layers) is not run.

MLA. Per token: latent c = RMSNorm(kv_lora_rank part of kv_a_proj(x)) and a rotated key k_pe shared by all
heads (qk_rope_head_dim); head h's key is [W_UK_h c, k_pe] and value W_UV_h c, where kv_b_proj = [W_UK; W_UV]
per head. The cache holds only [c, k_pe] per token. Prefill (T > 1) expands the cached latents to keys and
values per head (the form transformers computes). Decode (T = 1) absorbs the up-projections instead:
q_h . k_h = (W_UK_h^T q_nope_h) . c + q_pe_h . k_pe, so every head attends over the cache [c, k_pe] as one
shared key ("multi-query" over the latent: the cache is read once per step, not once per head), and the
attention-weighted latent goes through W_UV_h afterwards.

Cache cost for DeepSeek-V3's real shape (kv_lora_rank 512, qk_rope_head_dim 64, 128 heads, qk_nope_head_dim
128, v_head_dim 128, 61 layers), bf16: latent (512 + 64) x 2 B = 1,152 B per token per layer, 70,272 B
(~69 KiB) per token for the model; expanded K/V would be 128 x (192 + 128) x 2 B = 81,920 B per layer,
4,997,120 B (~4.8 MiB) per token: 71x more.

Shape legend: B rows, T new tokens, S cached positions, D model dim, H heads, n qk_nope_head_dim,
r qk_rope_head_dim, c kv_lora_rank, v v_head_dim, C = c + r, E experts, F expert hidden, G = 2F.
"""

from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moecluster.errors import MoeClusterError
from moecluster.models.configs import DeepseekV3Config
from moecluster.models.hub import (
    DenseMap,
    ExpertOut,
    ReadRows,
    embed_norm_head,
    hf_gated_mlp,
    per_expert_tensors,
    read_per_expert,
)
from moecluster.models.invariance import rowwise
from moecluster.models.layers import (
    CacheRows,
    DecoderModel,
    GatedMLP,
    Linear,
    PreNormBlock,
    RMSNorm,
    Step,
    apply_rope,
    decode_attention,
    rope_tables,
    yarn_inv_freq,
    yarn_mscale,
)
from moecluster.models.moe import MoE, RoutedExperts, Router, ScoreFn, sigmoid_group_topk, softmax_group_topk

LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm use RMSNorm's default eps, not rms_norm_eps


class LatentCache(nn.Module):
    """Per-layer MLA cache, one row per slot: each position holds [latent c (kv_lora_rank), k_pe (rope dim)]."""

    kv: torch.Tensor

    def __init__(self, num_slots: int, max_seq_len: int, width: int, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("kv", torch.zeros(num_slots, max_seq_len, width, dtype=dtype), persistent=False)

    def update(self, rows: CacheRows, kv_BTC: torch.Tensor, span: int) -> torch.Tensor:
        """Write the new positions of each row; return kv_BSC, the first `span` cached positions."""
        num_tokens = kv_BTC.shape[1]
        if num_tokens == 1 and len(rows.slots) > 1:  # batched decode: one scatter
            self.kv[rows.slots_t, rows.pos_t] = kv_BTC[:, 0]
        else:
            for b, (slot, pos) in enumerate(zip(rows.slots, rows.pos, strict=True)):
                self.kv[slot, pos : pos + num_tokens] = kv_BTC[b]
        return self.kv[rows.index, :span]


def interleaved_rope(x_BHTr: torch.Tensor, cos_BTr: torch.Tensor, sin_BTr: torch.Tensor) -> torch.Tensor:
    """RoPE on adjacent pairs (x0, x1), (x2, x3), ... (DeepSeek's layout): de-interleave to [evens, odds], then
    rotate-half; the output stays de-interleaved (the same for queries and keys, so dot products are unchanged),
    as transformers' apply_rotary_pos_emb_interleave returns it."""
    return apply_rope(torch.cat((x_BHTr[..., 0::2], x_BHTr[..., 1::2]), dim=-1), cos_BTr, sin_BTr)


class MLAttention(nn.Module):
    """Multi-head latent attention with a latent cache; the module names are transformers'."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        *,
        q_lora_rank: int | None,
        kv_lora_rank: int,
        qk_nope_head_dim: int,
        qk_rope_head_dim: int,
        v_head_dim: int,
        softmax_scale: float,
        bias: bool = False,
        interleaved: bool = True,
    ):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.scale = n_heads, kv_lora_rank, softmax_scale
        self.nope, self.rope, self.v_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.interleaved = interleaved
        qk_dim = qk_nope_head_dim + qk_rope_head_dim
        self.q_lora_rank = q_lora_rank
        if q_lora_rank is None:
            self.q_proj = Linear(dim, n_heads * qk_dim)
        else:
            self.q_a_proj = Linear(dim, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(q_lora_rank, n_heads * qk_dim)
        self.kv_a_proj_with_mqa = Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim))
        self.o_proj = Linear(n_heads * v_head_dim, dim, bias=bias)
        self.cache: LatentCache | None = None

    def make_cache(self, num_slots: int, max_seq_len: int, dtype: torch.dtype) -> None:
        self.cache = LatentCache(num_slots, max_seq_len, self.kv_lora_rank + self.rope, dtype)

    def forward(self, x_BTD: torch.Tensor, step: Step, absorb: bool | None = None) -> torch.Tensor:
        """absorb: decode form (default when T == 1) or expanded form (default otherwise)."""
        if (out := rowwise(partial(self.forward, absorb=absorb), x_BTD, step)) is not None:  # each row as if alone
            return out
        B, T, _ = x_BTD.shape
        H, n, r, c = self.n_heads, self.nope, self.rope, self.kv_lora_rank
        q = self.q_proj(x_BTD) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_nope, q_pe = q.view(B, T, H, n + r).transpose(1, 2).split([n, r], dim=-1)
        latent_BTc, k_pe_BTr = self.kv_a_proj_with_mqa(x_BTD).split([c, r], dim=-1)
        rope = interleaved_rope if self.interleaved else apply_rope
        q_pe = rope(q_pe, step.cos_BTHd, step.sin_BTHd)
        k_pe_BTr = rope(k_pe_BTr[:, None], step.cos_BTHd, step.sin_BTHd)[:, 0]
        if self.cache is None:
            raise MoeClusterError("internal: call model.setup_cache() before forward")
        kv_BSC = self.cache.update(step.rows, torch.cat((self.kv_a_layernorm(latent_BTc), k_pe_BTr), dim=-1), step.span)
        attend = self.absorbed if (T == 1 if absorb is None else absorb) else self.expanded
        out_BHTv = attend(q_nope, q_pe, kv_BSC, step.mask_B1TS)
        return self.o_proj(out_BHTv.transpose(1, 2).reshape(B, T, H * self.v_dim))

    def expanded(
        self, q_nope_BHTn: torch.Tensor, q_pe_BHTr: torch.Tensor, kv_BSC: torch.Tensor, mask_B1TS: torch.Tensor | None
    ) -> torch.Tensor:
        """Keys and values per head from the cached latents (kv_b_proj), then attention: out_BHTv."""
        B, S, _ = kv_BSC.shape
        H, n, c = self.n_heads, self.nope, self.kv_lora_rank
        k_nope, v_BHSv = (
            self.kv_b_proj(kv_BSC[..., :c]).view(B, S, H, n + self.v_dim).transpose(1, 2).split([n, self.v_dim], dim=-1)
        )
        k_BHSd = torch.cat((k_nope, kv_BSC[:, None, :, c:].expand(B, H, S, self.rope)), dim=-1)
        q_BHTd = torch.cat((q_nope_BHTn, q_pe_BHTr), dim=-1)
        return F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSv, attn_mask=mask_B1TS, scale=self.scale)

    def absorbed(
        self, q_nope_BHTn: torch.Tensor, q_pe_BHTr: torch.Tensor, kv_BSC: torch.Tensor, mask_B1TS: torch.Tensor | None
    ) -> torch.Tensor:
        """W_UK folded into the query, W_UV applied after attention: all heads attend over the latent cache
        as one shared key/value head, so it is read once. out_BHTv."""
        B, H, T, _ = q_nope_BHTn.shape
        n, c = self.nope, self.kv_lora_rank
        w_HeC = self.kv_b_proj.weight.view(H, n + self.v_dim, c)
        q_lat_BHTc = torch.matmul(q_nope_BHTn, w_HeC[:, :n])  # W_UK_h^T q_nope_h
        # heads folded into the query rows: [B, 1, H*T, C] against the one latent "head"
        q_B1QC = torch.cat((q_lat_BHTc, q_pe_BHTr), dim=-1).reshape(B, 1, H * T, c + self.rope)
        mask = None if mask_B1TS is None else mask_B1TS[:, :, None].expand(B, 1, H, T, -1).reshape(B, 1, H * T, -1)
        kv_B1SC = kv_BSC[:, None]
        if B == 1 and T == 1 and mask is None:  # one new token: SDPA's CPU kernel is slow for it (layers.py)
            o_B1Qc = decode_attention(q_B1QC.view(1, H, 1, -1), kv_B1SC, kv_B1SC[..., :c], self.scale).view(1, 1, H, c)
        else:
            o_B1Qc = F.scaled_dot_product_attention(q_B1QC, kv_B1SC, kv_B1SC[..., :c], attn_mask=mask, scale=self.scale)
        return torch.matmul(o_B1Qc.view(B, H, T, c), w_HeC[:, n:].transpose(1, 2))  # W_UV_h o_h


def mla_rope_tables(cfg: DeepseekV3Config, max_seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos_SR, sin_SR over the qk_rope_head_dim dims: plain, or YaRN frequencies with cos/sin scaled by the
    attention factor (transformers: attention_factor, else mscale(f, mscale) / mscale(f, mscale_all_dim) when
    both are set, else mscale(f))."""
    rope, dim = cfg.rope, cfg.qk_rope_head_dim
    if rope["rope_type"] != "yarn":
        return rope_tables(dim, max_seq_len, rope["rope_theta"], dtype)
    factor = float(rope["factor"])
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
            if mscale and mscale_all_dim
            else yarn_mscale(factor)
        )
    inv_freq = yarn_inv_freq(
        dim,
        rope["rope_theta"],
        factor,
        rope["original_max_position_embeddings"],
        rope.get("beta_fast") or 32,
        rope.get("beta_slow") or 1,
        rope.get("truncate", True),
    )
    return rope_tables(dim, max_seq_len, rope["rope_theta"], dtype, inv_freq=inv_freq, scale=float(attention_factor))


def router_score(cfg: DeepseekV3Config) -> ScoreFn:
    """The routing function `topk_method` names."""
    k, groups = cfg.num_experts_per_tok, cfg.groups
    topk_group = int(cfg.topk_group or groups)
    if cfg.topk_method == "noaux_tc":
        return partial(
            sigmoid_group_topk,
            k=k,
            n_group=groups,
            topk_group=topk_group,
            renorm=cfg.norm_topk_prob,
            scale=cfg.routed_scaling_factor,
        )
    return partial(
        softmax_group_topk,
        k=k,
        n_group=groups if cfg.topk_method == "group_limited_greedy" else 1,
        topk_group=topk_group,
        scale=cfg.routed_scaling_factor,
    )


class DeepseekV3ForCausalLM(DecoderModel):
    def __init__(self, cfg: DeepseekV3Config):
        D, E, eps = cfg.hidden_size, cfg.n_routed_experts, cfg.rms_norm_eps
        score = router_score(cfg)
        moe_layers = set(cfg.moe_layer_ids())

        def block(i: int) -> PreNormBlock:
            attn = MLAttention(
                D,
                cfg.num_attention_heads,
                q_lora_rank=cfg.q_lora_rank,
                kv_lora_rank=cfg.kv_lora_rank,
                qk_nope_head_dim=cfg.qk_nope_head_dim,
                qk_rope_head_dim=cfg.qk_rope_head_dim,
                v_head_dim=cfg.v_head_dim,
                softmax_scale=cfg.softmax_scale,
                bias=cfg.attention_bias,
                interleaved=cfg.interleaved_rope,
            )
            mlp: nn.Module = GatedMLP(D, cfg.intermediate_size)
            if i in moe_layers:
                experts = RoutedExperts(E, D, cfg.moe_intermediate_size, list(range(E)), device="meta")
                shared_hidden = cfg.n_shared_experts * cfg.moe_intermediate_size
                shared = GatedMLP(D, shared_hidden) if shared_hidden else None
                mlp = MoE(Router(D, E, score, correction_bias=cfg.topk_method == "noaux_tc"), experts, shared)
            return PreNormBlock(RMSNorm(D, eps), attn, RMSNorm(D, eps), mlp)

        super().__init__(
            cfg.vocab_size,
            D,
            [block(i) for i in range(cfg.num_hidden_layers)],
            RMSNorm(D, eps),
            head_dim=cfg.qk_rope_head_dim,
            rope_theta=cfg.rope["rope_theta"],
            max_seq_len=cfg.max_seq_len,
            tie_embeddings=cfg.tie_word_embeddings,
            rope=partial(mla_rope_tables, cfg),
        )


def _attention_weights(cfg: DeepseekV3Config, ours: str, disk: str) -> DenseMap:
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk, c, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "kv_a_proj_with_mqa.weight": (c + r, D),
        "kv_a_layernorm.weight": (c,),
        "kv_b_proj.weight": (H * (cfg.qk_nope_head_dim + cfg.v_head_dim), c),
        "o_proj.weight": (D, H * cfg.v_head_dim),
    }
    if cfg.q_lora_rank is None:
        shapes["q_proj.weight"] = (H * qk, D)
    else:
        q = cfg.q_lora_rank
        shapes |= {"q_a_proj.weight": (q, D), "q_a_layernorm.weight": (q,), "q_b_proj.weight": (H * qk, q)}
    if cfg.attention_bias:
        shapes |= {"kv_a_proj_with_mqa.bias": (c + r,), "o_proj.bias": (D,)}
        if cfg.q_lora_rank is not None:
            shapes["q_a_proj.bias"] = (cfg.q_lora_rank,)
    return {f"{ours}.{name}": ([f"{disk}.{name}"], shape) for name, shape in shapes.items()}


def dense_weights(cfg: DeepseekV3Config) -> DenseMap:
    """Our parameter name -> (on-disk names concatenated along dim 0, our shape)."""
    D, E = cfg.hidden_size, cfg.n_routed_experts
    moe_layers = set(cfg.moe_layer_ids())
    out = embed_norm_head(cfg.vocab_size, D, cfg.tie_word_embeddings)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        out |= _attention_weights(cfg, f"layers.{i}.attn", f"{p}.self_attn")
        out |= {
            f"layers.{i}.attn_norm.weight": ([f"{p}.input_layernorm.weight"], (D,)),
            f"layers.{i}.mlp_norm.weight": ([f"{p}.post_attention_layernorm.weight"], (D,)),
        }
        if i not in moe_layers:
            out |= hf_gated_mlp(f"layers.{i}.mlp", f"{p}.mlp", D, cfg.intermediate_size)
            continue
        out[f"layers.{i}.mlp.router.gate.weight"] = ([f"{p}.mlp.gate.weight"], (E, D))
        if cfg.topk_method == "noaux_tc":
            out[f"layers.{i}.mlp.router.e_score_correction_bias"] = ([f"{p}.mlp.gate.e_score_correction_bias"], (E,))
        if cfg.n_shared_experts:
            out |= hf_gated_mlp(
                f"layers.{i}.mlp.shared", f"{p}.mlp.shared_experts", D, cfg.n_shared_experts * cfg.moe_intermediate_size
            )
    return out


def ignored_on_disk(cfg: DeepseekV3Config, name: str) -> bool:
    """Tensors the checkpoint ships that we do not run: the multi-token-prediction layer(s) after the last
    decoder layer (`model.layers.{num_hidden_layers + j}.*`)."""
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return m is not None and int(m.group(1)) >= cfg.num_hidden_layers


def expert_weights(cfg: DeepseekV3Config, layer: int) -> dict[str, tuple[int, ...]]:
    """On-disk expert tensors of one MoE layer with their shapes."""
    return per_expert_tensors(
        f"model.layers.{layer}.mlp.experts", cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    )


def read_expert(
    read_rows: ReadRows, cfg: DeepseekV3Config, layer: int, expert: int, out: ExpertOut = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One expert's (w13_GD, w2_DF) (into `out` when given)."""
    return read_per_expert(
        read_rows, f"model.layers.{layer}.mlp.experts", expert, cfg.hidden_size, cfg.moe_intermediate_size, out=out
    )
