"""Model shapes for the performance model: parameter and byte counts from an HF `config.json`.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, L layers, V vocab,
H heads, S sequence.

A `ModelShape` holds only what the performance model needs: how many bytes every rank holds and
reads per token (replicated: embeddings, attention, norms, router, shared/dense MLPs, lm_head)
and how many bytes one expert holds, plus KV-cache bytes per token. Parsing reads HF key names
verbatim for model_type dbrx, mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2 and deepseek_v3.
Small terms (biases, q/k norms, router bias) are ignored; they are < 0.01% of the bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError

# Bytes per weight for --dtype; q8/q4 are group-64 affine quantization (scale + bias in fp16).
DTYPE_BYTES: dict[str, float] = {
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "q8": 1.0 + 4.0 / 64,
    "q4": 0.5 + 4.0 / 64,
}
SUPPORTED_TYPES = ("dbrx", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


@dataclass(frozen=True)
class ModelShape:
    """Shape of an MoE decoder. Param counts are per layer unless the name says otherwise."""

    name: str
    model_type: str
    num_layers: int
    num_moe_layers: int
    d_model: int
    num_heads: int
    num_experts: int
    top_k: int
    expert_ffn: int  # F: hidden size of one routed expert (gated MLP: 3 matrices D x F)
    vocab_size: int
    attn_params: int  # per layer: q, k, v, o projections (or MLA's low-rank ones)
    kv_elems_per_token: int  # per layer: cached elements per token (K and V, or MLA latent)
    attn_score_dim: int  # per head: qk dim + v dim (scores and weighted sum per cached token)
    shared_ffn: int = 0  # total hidden size of shared experts per MoE layer (0: none)
    dense_ffn: int = 0  # hidden size of the MLP in non-MoE layers
    tie_embeddings: bool = False
    weight_bytes: float = 2.0  # bytes per weight (bf16)
    act_bytes: int = 2  # bytes per activation element (exchange and KV cache)
    source: str = ""

    # -- per-layer and total parameter counts ------------------------------------------------
    @property
    def expert_params(self) -> int:
        """Params of one routed expert in one layer (w1, v1/w3, w2: 3 x D x F)."""
        return 3 * self.d_model * self.expert_ffn

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    @property
    def router_params(self) -> int:
        return self.d_model * self.num_experts

    @property
    def shared_params(self) -> int:
        """Shared-expert params in one MoE layer (replicated on every rank)."""
        return 3 * self.d_model * self.shared_ffn

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.d_model * self.dense_ffn

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def head_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def replicated_params(self) -> int:
        """Params every rank holds: embeddings, attention, norms, router, shared/dense MLP, head."""
        per_layer = self.attn_params + 2 * self.d_model
        moe = self.router_params + self.shared_params
        return (
            self.num_layers * per_layer
            + self.num_moe_layers * moe
            + self.num_dense_layers * self.dense_mlp_params
            + self.embed_params
            + (0 if self.tie_embeddings else self.head_params)
            + self.d_model
        )

    @property
    def expert_params_total(self) -> int:
        return self.num_moe_layers * self.num_experts * self.expert_params

    @property
    def total_params(self) -> int:
        return self.replicated_params + self.expert_params_total

    @property
    def active_params(self) -> int:
        """Params touched per token at batch 1 (embedding: one row)."""
        routed = self.num_moe_layers * self.top_k * self.expert_params
        return self.replicated_params - self.embed_params + self.d_model + routed

    # -- bytes ------------------------------------------------------------------------------
    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert in one layer."""
        return self.expert_params * self.weight_bytes

    @property
    def replicated_bytes(self) -> float:
        return self.replicated_params * self.weight_bytes

    @property
    def total_bytes(self) -> float:
        return self.total_params * self.weight_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token of context, all layers."""
        return self.num_layers * self.kv_elems_per_token * self.act_bytes

    def exchange_bytes(self, num_tokens: int) -> int:
        """All-reduce message size for T tokens: T x D activations."""
        return num_tokens * self.d_model * self.act_bytes

    def with_dtype(self, dtype: str) -> "ModelShape":
        """Same shape with weights stored as `dtype` (bf16, fp16, fp8, q8, q4)."""
        if dtype not in DTYPE_BYTES:
            raise MoeClusterError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        return replace(self, weight_bytes=DTYPE_BYTES[dtype])

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary of sizes (bytes in GB = 1e9)."""
        return {
            "name": self.name,
            "model_type": self.model_type,
            "layers": self.num_layers,
            "moe_layers": self.num_moe_layers,
            "d_model": self.d_model,
            "experts": self.num_experts,
            "top_k": self.top_k,
            "total_params_b": self.total_params / 1e9,
            "active_params_b": self.active_params / 1e9,
            "weight_bytes_per_param": self.weight_bytes,
            "replicated_gb": self.replicated_bytes / 1e9,
            "expert_gb_each": self.expert_bytes / 1e9,
            "experts_total_gb": self.expert_params_total * self.weight_bytes / 1e9,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "exchange_bytes_per_token": self.exchange_bytes(1),
            "source": self.source,
        }


def _get(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> Any:
    """cfg[key] with a clear error if it is missing and has no default."""
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    if default is not None:
        return default
    raise MoeClusterError(f"{where}: config lacks '{key}'; pass a complete HF config.json")


def _gqa(d: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(attn params, kv elems per token, score dim) for grouped-query attention."""
    params = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    return params, 2 * kv_heads * head_dim, 2 * head_dim


def _parse_dbrx(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    ffn = _get(cfg, "ffn_config", where)
    attn = _get(cfg, "attn_config", where)
    d, heads = int(_get(cfg, "d_model", where)), int(_get(cfg, "n_heads", where))
    kv = int(_get(attn, "kv_n_heads", where + " attn_config"))
    a, kv_e, sd = _gqa(d, heads, kv, d // heads)
    layers = int(_get(cfg, "n_layers", where))
    return dict(
        num_layers=layers, num_moe_layers=layers, d_model=d, num_heads=heads,
        num_experts=int(_get(ffn, "moe_num_experts", where + " ffn_config")),
        top_k=int(_get(ffn, "moe_top_k", where + " ffn_config")),
        expert_ffn=int(_get(ffn, "ffn_hidden_size", where + " ffn_config")),
        vocab_size=int(_get(cfg, "vocab_size", where)), attn_params=a, kv_elems_per_token=kv_e,
        attn_score_dim=sd, tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _parse_hf_gqa(cfg: dict[str, Any], where: str, mt: str) -> dict[str, Any]:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: standard HF key names."""
    d, heads = int(_get(cfg, "hidden_size", where)), int(_get(cfg, "num_attention_heads", where))
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or d // heads)
    a, kv_e, sd = _gqa(d, heads, kv, head_dim)
    layers = int(_get(cfg, "num_hidden_layers", where))
    moe_layers, shared, dense = layers, 0, 0
    # hub configs say num_local_experts (Mixtral) or num_experts; transformers 5 may rename
    primary = "num_local_experts" if mt == "mixtral" else "num_experts"
    other = "num_experts" if mt == "mixtral" else "num_local_experts"
    experts = cfg.get(primary) or cfg.get(other) or _get(cfg, primary, where)
    if mt in ("mixtral", "olmoe"):
        ffn = _get(cfg, "intermediate_size", where)
    else:  # qwen2_moe / qwen3_moe
        ffn = _get(cfg, "moe_intermediate_size", where)
        step = int(cfg.get("decoder_sparse_step") or 1)
        only_mlp = set(cfg.get("mlp_only_layers") or [])
        moe_layers = sum(1 for i in range(layers) if i not in only_mlp and (i + 1) % step == 0)
        dense = int(cfg.get("intermediate_size") or 0) if moe_layers < layers else 0
        shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    return dict(
        num_layers=layers, num_moe_layers=moe_layers, d_model=d, num_heads=heads,
        num_experts=int(experts), top_k=int(_get(cfg, "num_experts_per_tok", where)),
        expert_ffn=int(ffn), vocab_size=int(_get(cfg, "vocab_size", where)), attn_params=a,
        kv_elems_per_token=kv_e, attn_score_dim=sd, shared_ffn=shared, dense_ffn=dense,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def _parse_deepseek(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """DeepSeek-V2/V3: multi-head latent attention, shared experts, first k layers dense."""
    d, heads = int(_get(cfg, "hidden_size", where)), int(_get(cfg, "num_attention_heads", where))
    q_rank = cfg.get("q_lora_rank")
    kv_rank = int(_get(cfg, "kv_lora_rank", where))
    nope, rope = int(_get(cfg, "qk_nope_head_dim", where)), int(_get(cfg, "qk_rope_head_dim", where))
    v_dim = int(_get(cfg, "v_head_dim", where))
    qk = nope + rope
    q_params = d * heads * qk if not q_rank else d * int(q_rank) + int(q_rank) * heads * qk
    attn = q_params + d * (kv_rank + rope) + kv_rank * heads * (nope + v_dim) + heads * v_dim * d
    layers = int(_get(cfg, "num_hidden_layers", where))
    first_dense = int(cfg.get("first_k_dense_replace") or 0)
    freq = int(cfg.get("moe_layer_freq") or 1)
    moe_layers = sum(1 for i in range(first_dense, layers) if i % freq == 0)
    ffn = int(_get(cfg, "moe_intermediate_size", where))
    return dict(
        num_layers=layers, num_moe_layers=moe_layers, d_model=d, num_heads=heads,
        num_experts=int(_get(cfg, "n_routed_experts", where)),
        top_k=int(_get(cfg, "num_experts_per_tok", where)), expert_ffn=ffn,
        vocab_size=int(_get(cfg, "vocab_size", where)), attn_params=attn,
        kv_elems_per_token=kv_rank + rope, attn_score_dim=qk + v_dim,
        shared_ffn=int(cfg.get("n_shared_experts") or 0) * ffn,
        dense_ffn=int(_get(cfg, "intermediate_size", where)) if moe_layers < layers else 0,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )


def from_hf_config(cfg: dict[str, Any], name: str = "model", source: str = "") -> ModelShape:
    """Parse an HF config dict (keys verbatim) into a ModelShape with bf16 weights."""
    mt = str(cfg.get("model_type", ""))
    where = f"model {name!r} (model_type {mt!r})"
    if mt == "dbrx":
        fields = _parse_dbrx(cfg, where)
    elif mt in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
        fields = _parse_hf_gqa(cfg, where, mt)
    elif mt in ("deepseek_v2", "deepseek_v3"):
        fields = _parse_deepseek(cfg, where)
    else:
        raise MoeClusterError(
            f"{where}: unsupported model_type; supported: {', '.join(SUPPORTED_TYPES)}"
        )
    shape = ModelShape(name=name, model_type=mt, source=source, **fields)
    if shape.top_k < 1 or shape.top_k > shape.num_experts:
        raise MoeClusterError(f"{where}: top_k {shape.top_k} must be in 1..{shape.num_experts}")
    return shape


def load_model(spec: str, presets: dict[str, Any]) -> ModelShape:
    """A preset name (see presets.json "models"), a config.json path, or a model directory."""
    if spec in presets:
        entry = presets[spec]
        return from_hf_config(entry["config"], name=spec, source=entry.get("source", ""))
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise MoeClusterError(
            f"unknown model {spec!r}: not a preset ({', '.join(sorted(presets))}) "
            "and not a config.json file or a model directory containing one"
        )
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoeClusterError(f"cannot read {path}: {e}; pass a valid HF config.json") from e
    if not isinstance(cfg, dict):
        raise MoeClusterError(f"{path}: expected a JSON object (an HF config.json)")
    return from_hf_config(cfg, name=path.parent.name or str(path), source=str(path))
