"""Build tiny random-weight checkpoints with transformers (XxxConfig + XxxForCausalLM.save_pretrained)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from moecluster.builtin import write_tokenizer

VOCAB = 384


def hf_model(arch: str, seed: int = 0, **overrides):
    """A transformers model of the given architecture, fp32, random weights (scaled so routing is not flat)."""
    from transformers import DbrxConfig, DbrxForCausalLM, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    if arch == "dbrx":
        cfg = DbrxConfig(d_model=64, n_heads=4, n_layers=3, max_seq_len=256, vocab_size=VOCAB,
                         attn_config={"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
                         ffn_config={"moe_num_experts": 8, "moe_top_k": 2, "ffn_hidden_size": 48},
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **overrides)
        model = DbrxForCausalLM(cfg)
    elif arch == "mixtral":
        cfg = MixtralConfig(hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                            num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=VOCAB,
                            max_position_embeddings=256,
                            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                            **overrides)
        model = MixtralForCausalLM(cfg)
    else:
        raise ValueError(arch)
    with torch.no_grad():  # larger weights than the 0.02 init so that logits and routing are far from ties
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def build_tiny(arch: str, out: Path, seed: int = 0, **overrides) -> Path:
    model = hf_model(arch, seed, **overrides)
    out.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(out, VOCAB)
    model.config.eos_token_id = eos
    model.save_pretrained(out)
    return out


if __name__ == "__main__":
    build_tiny(sys.argv[1], Path(sys.argv[2]))
