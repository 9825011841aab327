"""The shape of an MoE decoder in parameters and bytes (`ModelShape`), pure Python: what the engine, `place`,
the planner and the performance model read from a config (models/configs.py builds it), and the bytes per
weight of each format.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, L layers, V vocab, H heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from moecluster.errors import MoeClusterError

# Bytes per weight for --dtype; q8/q4 are group-64 affine quantization (scale + bias in fp16).
# The expert formats the engine holds (moecluster.quant), scales included: int8/int4 one fp32 scale per 128
# inputs (--quant-group-size default), fp8 one fp32 per 128x128 block, mxfp4 one e8m0 byte per 32.
EXPERT_FORMAT_BYTES: dict[str, float] = {
    "int8": 1.0 + 4.0 / 128,
    "int4": 0.5 + 4.0 / 128,
    "fp8": 1.0 + 4.0 / (128 * 128),
    "mxfp4": 0.5 + 1.0 / 32,
}
DTYPE_BYTES: dict[str, float] = {
    "bf16": 2.0,
    "fp16": 2.0,
    "q8": 1.0 + 4.0 / 64,
    "q4": 0.5 + 4.0 / 64,
    **EXPERT_FORMAT_BYTES,
}


FP8_BLOCK = 128  # the block-scaled FP8 layout (DeepSeek-V3 / Qwen3-FP8): one scale per 128x128 block
_SUPPORTED_METHODS = {"fp8": "fp8", "mxfp4": "mxfp4"}
_KNOWN_UNSUPPORTED = (
    "gptq",
    "awq",
    "bitsandbytes",
    "compressed-tensors",
    "hqq",
    "aqlm",
    "quanto",
    "eetq",
    "torchao",
    "fbgemm_fp8",
    "bitnet",
    "vptq",
    "higgs",
    "spqr",
    "fp_quant",
)


def format_from_quantization_config(cfg: object) -> str | None:
    """A checkpoint's config.json `quantization_config` -> "fp8" | "mxfp4", None when absent (unquantized).

    Raises MoeClusterError naming the method when it is one this project cannot read (the one check that the
    engine, `plan` and `place` share)."""
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        cfg = {}  # not a JSON object: no method to read
    method = str(cfg.get("quant_method", "")).lower()
    supported = ", ".join(f"{m!r}" for m in _SUPPORTED_METHODS)
    if method not in _SUPPORTED_METHODS:
        known = " (a known method this project does not read)" if method in _KNOWN_UNSUPPORTED else ""
        raise MoeClusterError(
            f"quantization method {method or '(missing)'!r} is not supported{known}; supported "
            f"checkpoint formats: {supported}, or an unquantized bf16 checkpoint quantized on "
            f"load to 'int8' / 'int4'"
        )
    if method == "fp8":
        block = list(cfg.get("weight_block_size") or [])
        fmt = str(cfg.get("fmt", "e4m3")).lower()
        if block != [FP8_BLOCK, FP8_BLOCK] or fmt != "e4m3":
            raise MoeClusterError(
                f"fp8 checkpoints are supported with fmt 'e4m3' and weight_block_size "
                f"[128, 128] (DeepSeek-V3 / Qwen3-FP8); this one has fmt {fmt!r} and "
                f"weight_block_size {block or None}"
            )
        if str(cfg.get("activation_scheme", "dynamic")) != "dynamic":
            raise MoeClusterError(
                "fp8 checkpoints with static activation scales are not supported; "
                "use one with activation_scheme 'dynamic'"
            )
    return _SUPPORTED_METHODS[method]


def checkpoint_format(cfg: dict[str, Any]) -> str | None:
    """The expert format a checkpoint ships by its config.json `quantization_config` ("fp8", "mxfp4"), None
    when unquantized; other methods get one error."""
    return format_from_quantization_config(cfg.get("quantization_config"))


@dataclass(frozen=True)
class ModelShape:
    """Shape of an MoE decoder. Param counts are per layer unless the name says otherwise.

    Small terms (biases, q/k norms, router bias) are ignored; they are < 0.01% of the bytes."""

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
    expert_weight_bytes: float | None = None  # routed experts' bytes per weight when held apart (quantized)
    dense_weight_bytes: float | None = None  # attention and shared / dense MLPs' when quantized (--quantize-dense)
    head_weight_bytes: float | None = None  # the lm_head's when quantized (--quantize-dense: int8)
    act_bytes: int = 2  # bytes per activation element (exchange and KV cache)
    source: str = ""
    num_sliding_layers: int = 0  # layers with sliding-window attention: they cache only `sliding_window` tokens
    sliding_window: int = 0

    @property
    def expert_params(self) -> int:
        """Params of one routed expert in one layer (gate, up, down: 3 x D x F)."""
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

    @property
    def expert_bytes(self) -> float:
        """Bytes of one expert in one layer (scales included)."""
        return self.expert_params * (
            self.weight_bytes if self.expert_weight_bytes is None else self.expert_weight_bytes
        )

    @property
    def dense_bytes_per_weight(self) -> float:
        """Bytes per weight of attention and shared / dense MLPs (scales included)."""
        return self.weight_bytes if self.dense_weight_bytes is None else self.dense_weight_bytes

    @property
    def head_bytes_per_weight(self) -> float:
        return self.weight_bytes if self.head_weight_bytes is None else self.head_weight_bytes

    @property
    def replicated_bytes(self) -> float:
        dense = (
            self.num_layers * self.attn_params
            + self.num_moe_layers * self.shared_params
            + self.num_dense_layers * self.dense_mlp_params
        )
        head = 0 if self.tie_embeddings else self.head_params
        rest = self.replicated_params - dense - head  # embeddings, norms, routers
        return rest * self.weight_bytes + dense * self.dense_bytes_per_weight + head * self.head_bytes_per_weight

    @property
    def total_bytes(self) -> float:
        return self.replicated_bytes + self.num_moe_layers * self.num_experts * self.expert_bytes

    @property
    def kv_bytes_per_token(self) -> float:
        """KV-cache bytes per token of context, all layers."""
        return self.num_layers * self.kv_elems_per_token * self.act_bytes

    def kv_bytes(self, context: int) -> float:
        """KV-cache bytes of one sequence of `context` tokens, all layers (sliding layers: at most the window)."""
        sliding = self.num_sliding_layers * min(context, self.sliding_window)
        full = (self.num_layers - self.num_sliding_layers) * context
        return (full + sliding) * self.kv_elems_per_token * self.act_bytes

    def exchange_bytes(self, num_tokens: int) -> int:
        """All-reduce message size for T tokens: T x D activations."""
        return num_tokens * self.d_model * self.act_bytes

    def with_dense(self, fmt: str) -> ModelShape:
        """Same shape with the engine's --quantize-dense `fmt` (int8 / int4): attention and shared / dense MLPs
        in that format, the lm_head int8 (unless tied to the embeddings), embeddings, norms and routers as they
        were."""
        if fmt not in ("int8", "int4"):
            raise MoeClusterError(f"--quantize-dense {fmt!r}: choose int8 or int4")
        head = None if self.tie_embeddings else EXPERT_FORMAT_BYTES["int8"]
        return replace(self, dense_weight_bytes=EXPERT_FORMAT_BYTES[fmt], head_weight_bytes=head)

    def with_dtype(self, dtype: str) -> ModelShape:
        """Same shape with weights stored as `dtype`: bf16, fp16, q8, q4 all weights; the engine's expert
        formats (int8, int4, fp8, mxfp4) the routed experts only, the rest staying bf16 as the engine holds it
        (`with_dense` then models --quantize-dense)."""
        if dtype not in DTYPE_BYTES:
            raise MoeClusterError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPE_BYTES)}")
        if dtype in EXPERT_FORMAT_BYTES:
            return replace(self, weight_bytes=2.0, expert_weight_bytes=DTYPE_BYTES[dtype])
        every = DTYPE_BYTES[dtype]  # all weights in one format: nothing held apart
        apart = {"expert_weight_bytes": None, "dense_weight_bytes": None, "head_weight_bytes": None}
        return replace(self, weight_bytes=every, **apart)

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
            "dense_bytes_per_param": self.dense_bytes_per_weight,
            "head_bytes_per_param": self.head_bytes_per_weight,
            "replicated_gb": self.replicated_bytes / 1e9,
            "expert_gb_each": self.expert_bytes / 1e9,
            "experts_total_gb": self.num_moe_layers * self.num_experts * self.expert_bytes / 1e9,
            "expert_bytes_per_param": self.expert_bytes / self.expert_params if self.expert_params else 0.0,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "exchange_bytes_per_token": self.exchange_bytes(1),
            "source": self.source,
        }
