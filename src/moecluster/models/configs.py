"""Model configs, pure Python (no torch): one dataclass per architecture with the HF `config.json` keys
verbatim (unknown keys ignored), invariants checked with messages that say what to fix, and `shape()`
giving the one `ModelShape` that the engine, `place`, the planner and the performance model use.

Legend: T tokens, D model dim, F expert hidden dim, E experts, K top-k, L layers, V vocab, H heads.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

from moecluster.errors import MoeClusterError
from moecluster.models.shape import DTYPE_BYTES as DTYPE_BYTES  # re-exported: the formats' bytes per weight
from moecluster.models.shape import EXPERT_FORMAT_BYTES, ModelShape, checkpoint_format


def _gqa(d: int, heads: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(attn params, kv elems per token, score dim) for grouped-query attention."""
    params = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
    return params, 2 * kv_heads * head_dim, 2 * head_dim


def _eos_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def rope_theta_of(rope_parameters: dict | None, *fallbacks: float | None, default: float) -> float:
    """RoPE base from `rope_parameters` (transformers >= 5), else the first legacy key present.

    Only plain RoPE here; scaled variants (YaRN, ...) need the architecture that uses them."""
    params = rope_parameters or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise MoeClusterError(
            f"config: rope_type {rope_type!r} is not supported for this architecture (only default RoPE)"
        )
    for value in (params.get("rope_theta"), *fallbacks):
        if value is not None:
            return float(value)
    return default


def _typed(model_type: str, name: str, value: Any, annotation: str) -> Any:
    """A config value checked against its field's annotation (int, float, bool, dict; others as is):
    one clear error instead of a TypeError deep in the model; integral floats (4096.0) become ints."""
    kinds = {a.strip() for a in annotation.split("|")} - {"None"}
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kinds == {"int"} and number and float(value).is_integer() and abs(value) < 2**53:
        return int(value)
    if kinds == {"float"} and number:
        return float(value)
    if (kinds == {"bool"} and isinstance(value, bool)) or (kinds == {"dict"} and isinstance(value, dict)):
        return value
    if kinds.isdisjoint({"int", "float", "bool", "dict"}) or len(kinds) > 1:
        return value  # str, lists, unions: the architecture's own checks
    what = {"int": "an integer", "float": "a number", "bool": "true or false", "dict": "a JSON object"}[kinds.pop()]
    raise MoeClusterError(f"config ({model_type}): {name} must be {what}, got {value!r:.60}; fix config.json")


@dataclass
class ArchConfig:
    """Base of the per-architecture configs: parsing with HF names, checks, and the common view."""

    model_type: ClassVar[str] = ""

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ArchConfig:
        """Build from a config.json dict: known keys verbatim, unknown keys ignored, required keys checked."""
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in cfg and cfg[f.name] is not None:
                kwargs[f.name] = _typed(cls.model_type, f.name, cfg[f.name], str(f.type))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise MoeClusterError(
                    f"config: required key {f.name!r} for model_type {cls.model_type!r} is "
                    "missing from config.json; is this a complete HF config?"
                )
        out = cls(**kwargs)
        out.validate()
        return out

    def validate(self) -> None:
        """Raise MoeClusterError naming what to fix when the config is inconsistent."""

    def _check(self, checks: list[tuple[bool, str]]) -> None:
        for ok, msg in checks:
            if not ok:
                raise MoeClusterError(f"config ({self.model_type}): {msg}; fix config.json")

    # -- the common view the rest of the code uses ------------------------------------------------
    def moe_layer_ids(self) -> list[int]:
        """Decoder layer indices whose MLP is an MoE layer (placement counts these only)."""
        raise NotImplementedError

    @property
    def eos_token_ids(self) -> list[int]:
        return _eos_list(getattr(self, "eos_token_id", None))

    @property
    def max_seq_len(self) -> int:
        raise NotImplementedError

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        raise NotImplementedError


@dataclass
class DbrxConfig(ArchConfig):
    """DBRX: nested attn_config / ffn_config, every layer MoE."""

    model_type: ClassVar[str] = "dbrx"
    d_model: int
    n_heads: int
    n_layers: int
    vocab_size: int
    attn_config: dict = field(default_factory=dict)
    ffn_config: dict = field(default_factory=dict)
    max_seq_len_: int = 2048
    rope_parameters: dict | None = None
    rope_theta_: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> ArchConfig:
        out = super().from_dict(cfg)
        assert isinstance(out, DbrxConfig)
        out.max_seq_len_ = int(cfg.get("max_seq_len") or 2048)
        out.rope_theta_ = cfg.get("rope_theta")  # the key a property reads under the same name
        return out

    def _ffn(self, key: str, default: Any = None) -> Any:
        value = self.ffn_config.get(key, default)
        if value is None:
            raise MoeClusterError(f"config (dbrx): ffn_config lacks {key!r}; fix config.json")
        return value

    @property
    def num_experts(self) -> int:
        return int(self._ffn("moe_num_experts"))

    @property
    def top_k(self) -> int:
        return int(self._ffn("moe_top_k"))

    @property
    def ffn_hidden_size(self) -> int:
        return int(self._ffn("ffn_hidden_size"))

    @property
    def kv_n_heads(self) -> int:
        return int(self.attn_config.get("kv_n_heads") or 1)

    @property
    def clip_qkv(self) -> float | None:
        return self.attn_config.get("clip_qkv")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_theta(self) -> float:
        return rope_theta_of(
            self.rope_parameters, self.rope_theta_, self.attn_config.get("rope_theta"), default=500000.0
        )

    @property
    def max_seq_len(self) -> int:
        return self.max_seq_len_

    @property
    def normalize_p(self) -> float | None:
        return self.ffn_config.get("moe_normalize_expert_weights", 1.0)

    def validate(self) -> None:
        act = (self.ffn_config.get("ffn_act_fn") or {"name": "silu"}).get("name", "silu")
        self._check(
            [
                (act == "silu", f"ffn_act_fn {act!r} is not supported (only silu)"),
                (self.n_layers > 0, f"n_layers must be positive, got {self.n_layers}"),
                (self.d_model % self.n_heads == 0, f"d_model {self.d_model} is not divisible by {self.n_heads} heads"),
                (
                    self.n_heads % self.kv_n_heads == 0,
                    f"{self.n_heads} heads are not a multiple of {self.kv_n_heads} kv heads",
                ),
                (
                    0 < self.top_k <= self.num_experts,
                    f"top-k (moe_top_k) {self.top_k} must be in 1..{self.num_experts}",
                ),
                (self.head_dim % 2 == 0, f"head dim {self.head_dim} must be even for rotary embeddings"),
            ]
        )
        _ = self.rope_theta

    def moe_layer_ids(self) -> list[int]:
        return list(range(self.n_layers))

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        a, kv_e, sd = _gqa(self.d_model, self.n_heads, self.kv_n_heads, self.head_dim)
        return ModelShape(
            name=name,
            model_type=self.model_type,
            source=source,
            num_layers=self.n_layers,
            num_moe_layers=self.n_layers,
            d_model=self.d_model,
            num_heads=self.n_heads,
            num_experts=self.num_experts,
            top_k=self.top_k,
            expert_ffn=self.ffn_hidden_size,
            vocab_size=self.vocab_size,
            attn_params=a,
            kv_elems_per_token=kv_e,
            attn_score_dim=sd,
            tie_embeddings=self.tie_word_embeddings,
        )


@dataclass
class _HFDecoderConfig(ArchConfig):
    """The keys Mixtral, the Qwen MoE family and OLMoE share (names verbatim from their config.json)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts_per_tok: int = 2
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    rope_parameters: dict | None = None
    rope_theta: float | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    num_experts: int | None = None
    num_local_experts: int | None = None
    # the Hub's key for the number of routed experts; transformers 5 may write the other one instead
    experts_key: ClassVar[str] = "num_experts"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def kv_heads(self) -> int:
        return int(self.num_key_value_heads or self.num_attention_heads)

    @property
    def dim_per_head(self) -> int:
        return int(self.head_dim or self.hidden_size // self.num_attention_heads)

    @property
    def rope_base(self) -> float:
        return rope_theta_of(self.rope_parameters, self.rope_theta, default=10000.0)

    @property
    def max_seq_len(self) -> int:
        return int(self.max_position_embeddings)

    @property
    def routed_experts(self) -> int:
        other = "num_local_experts" if self.experts_key == "num_experts" else "num_experts"
        n = getattr(self, self.experts_key) or getattr(self, other)
        if not n:
            raise MoeClusterError(f"config ({self.model_type}): {self.experts_key} is missing from config.json")
        return int(n)

    @property
    def expert_hidden(self) -> int:
        raise NotImplementedError

    def validate(self) -> None:
        self._check(
            [
                (self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only silu)"),
                (self.num_hidden_layers > 0, f"num_hidden_layers must be positive, got {self.num_hidden_layers}"),
                (
                    self.head_dim is not None or self.hidden_size % self.num_attention_heads == 0,
                    f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads "
                    "and no head_dim is given",
                ),
                (
                    self.num_attention_heads % self.kv_heads == 0,
                    f"{self.num_attention_heads} attention heads are not a multiple of {self.kv_heads} kv heads",
                ),
                (
                    0 < self.num_experts_per_tok <= self.routed_experts,
                    f"top-k (num_experts_per_tok) {self.num_experts_per_tok} must be in 1..{self.routed_experts}",
                ),
                (self.dim_per_head % 2 == 0, f"head dim {self.dim_per_head} must be even for rotary embeddings"),
                (
                    self.vocab_size > 0 and self.max_position_embeddings > 0,
                    "vocab_size and max_position_embeddings must be positive",
                ),
            ]
        )
        _ = self.rope_base

    def moe_layer_ids(self) -> list[int]:
        return list(range(self.num_hidden_layers))

    def _shape(self, name: str, source: str, shared_ffn: int = 0, dense_ffn: int = 0) -> ModelShape:
        a, kv_e, sd = _gqa(self.hidden_size, self.num_attention_heads, self.kv_heads, self.dim_per_head)
        moe = self.moe_layer_ids()
        return ModelShape(
            name=name,
            model_type=self.model_type,
            source=source,
            num_layers=self.num_hidden_layers,
            num_moe_layers=len(moe),
            d_model=self.hidden_size,
            num_heads=self.num_attention_heads,
            num_experts=self.routed_experts,
            top_k=self.num_experts_per_tok,
            expert_ffn=self.expert_hidden,
            vocab_size=self.vocab_size,
            attn_params=a,
            kv_elems_per_token=kv_e,
            attn_score_dim=sd,
            shared_ffn=shared_ffn,
            dense_ffn=dense_ffn if len(moe) < self.num_hidden_layers else 0,
            tie_embeddings=self.tie_word_embeddings,
        )

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        return self._shape(name, source)


@dataclass
class MixtralConfig(_HFDecoderConfig):
    """Mixtral: experts `num_local_experts` (transformers 5 also accepts `num_experts`), every layer MoE."""

    model_type: ClassVar[str] = "mixtral"
    experts_key: ClassVar[str] = "num_local_experts"
    intermediate_size: int = 14336
    sliding_window: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float | None = 1e6

    @property
    def expert_hidden(self) -> int:
        return int(self.intermediate_size)

    @property
    def max_seq_len(self) -> int:
        # attention is exact only while the whole context fits in the sliding window
        return min(int(self.max_position_embeddings), int(self.sliding_window or self.max_position_embeddings))


@dataclass
class _QwenMoeConfig(_HFDecoderConfig):
    """Qwen2-MoE / Qwen3-MoE: `mlp_only_layers` and `decoder_sparse_step` make some layers dense."""

    moe_intermediate_size: int = 0
    intermediate_size: int = 0  # dense layers' MLP
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False

    @property
    def expert_hidden(self) -> int:
        return int(self.moe_intermediate_size)

    def moe_layer_ids(self) -> list[int]:
        step = max(1, int(self.decoder_sparse_step))
        only = set(self.mlp_only_layers)
        return [i for i in range(self.num_hidden_layers) if i not in only and (i + 1) % step == 0]

    def validate(self) -> None:
        super().validate()
        dense = len(self.moe_layer_ids()) < self.num_hidden_layers
        self._check(
            [
                (self.moe_intermediate_size > 0, "moe_intermediate_size must be positive"),
                (not dense or self.intermediate_size > 0, "intermediate_size (the dense layers' MLP) must be positive"),
                (bool(self.moe_layer_ids()), "no layer is an MoE layer (mlp_only_layers / decoder_sparse_step)"),
            ]
        )

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        return self._shape(name, source, shared_ffn=self.shared_hidden, dense_ffn=self.intermediate_size)

    @property
    def shared_hidden(self) -> int:
        return 0


@dataclass
class Qwen3MoeConfig(_QwenMoeConfig):
    model_type: ClassVar[str] = "qwen3_moe"
    attention_bias: bool = False


@dataclass
class Qwen2MoeConfig(_QwenMoeConfig):
    model_type: ClassVar[str] = "qwen2_moe"
    shared_expert_intermediate_size: int = 0
    qkv_bias: bool = True

    @property
    def shared_hidden(self) -> int:
        return int(self.shared_expert_intermediate_size)


@dataclass
class OlmoeConfig(_HFDecoderConfig):
    model_type: ClassVar[str] = "olmoe"
    intermediate_size: int = 0
    clip_qkv: float | None = None
    norm_topk_prob: bool = False
    attention_bias: bool = False
    rms_norm_eps: float = 1e-5

    @property
    def expert_hidden(self) -> int:
        return int(self.intermediate_size)


@dataclass
class Glm4MoeConfig(_HFDecoderConfig):
    """GLM-4.5 / GLM-4.5-Air: the first `first_k_dense_replace` layers dense, then MoE layers with
    `n_shared_experts` shared experts and sigmoid routing with a correction bias, group-limited top-k;
    partial rotary (`partial_rotary_factor`, in rope_parameters or top level; transformers' default 0.5)."""

    model_type: ClassVar[str] = "glm4_moe"
    intermediate_size: int = 10944  # dense layers' MLP
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    use_qk_norm: bool = False
    attention_bias: bool = False
    partial_rotary_factor: float | None = None  # legacy top-level key (config.json of the released models)
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072

    @property
    def routed_experts(self) -> int:
        return int(self.n_routed_experts)

    @property
    def expert_hidden(self) -> int:
        return int(self.moe_intermediate_size)

    @property
    def shared_hidden(self) -> int:
        """Hidden size of the shared experts taken together (one gated MLP)."""
        return int(self.n_shared_experts) * int(self.moe_intermediate_size)

    @property
    def rotary_dim(self) -> int:
        """RoPE covers the first rotary_dim dims of each head (transformers: int(head_dim * factor))."""
        factor = (self.rope_parameters or {}).get("partial_rotary_factor", self.partial_rotary_factor)
        return int(self.dim_per_head * (0.5 if factor is None else float(factor)))

    def moe_layer_ids(self) -> list[int]:
        return list(range(int(self.first_k_dense_replace), self.num_hidden_layers))

    def validate(self) -> None:
        super().validate()
        E, groups = self.routed_experts, max(1, int(self.n_group))
        self._check(
            [
                (self.moe_intermediate_size > 0, "moe_intermediate_size must be positive"),
                (
                    self.first_k_dense_replace == 0 or self.intermediate_size > 0,
                    "intermediate_size (the dense layers' MLP) must be positive",
                ),
                (bool(self.moe_layer_ids()), f"first_k_dense_replace {self.first_k_dense_replace} leaves no MoE layer"),
                (
                    E % groups == 0 and E // groups >= 2,
                    f"n_routed_experts {E} must split into n_group {groups} groups of at least 2 experts",
                ),
                (0 < self.topk_group <= groups, f"topk_group {self.topk_group} must be in 1..{groups} (n_group)"),
                (
                    self.num_experts_per_tok <= self.topk_group * (E // groups),
                    f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts of topk_group "
                    f"{self.topk_group} groups ({self.topk_group * (E // groups)})",
                ),
                (
                    0 < self.rotary_dim <= self.dim_per_head and self.rotary_dim % 2 == 0,
                    f"partial_rotary_factor gives rotary dim {self.rotary_dim}; it must be even and in "
                    f"2..{self.dim_per_head} (head_dim)",
                ),
            ]
        )

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        return self._shape(name, source, shared_ffn=self.shared_hidden, dense_ffn=self.intermediate_size)


@dataclass
class GptOssConfig(_HFDecoderConfig):
    """gpt-oss: every layer MoE (router with a bias, top-k then softmax; experts with biases and a clamped
    SwiGLU), attention with q/k/v/o biases and per-head sinks, `layer_types` alternating sliding-window and
    full attention, YaRN RoPE (`rope_parameters`, or the legacy `rope_scaling` + `rope_theta` of the Hub's
    config.json; transformers' defaults when absent)."""

    model_type: ClassVar[str] = "gpt_oss"
    num_hidden_layers: int = 36
    num_local_experts: int = 128
    num_experts: int | None = None
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    head_dim: int | None = 64
    num_attention_heads: int = 64
    num_key_value_heads: int | None = 8
    sliding_window: int | None = 128
    layer_types: list[str] | None = None
    num_experts_per_tok: int = 4
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    attention_bias: bool = True
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    rope_scaling: dict | None = None
    quantization_config: dict | None = None

    YARN_DEFAULT: ClassVar[dict] = {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    }

    @property
    def routed_experts(self) -> int:
        return int(self.num_experts or self.num_local_experts)

    @property
    def expert_hidden(self) -> int:
        return int(self.intermediate_size)

    @property
    def rope(self) -> dict:
        """The RoPE parameters with rope_type and rope_theta filled in (theta default 150000, as transformers)."""
        params = dict(self.rope_parameters or self.rope_scaling or self.YARN_DEFAULT)
        params.setdefault("rope_type", params.get("type", "default"))
        params.setdefault("rope_theta", self.rope_theta if self.rope_theta is not None else 150000.0)
        return params

    @property
    def rope_base(self) -> float:
        return float(self.rope["rope_theta"])

    @property
    def sliding_layers(self) -> list[bool]:
        """Per layer: sliding-window attention? (transformers' default: even layers slide, odd are full.)"""
        types = self.layer_types or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.num_hidden_layers)
        ]
        return [t == "sliding_attention" and bool(self.sliding_window) for t in types]

    def validate(self) -> None:
        rope = self.rope
        self._check(
            [
                (
                    rope["rope_type"] in ("default", "yarn"),
                    f"rope_type {rope['rope_type']!r} is not supported (gpt-oss: yarn or default)",
                ),
                (
                    rope["rope_type"] != "yarn" or ("factor" in rope and "original_max_position_embeddings" in rope),
                    "yarn rope_parameters need factor and original_max_position_embeddings",
                ),
                (
                    self.layer_types is None or len(self.layer_types) == self.num_hidden_layers,
                    f"layer_types has {len(self.layer_types or [])} entries for {self.num_hidden_layers} layers",
                ),
                (
                    not set(self.layer_types or []) - {"sliding_attention", "full_attention"},
                    f"layer_types {sorted(set(self.layer_types or []))} must be sliding_attention or full_attention",
                ),
                (self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive"),
                (self.intermediate_size > 0, "intermediate_size must be positive"),
            ]
        )
        super().validate()

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        return replace(
            self._shape(name, source),
            num_sliding_layers=sum(self.sliding_layers),
            sliding_window=int(self.sliding_window or 0),
        )


@dataclass
class DeepseekV3Config(ArchConfig):
    """DeepSeek-V3 (Kimi K2's architecture) and, as DeepseekV2Config, DeepSeek-V2: multi-head latent attention
    (MLA: low-rank q with optional `q_lora_rank`, one shared latent `kv_lora_rank` + rotated key `qk_rope_head_dim`
    per token), optional YaRN RoPE, the first `first_k_dense_replace` layers dense (then every `moe_layer_freq`-th
    layer MoE), `n_shared_experts` shared experts; routing by `topk_method`: "noaux_tc" (sigmoid + correction
    bias, group-limited; V3), "greedy" / "group_limited_greedy" (softmax; V2). Defaults are transformers'."""

    model_type: ClassVar[str] = "deepseek_v3"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    moe_intermediate_size: int
    n_routed_experts: int
    num_experts_per_tok: int
    q_lora_rank: int | None = None
    intermediate_size: int = 18432
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    n_shared_experts: int = 1
    routed_scaling_factor: float = 2.5
    n_group: int | None = 8
    topk_group: int | None = 4
    topk_method: str = "noaux_tc"
    scoring_func: str | None = None  # "sigmoid" (noaux_tc) or "softmax" (V2 methods); checked when given
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None  # legacy key (the released config.json files); wins over rope_parameters
    rope_theta: float | None = None
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers on disk after the last layer (not run)
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @property
    def max_seq_len(self) -> int:
        return int(self.max_position_embeddings)

    @property
    def groups(self) -> int:
        return max(1, int(self.n_group or 1))

    @property
    def interleaved_rope(self) -> bool:
        """RoPE pairs adjacent dims (x0, x1), (x2, x3), ... (V2 always; V3 when `rope_interleave`)."""
        return bool(self.rope_interleave)

    @property
    def rope(self) -> dict[str, Any]:
        """RoPE parameters as transformers standardizes them: `rope_scaling` (legacy) or `rope_parameters`,
        "type" read as "rope_type", rope_theta (default 10000), yarn's original_max_position_embeddings
        defaulting to max_position_embeddings and its factor to max / original."""
        params = dict(self.rope_scaling or self.rope_parameters or {})
        params["rope_type"] = params.get("rope_type", params.get("type", "default"))
        theta = params.get("rope_theta", self.rope_theta)
        params["rope_theta"] = float(10000.0 if theta is None else theta)
        if params["rope_type"] == "yarn":
            original = int(params.get("original_max_position_embeddings") or self.max_position_embeddings)
            params["original_max_position_embeddings"] = original
            if params.get("factor") is None:
                params["factor"] = self.max_position_embeddings / original
        return params

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk head dim), times mscale(factor, mscale_all_dim)^2 under YaRN (transformers' yarn_apply_mscale)."""
        scale = (self.qk_nope_head_dim + self.qk_rope_head_dim) ** -0.5
        rope = self.rope
        if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
            factor, m = float(rope["factor"]), float(rope["mscale_all_dim"])
            mscale = 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
            scale = scale * mscale * mscale
        return scale

    def validate(self) -> None:
        E, K, groups = self.n_routed_experts, self.num_experts_per_tok, self.groups
        topk_group = int(self.topk_group or groups)
        methods = {"noaux_tc": "sigmoid", "greedy": "softmax", "group_limited_greedy": "softmax"}
        rope_type = self.rope["rope_type"]
        self._check(
            [
                (self.hidden_act == "silu", f"hidden_act {self.hidden_act!r} is not supported (only silu)"),
                (not self.mlp_bias, "mlp_bias is not supported"),
                (self.num_hidden_layers > 0, f"num_hidden_layers must be positive, got {self.num_hidden_layers}"),
                (0 < K <= E, f"num_experts_per_tok {K} must be in 1..{E}"),
                (self.topk_method in methods, f"topk_method {self.topk_method!r} is not one of {', '.join(methods)}"),
                (
                    self.scoring_func in (None, methods.get(self.topk_method)),
                    f"scoring_func {self.scoring_func!r} does not go with topk_method {self.topk_method!r}",
                ),
                (E % groups == 0, f"n_routed_experts {E} must split into n_group {groups} equal groups"),
                (
                    self.topk_method != "noaux_tc" or groups == 1 or E // groups >= 2,
                    f"noaux_tc scores a group by its two best experts: n_group {groups} leaves fewer than 2 per group",
                ),
                (0 < topk_group <= groups, f"topk_group {topk_group} must be in 1..{groups} (n_group)"),
                (
                    self.topk_method == "greedy" or K <= topk_group * (E // groups),
                    f"num_experts_per_tok {K} exceeds the experts of topk_group {topk_group} groups",
                ),
                (
                    self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                    f"qk_rope_head_dim {self.qk_rope_head_dim} must be positive and even",
                ),
                (rope_type in ("default", "yarn"), f"rope_type {rope_type!r} is not supported (default or yarn)"),
                (
                    bool(self.moe_layer_ids()),
                    f"first_k_dense_replace {self.first_k_dense_replace} / moe_layer_freq {self.moe_layer_freq} "
                    "leave no MoE layer",
                ),
                (
                    len(self.moe_layer_ids()) == self.num_hidden_layers or self.intermediate_size > 0,
                    "intermediate_size (the dense layers' MLP) must be positive",
                ),
            ]
        )

    def moe_layer_ids(self) -> list[int]:
        freq = max(1, int(self.moe_layer_freq))
        return [i for i in range(self.first_k_dense_replace, self.num_hidden_layers) if i % freq == 0]

    def shape(self, name: str = "model", source: str = "") -> ModelShape:
        d, heads = self.hidden_size, self.num_attention_heads
        nope, rope, v_dim = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        qk = nope + rope
        q_params = d * heads * qk if not self.q_lora_rank else d * self.q_lora_rank + self.q_lora_rank * heads * qk
        kv_params = d * (self.kv_lora_rank + rope) + self.kv_lora_rank * heads * (nope + v_dim)
        attn = q_params + kv_params + heads * v_dim * d
        moe = self.moe_layer_ids()
        return ModelShape(
            name=name,
            model_type=self.model_type,
            source=source,
            num_layers=self.num_hidden_layers,
            num_moe_layers=len(moe),
            d_model=d,
            num_heads=heads,
            num_experts=self.n_routed_experts,
            top_k=self.num_experts_per_tok,
            expert_ffn=self.moe_intermediate_size,
            vocab_size=self.vocab_size,
            attn_params=attn,
            kv_elems_per_token=self.kv_lora_rank + rope,
            attn_score_dim=qk + v_dim,
            shared_ffn=self.n_shared_experts * self.moe_intermediate_size,
            dense_ffn=self.intermediate_size if len(moe) < self.num_hidden_layers else 0,
            tie_embeddings=self.tie_word_embeddings,
        )


@dataclass
class DeepseekV2Config(DeepseekV3Config):
    """DeepSeek-V2 / V2-Lite: transformers' V2 defaults; RoPE always on interleaved pairs (complex form).
    `norm_topk_prob` is not applied: transformers' V2 router ignores it (the released V2 configs set it false)."""

    model_type: ClassVar[str] = "deepseek_v2"
    intermediate_size: int = 11008
    first_k_dense_replace: int = 0
    n_shared_experts: int = 2
    routed_scaling_factor: float = 1.0
    n_group: int | None = None
    topk_group: int | None = None
    topk_method: str = "greedy"
    norm_topk_prob: bool = False
    max_position_embeddings: int = 2048

    @property
    def interleaved_rope(self) -> bool:
        return True


CONFIGS: dict[str, type[ArchConfig]] = {
    c.model_type: c
    for c in (
        DbrxConfig,
        MixtralConfig,
        Qwen3MoeConfig,
        Qwen2MoeConfig,
        OlmoeConfig,
        Glm4MoeConfig,
        GptOssConfig,
        DeepseekV3Config,
        DeepseekV2Config,
    )
}


def parse_config(cfg: dict[str, Any], where: str = "config.json") -> ArchConfig:
    """The architecture's config for an HF config dict; one clear error for an unknown model_type."""
    if not isinstance(cfg, dict):
        raise MoeClusterError(f"{where}: expected a JSON object (an HF config.json)")
    model_type = cfg.get("model_type")
    if model_type not in CONFIGS:
        raise MoeClusterError(
            f"unsupported model_type {model_type!r} in {where}; supported: {', '.join(sorted(CONFIGS))}"
        )
    return CONFIGS[str(model_type)].from_dict(cfg)


def shape_of(cfg: dict[str, Any], name: str = "model", source: str = "") -> ModelShape:
    """ModelShape of an HF config dict (bf16 weights; routed experts in the checkpoint's quantized format)."""
    where = f"model {name!r} (model_type {cfg.get('model_type')!r})" if isinstance(cfg, dict) else name
    shape = parse_config(cfg, where).shape(name, source)
    fmt = checkpoint_format(cfg) if isinstance(cfg, dict) else None
    return shape if fmt is None else replace(shape, expert_weight_bytes=EXPERT_FORMAT_BYTES[fmt])
