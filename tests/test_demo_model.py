"""The built-in trained demo model (src/moecluster/demo_model): exact against transformers, the demo's text,
the eval command, and placement on its real routing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moecluster.builtin import DEMO_MODEL_DIR
from moecluster.cli.demo import DEMO_PROMPT
from moecluster.engine.generate import Engine
from moecluster.engine.profile_routing import profile
from moecluster.engine.sampling import SamplingParams
from moecluster.loading import load_model
from moecluster.planning.placement_metrics import observed_max_rank_load
from moecluster.planning.planner import Cluster, plan
from moecluster.planning.routing_stats import RoutingStats
from moecluster.planning.sizes import read_model_sizes

HELD_OUT = Path(__file__).parent.parent / "benchmarks" / "data" / "demo_heldout.txt"


@pytest.fixture(scope="module")
def hf_fp32():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype=torch.float32).eval()


def test_ships_as_package_data():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    } <= names
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size <= 25e6


def test_logits_match_transformers(hf_fp32):
    loaded = load_model(DEMO_MODEL_DIR, "fp32")
    ids = loaded.tokenizer.encode(HELD_OUT.read_text()[:2000])[:200]
    loaded.model.setup_cache(1)
    with torch.inference_mode():
        got = loaded.model(torch.tensor([ids]), torch.tensor([0]))
        want = hf_fp32(torch.tensor([ids])).logits
    assert (got - want).abs().max().item() <= 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_greedy_text_equals_transformers(dtype):
    from transformers import AutoModelForCausalLM

    engine = Engine(load_model(DEMO_MODEL_DIR, dtype))
    prompt = engine.tokenizer.encode(DEMO_PROMPT)
    text, ours, _ = engine.generate(prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    ref = AutoModelForCausalLM.from_pretrained(
        DEMO_MODEL_DIR, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    ).eval()
    with torch.inference_mode():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    assert ours == out[0, len(prompt) :].tolist()
    assert "\ufffd" not in text and len(text.split()) >= 5  # readable words, no broken characters


def _routing(engine: Engine, text: str, chunks: int) -> RoutingStats:
    """Routing of `chunks` consecutive ~200-token prefixes' worth of the text (prefill, 1 token decoded)."""
    ids = engine.tokenizer.encode(text)
    prompts = [engine.tokenizer.decode(ids[i * 200 : (i + 1) * 200]) for i in range(chunks)]
    return profile(engine, prompts, 1)


@pytest.fixture(scope="module")
def recorded_routing() -> tuple[RoutingStats, RoutingStats]:
    """(stats to plan from, stats to measure on): two disjoint parts of the held-out text."""
    engine = Engine(load_model(DEMO_MODEL_DIR, "bf16"))
    text = HELD_OUT.read_text()
    half = len(text) // 2
    return _routing(engine, text[:half], 5), _routing(engine, text[half:], 5)


@pytest.mark.parametrize("nodes", [2, 3])
def test_optimized_placement_beats_contiguous_on_real_routing(recorded_routing, nodes):
    planned_on, measured_on = recorded_routing
    sizes = read_model_sizes(str(DEMO_MODEL_DIR))
    cluster = Cluster(nodes, (1.0,) * nodes, None, sizes.fixed_bytes, sizes.bytes_per_expert)
    load = {}
    for name in ("contiguous", "optimized"):
        p = plan(name, sizes.num_layers, sizes.num_experts, sizes.top_k, cluster, planned_on)
        per_layer = observed_max_rank_load(p, measured_on)
        assert per_layer is not None
        load[name] = sum(per_layer) / len(per_layer)
    assert load["optimized"] < load["contiguous"], load
    # the trained routers are skewed: some expert gets well over its even share in every layer
    for layer in range(measured_on.num_layers):
        counts = measured_on.counts_LE[layer]
        assert max(counts) / (sum(counts) / len(counts)) > 1.3


def test_eval_command_prints_perplexity(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(HELD_OUT.read_text()[:3000])
    from cli_runner import run_cli

    out = run_cli("eval", "--model", str(DEMO_MODEL_DIR), "--text", str(text), "--dtype", "fp32", "--window", "128")
    assert out.returncode == 0, out.stderr
    ppl = float(out.stdout.split("perplexity:")[1].split()[0])
    assert 1 < ppl < 1000
    bad = run_cli("eval", "--model", str(DEMO_MODEL_DIR), "--text", str(tmp_path / "missing.txt"))
    assert bad.returncode == 2 and "not found" in bad.stderr


@pytest.mark.multirank
@pytest.mark.slow
def test_demo_command_end_to_end():
    out = subprocess.run(
        [sys.executable, "-m", "moecluster.cli", "demo", "--max-tokens", "24"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "outputs identical: yes" in out.stderr
    assert "max/mean expert load" in out.stderr and "optimized" in out.stderr
    engine = Engine(load_model(DEMO_MODEL_DIR))
    text, _, _ = engine.generate(engine.tokenizer.encode(DEMO_PROMPT), SamplingParams(max_tokens=24, ignore_eos=True))
    assert out.stdout.count(text.strip()) == 2  # both runs printed the 1-process greedy text


def test_eval_quantize_close_to_bf16(tmp_path):
    """eval --quantize: the experts really are int8 / int4 (reported, and the perplexity moves) and stay close."""
    from cli_runner import run_cli  # in process: three interpreter + torch start-ups were most of this test's time

    text = tmp_path / "t.txt"
    text.write_text(HELD_OUT.read_text()[:3000])

    def run(*extra: str) -> dict:
        out = run_cli("eval", "--model", str(DEMO_MODEL_DIR), "--text", str(text), "--window", "128", "--json", *extra)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = run()
    assert base["experts"] == "bf16"
    for fmt, tol in (("int8", 0.01), ("int4", 0.05)):
        got = run("--quantize", fmt)
        assert got["experts"] == fmt and got["tokens_scored"] == base["tokens_scored"]
        assert got["perplexity"] != base["perplexity"]
        assert abs(got["perplexity"] / base["perplexity"] - 1) < tol, (fmt, got["perplexity"], base["perplexity"])
