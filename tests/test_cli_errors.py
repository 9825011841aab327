"""Every bad input to `moecluster generate` gives one clear error line and a non-zero exit, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from cli_runner import run_cli
from safetensors import safe_open


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def assert_clean_error(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert message in lines[0], lines[0]


def test_generate_works(tiny_dbrx):
    res = run_cli("generate", "--model", str(tiny_dbrx), "--prompt", "Hello", "--max-tokens", "5", "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    for field in ("time to first token", "decode:", "peak RSS", "weights read per decode token", "GB/s"):
        assert field in res.stderr


def test_missing_directory(tmp_path):
    assert_clean_error(run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x"), "does not exist")


def test_missing_shard(tiny_dbrx, tmp_path):
    d = copy_model(tiny_dbrx, tmp_path / "m")
    (d / "model.safetensors").unlink()
    assert_clean_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "no model.safetensors")


def test_missing_shard_of_index(tiny_dbrx, tmp_path):
    d = copy_model(tiny_dbrx, tmp_path / "m")
    (d / "model.safetensors").rename(d / "model-00001-of-00002.safetensors")
    with safe_open(str(d / "model-00001-of-00002.safetensors"), "pt") as f:
        names = list(f.keys())
    index = {n: "model-00001-of-00002.safetensors" for n in names[:-1]}
    index[names[-1]] = "model-00002-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    assert_clean_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "model-00002-of-00002.safetensors")


def test_truncated_shard(tiny_dbrx, tmp_path):
    d = copy_model(tiny_dbrx, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert_clean_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "truncated")


def test_unsupported_model_type(tiny_dbrx, tmp_path):
    d = copy_model(tiny_dbrx, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("generate", "--model", str(d), "--prompt", "x"), "unsupported model_type 'llama'")


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(d_model=96), "shape"),  # weights say 64
        (lambda c: c.update(n_heads=5), "not divisible"),
        (lambda c: c["ffn_config"].update(moe_top_k=99), "top-k"),
    ],
)
def test_inconsistent_config(tiny_dbrx, tmp_path, edit, message):
    d = copy_model(tiny_dbrx, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_cli("generate", "--model", str(d), "--prompt", "x"), message)


def test_prompt_longer_than_context(tiny_dbrx):
    assert_clean_error(run_cli("generate", "--model", str(tiny_dbrx), "--prompt", "word " * 400), "context")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
        (["--top-k", "-1"], "top_k"),
    ],
)
def test_invalid_sampling_flags(tiny_dbrx, flags, message):
    assert_clean_error(run_cli("generate", "--model", str(tiny_dbrx), "--prompt", "x", *flags), message)


def test_debug_shows_traceback(tmp_path):
    res = run_cli("generate", "--model", str(tmp_path / "nope"), "--prompt", "x", "--debug")
    assert res.returncode != 0 and "Traceback" in res.stderr
