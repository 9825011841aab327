"""Model configs (pure Python, HF keys verbatim), the registry, and an end-to-end chat on a checkpoint whose
tokenizer transformers saved (chat_template.jinja)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from moecluster.errors import MoeClusterError
from moecluster.models.configs import CONFIGS, parse_config, shape_of

QWEN3 = {
    "model_type": "qwen3_moe",
    "hidden_size": 64,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 32,
    "intermediate_size": 96,
    "head_dim": 24,
    "some_future_key": [1, 2],
}


def test_config_keys_verbatim_unknown_ignored_and_moe_layers():
    cfg = parse_config(QWEN3 | {"mlp_only_layers": [0], "decoder_sparse_step": 2})
    # (i + 1) % 2 == 0 and not in mlp_only_layers: 1, 3, 5
    assert cfg.moe_layer_ids() == [1, 3, 5]
    shape = cfg.shape()
    assert (shape.num_layers, shape.num_moe_layers, shape.dense_ffn, shape.expert_ffn) == (6, 3, 96, 32)
    assert shape == shape_of(QWEN3 | {"mlp_only_layers": [0], "decoder_sparse_step": 2})


def test_transformers_5_expert_key_is_accepted():
    """transformers 5 writes num_local_experts for Qwen3-MoE; the Hub's configs say num_experts."""
    cfg = dict(QWEN3)
    cfg["num_local_experts"] = cfg.pop("num_experts")
    assert parse_config(cfg).shape().num_experts == 8


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.pop("hidden_size"), "required key 'hidden_size'"),
        (lambda c: c.update(num_experts_per_tok=9), "top-k"),
        (lambda c: c.update(num_key_value_heads=3), "multiple of 3 kv heads"),
        (lambda c: c.update(hidden_act="gelu"), "hidden_act"),
        (lambda c: c.update(mlp_only_layers=list(range(6))), "no layer is an MoE layer"),
        (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
        (lambda c: c.update(model_type="llama"), "unsupported model_type 'llama'"),
    ],
)
def test_bad_configs_say_what_to_fix(edit, message):
    cfg = dict(QWEN3)
    edit(cfg)
    with pytest.raises(MoeClusterError, match=message):
        parse_config(cfg)


def test_configs_import_no_torch():
    code = "import sys, moecluster.models.configs, moecluster.perfmodel; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_plan_only_architecture_is_refused_by_the_engine_with_one_clear_error(tmp_path, monkeypatch):
    from moecluster.loading import read_config
    from moecluster.models import registry

    cfg = {
        "model_type": "deepseek_v3",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "vocab_size": 100,
        "kv_lora_rank": 16,
        "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8,
        "v_head_dim": 8,
        "moe_intermediate_size": 16,
        "n_routed_experts": 8,
        "num_experts_per_tok": 2,
        "first_k_dense_replace": 1,
        "n_group": 1,
        "topk_group": 1,
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert "deepseek_v3" in CONFIGS and parse_config(cfg).shape().num_experts == 8
    # every known model_type runs today: pretend this one does not
    monkeypatch.delitem(registry.ARCHITECTURES, "deepseek_v3")
    with pytest.raises(MoeClusterError, match="not supported by the engine yet"):
        read_config(tmp_path)


def test_qwen3_checkpoint_with_tokenizer_saved_by_transformers_chats(tiny_models, tmp_path):
    """A Qwen3-MoE checkpoint whose tokenizer transformers 5.23 saved (chat_template.jinja) chats from the CLI,
    with the prompt transformers' apply_chat_template renders."""
    import shutil

    from transformers import PreTrainedTokenizerFast

    model = Path(shutil.copytree(tiny_models["qwen3_moe"], tmp_path / "qwen3"))
    (model / "tokenizer_config.json").unlink()
    hf_tok = PreTrainedTokenizerFast(tokenizer_file=str(model / "tokenizer.json"), eos_token="<|im_end|>")
    hf_tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    hf_tok.save_pretrained(model)
    assert (model / "chat_template.jinja").is_file()
    from moecluster.loading import load_model

    loaded = load_model(model, "fp32")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert loaded.tokenizer.apply_chat_template(messages) == hf_tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    from cli_runner import run_cli

    res = run_cli(
        "generate",
        "--model",
        str(model),
        "--prompt",
        "Hello",
        "--chat",
        "--max-tokens",
        "8",
        "--ignore-eos",
        "--dtype",
        "fp32",
    )

    assert res.returncode == 0, res.stderr
    assert "prompt tokens" in res.stderr
