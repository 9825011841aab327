"""Built-in random-weight checkpoints in the Hugging Face on-disk format (config.json, safetensors, tokenizer).

No model hub is needed: the benchmarks and the tests build checkpoints here. Weights are random, so text is
gibberish, but every byte path (loading, routing, exchange) is the real one. The demo runs a trained model
instead, shipped as package data (DEMO_MODEL_DIR; scripts/train_demo_model.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = """Mixture of experts models route every token to a few experts chosen by a learned router.
Expert parallelism places different experts on different machines; attention is replicated on each node.
A small cluster of ordinary machines can serve a large model when the experts are split between them.
The exchange after each layer is tiny, so latency matters more than bandwidth on the network.
Decoding one token reads the weights of the selected experts once; memory bandwidth sets the speed.
The quick brown fox jumps over the lazy dog. Hello world! How are you today? Numbers: 0 1 2 3 4 5 6 7 8 9.
"""

# name -> dims of the built-in DBRX-architecture models
PRESETS = {
    "demo": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=512, num_experts=16, top_k=4, vocab=512),
    # memory test: 384 MB of experts, little else
    "rss": dict(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, ffn_dim=2048, num_experts=16, top_k=2, vocab=512),
    # decode benchmark: >= 1 GB of weights read per token in bf16 (see benchmarks/decode.py)
    "bench": dict(dim=2048, n_layers=6, n_heads=16, n_kv_heads=4, ffn_dim=4096, num_experts=16, top_k=4, vocab=32000),
    # performance-model validation (benchmarks/perfmodel_validation.py): two shapes, ~1 GB each
    "val-1k": dict(dim=1024, n_layers=8, n_heads=8, n_kv_heads=2, ffn_dim=1024, num_experts=16, top_k=4, vocab=32000),
    "val-2k": dict(dim=2048, n_layers=4, n_heads=16, n_kv_heads=4, ffn_dim=2048, num_experts=8, top_k=2, vocab=32000),
}

# name -> dims of the built-in Qwen3-MoE-architecture models (keys as Qwen3MoeConfig writes them)
QWEN3_MOE_PRESETS = {
    # tests: small enough to compare with transformers in fp32 in a second
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 24,
        "num_local_experts": 16,
        "num_experts_per_tok": 4,
        "moe_intermediate_size": 32,
        "intermediate_size": 96,
        "mlp_only_layers": [1],
        "vocab_size": 512,
    },
    # decode benchmark: Qwen3-30B-A3B's layer (128 experts of 3 x [768, 2048], top-8, 32/4 heads of 128)
    # with 10 layers: 12.1 GB on disk, 1.26 GB of weights read per token with a 32k vocab
    "bench": {
        "hidden_size": 2048,
        "num_hidden_layers": 10,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_local_experts": 128,
        "num_experts_per_tok": 8,
        "moe_intermediate_size": 768,
        "intermediate_size": 6144,
        "mlp_only_layers": [],
        "vocab_size": 32000,
    },
}


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on a small built-in corpus (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS] * 4, trainer=trainer)
    return tok


def write_tokenizer(out_dir: Path, vocab_size: int) -> int:
    """Write tokenizer.json + tokenizer_config.json (with a chat template); returns the eos id."""
    tok = train_tokenizer(vocab_size)
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|im_end|>",
        "bos_token": None,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
    eos = tok.token_to_id("<|im_end|>")
    assert eos is not None  # a special token of the trained tokenizer
    return eos


def dbrx_config(
    dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    ffn_dim: int,
    num_experts: int,
    top_k: int,
    vocab: int,
    max_seq_len: int = 2048,
    dtype: str = "bfloat16",
    rope_theta: float = 500000.0,
    eos_token_id: int | None = None,
) -> dict:
    """A DBRX config.json dict as transformers writes it (rope theta in both places it is read)."""
    return {
        "architectures": ["DbrxForCausalLM"],
        "model_type": "dbrx",
        "d_model": dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "vocab_size": vocab,
        "max_seq_len": max_seq_len,
        "dtype": dtype,
        "attn_config": {"kv_n_heads": n_kv_heads, "clip_qkv": 8.0, "rope_theta": rope_theta},
        "ffn_config": {
            "moe_num_experts": num_experts,
            "moe_top_k": top_k,
            "ffn_hidden_size": ffn_dim,
            "moe_normalize_expert_weights": 1.0,
            "ffn_act_fn": {"name": "silu"},
        },
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": False,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
    }


def build_dbrx_checkpoint(
    out_dir: str | Path,
    preset: str = "demo",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a random-weight DBRX checkpoint (sharded past max_shard_bytes) with a tokenizer."""
    dims = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(out, dims["vocab"])
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cfg = dbrx_config(**dims, dtype=dtype_name, eos_token_id=eos)
    gen = torch.Generator().manual_seed(seed)
    d, hd = dims["dim"], dims["dim"] // dims["n_heads"]
    ef = dims["num_experts"] * dims["ffn_dim"]

    def rand(*shape, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    shards: list[dict] = [{}]
    sizes = [0]

    def put(name: str, t: torch.Tensor) -> None:
        if sizes[-1] and sizes[-1] + t.numel() * t.element_size() > max_shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = t.contiguous()
        sizes[-1] += t.numel() * t.element_size()

    put("transformer.wte.weight", rand(dims["vocab"], d, std=1.0))
    for i in range(dims["n_layers"]):
        b = f"transformer.blocks.{i}"
        put(f"{b}.norm_attn_norm.norm_1.weight", torch.ones(d, dtype=dtype))
        put(f"{b}.norm_attn_norm.attn.Wqkv.weight", rand(d + 2 * dims["n_kv_heads"] * hd, d, std=1 / math.sqrt(d)))
        put(f"{b}.norm_attn_norm.attn.out_proj.weight", rand(d, d, std=1 / math.sqrt(d)))
        put(f"{b}.norm_attn_norm.norm_2.weight", torch.ones(d, dtype=dtype))
        put(f"{b}.ffn.router.layer.weight", rand(dims["num_experts"], d, std=1 / math.sqrt(d)))
        for w in ("w1", "v1", "w2"):
            put(f"{b}.ffn.experts.mlp.{w}", rand(ef, d, std=1 / math.sqrt(d)))
    put("transformer.norm_f.weight", torch.ones(d, dtype=dtype))
    put("lm_head.weight", rand(dims["vocab"], d, std=1 / math.sqrt(d)))
    _save_shards(out, shards)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _save_shards(out: Path, shards: list[dict]) -> None:
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


def qwen3_moe_config(
    preset: str,
    dtype: str = "bfloat16",
    eos_token_id: int | None = None,
    max_position_embeddings: int = 4096,
    rope_theta: float = 1e6,
) -> dict:
    """A Qwen3-MoE config.json dict with the keys transformers' Qwen3MoeConfig writes."""
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **QWEN3_MOE_PRESETS[preset],
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "decoder_sparse_step": 1,
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "dtype": dtype,
        "use_cache": True,
        "eos_token_id": eos_token_id,
        "bos_token_id": None,
        "pad_token_id": None,
    }


def qwen3_moe_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...], float]]:
    """(on-disk name, shape, init std; 0 means ones) of every tensor of a Qwen3-MoE checkpoint, in file order."""
    D, Hd, V = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"]
    H, Hk, E, F = (
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["num_local_experts"],
        cfg["moe_intermediate_size"],
    )
    s = 1 / math.sqrt(D)
    out: list[tuple[str, tuple[int, ...], float]] = [("model.embed_tokens.weight", (V, D), 1.0)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (D,), 0),
            (f"{p}.self_attn.q_proj.weight", (H * Hd, D), s),
            (f"{p}.self_attn.k_proj.weight", (Hk * Hd, D), s),
            (f"{p}.self_attn.v_proj.weight", (Hk * Hd, D), s),
            (f"{p}.self_attn.o_proj.weight", (D, H * Hd), 1 / math.sqrt(H * Hd)),
            (f"{p}.self_attn.q_norm.weight", (Hd,), 0),
            (f"{p}.self_attn.k_norm.weight", (Hd,), 0),
            (f"{p}.post_attention_layernorm.weight", (D,), 0),
        ]
        if i in cfg["mlp_only_layers"]:
            Fd = cfg["intermediate_size"]
            out += [
                (f"{p}.mlp.gate_proj.weight", (Fd, D), s),
                (f"{p}.mlp.up_proj.weight", (Fd, D), s),
                (f"{p}.mlp.down_proj.weight", (D, Fd), 1 / math.sqrt(Fd)),
            ]
            continue
        out.append((f"{p}.mlp.gate.weight", (E, D), s))
        for e in range(E):
            q = f"{p}.mlp.experts.{e}"
            out += [
                (f"{q}.gate_proj.weight", (F, D), s),
                (f"{q}.up_proj.weight", (F, D), s),
                (f"{q}.down_proj.weight", (D, F), 1 / math.sqrt(F)),
            ]
    return out + [("model.norm.weight", (D,), 0), ("lm_head.weight", (V, D), s)]


def build_qwen3_moe_checkpoint(
    out_dir: str | Path,
    preset: str = "tiny",
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    max_shard_bytes: int = 2 * 1024**3,
) -> Path:
    """Write a random-weight Qwen3-MoE checkpoint in the Hub layout (per-expert tensors) with a tokenizer.

    Tensors are generated shard by shard, so memory holds at most one shard (max_shard_bytes) at a time.
    Norm weights are ones; the rest normal with std 1/sqrt(fan-in) (embeddings 1), so routing is far from flat."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(out, QWEN3_MOE_PRESETS[preset]["vocab_size"])
    dtype_name = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    cfg = qwen3_moe_config(preset, dtype=dtype_name, eos_token_id=eos)
    gen = torch.Generator().manual_seed(seed)

    def make(shape: tuple[int, ...], std: float) -> torch.Tensor:
        return torch.ones(shape, dtype=dtype) if std == 0 else (torch.randn(shape, generator=gen) * std).to(dtype)

    _write_shards_streaming(out, qwen3_moe_tensors(cfg), make, dtype.itemsize, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def _write_shards_streaming(
    out: Path,
    specs: list[tuple[str, tuple[int, ...], float]],
    make: Callable[[tuple[int, ...], float], torch.Tensor],
    itemsize: int,
    max_shard_bytes: int,
) -> None:
    """Plan shards by size first (their count is in every file name), then build and save one at a time."""
    plan: list[list[tuple[str, tuple[int, ...], float]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * itemsize
        if size and size + nbytes > max_shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(spec)
        size += nbytes
    if len(plan) == 1:
        save_file(
            {n: make(shape, std) for n, shape, std in plan[0]},
            str(out / "model.safetensors"),
            metadata={"format": "pt"},
        )
        return
    weight_map = {}
    for i, group in enumerate(plan, start=1):
        name = f"model-{i:05d}-of-{len(plan):05d}.safetensors"
        save_file({n: make(shape, std) for n, shape, std in group}, str(out / name), metadata={"format": "pt"})
        weight_map |= {n: name for n, _, _ in group}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))


# The built-in trained model `moecluster demo` runs (package data; scripts/train_demo_model.py retrains it).
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
