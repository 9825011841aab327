"""Tests of moecluster.perfmodel: hand-computed arithmetic, monotonicity, memory fit, presets,
profiles, and the `moecluster plan` CLI (JSON, plots, errors)."""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import replace

import pytest

from moecluster.cli import plan as plan_cli
from moecluster.errors import MoeClusterError
from moecluster.perfmodel import routing
from moecluster.perfmodel.network import algorithm_times, allreduce_time, interpolate
from moecluster.perfmodel.predict import Workload, memory_per_node, predict
from moecluster.perfmodel.presets import PRESETS_PATH, NetworkSpec, NodeSpec, load_presets
from moecluster.perfmodel.profile import load_profile, profile_from_dict
from moecluster.perfmodel.shapes import ModelShape, from_hf_config, load_model

PRESETS = load_presets()


def dbrx() -> ModelShape:
    return load_model("dbrx", PRESETS.models)


def toy_node(**kw) -> NodeSpec:
    """1 MB/s memory, effectively infinite FLOPs: every term is bytes / 1e6."""
    base = dict(
        name="toy",
        description="",
        memory_bytes=1e9,
        usable_memory_fraction=1.0,
        mem_bandwidth=1e6,
        mem_efficiency=1.0,
        peak_flops=1e30,
        compute_efficiency=1.0,
        price_usd=1000.0,
        runtime_overhead_bytes=0.0,
        exchange_overhead_s=0.0,
        tcp_extra_latency_s=0.0,
    )
    base.update(kw)
    return NodeSpec(**base)


def toy_net(latency: float = 1e-3, bandwidth: float = 1e6, **kw) -> NetworkSpec:
    base = dict(
        name="toynet",
        description="",
        transport="tcp",
        topology="switched",
        algorithm="auto",
        latency_s=latency,
        bandwidth=bandwidth,
        price_per_node_usd=100.0,
        price_per_link_usd=0.0,
    )
    base.update(kw)
    return NetworkSpec(**base)


def toy_shape() -> ModelShape:
    return ModelShape(
        name="toy",
        model_type="toy",
        num_layers=2,
        num_moe_layers=2,
        d_model=100,
        num_heads=1,
        num_experts=4,
        top_k=1,
        expert_ffn=100,
        vocab_size=1000,
        attn_params=40000,
        kv_elems_per_token=200,
        attn_score_dim=200,
        weight_bytes=1.0,
        act_bytes=1,
    )


# -- shapes ---------------------------------------------------------------------------------


def test_dbrx_counts_by_hand():
    s = dbrx()
    d, f, layers, v = 6144, 10752, 40, 100352
    attn = d * d * 2 + 2 * d * 8 * 128  # q, o + k, v with 8 kv heads of 128
    experts = layers * 16 * 3 * d * f
    replicated = layers * (attn + 2 * d + d * 16) + 2 * v * d + d
    assert s.total_params == experts + replicated
    assert s.total_params / 1e9 == pytest.approx(131.6, abs=0.1)
    assert s.active_params / 1e9 == pytest.approx(35.9, abs=0.1)  # DBRX card: 36B active
    assert s.expert_bytes == 3 * d * f * 2
    assert s.exchange_bytes(1) == 12288  # the paper's 12 KB per expert output
    assert s.kv_bytes_per_token == layers * 2 * 8 * 128 * 2


def test_config_file_matches_preset_and_other_types(tmp_path):
    cfg = PRESETS.models["mixtral-8x7b"]["config"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    from_file = load_model(str(tmp_path), PRESETS.models)
    assert from_file.total_params == load_model("mixtral-8x7b", PRESETS.models).total_params
    assert from_file.total_params / 1e9 == pytest.approx(46.7, abs=0.1)
    ds = load_model("deepseek-v3", PRESETS.models)
    assert ds.num_moe_layers == 58 and ds.total_params / 1e9 == pytest.approx(671, abs=1)
    qwen2 = from_hf_config(
        {
            "model_type": "qwen2_moe",
            "hidden_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "moe_intermediate_size": 32,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "vocab_size": 100,
            "shared_expert_intermediate_size": 128,
            "intermediate_size": 256,
            "mlp_only_layers": [0],
        }
    )
    assert qwen2.num_moe_layers == 3 and qwen2.shared_ffn == 128 and qwen2.dense_ffn == 256


def test_param_counts_match_transformers():
    """Oracle: tiny transformers models on the meta device. We ignore only biases, q/k/latent
    norms and gate scalars, so ours <= HF and within 0.5%; matrices must all be counted."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    small = dict(
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_experts_per_tok=2,
    )
    configs = [
        tf.DbrxConfig(
            d_model=64,
            n_heads=4,
            n_layers=2,
            vocab_size=128,
            max_seq_len=64,
            attn_config={"kv_n_heads": 2, "rope_theta": 10000.0},
            ffn_config={"moe_num_experts": 4, "moe_top_k": 2, "ffn_hidden_size": 32},
        ),
        tf.MixtralConfig(**small, num_key_value_heads=2, num_local_experts=4),
        tf.OlmoeConfig(**small, num_key_value_heads=2, num_experts=8),
        tf.Qwen2MoeConfig(
            **small,
            num_key_value_heads=2,
            moe_intermediate_size=32,
            num_experts=4,
            shared_expert_intermediate_size=48,
            mlp_only_layers=[1],
        ),
        tf.Qwen3MoeConfig(**small, num_key_value_heads=2, head_dim=24, moe_intermediate_size=32, num_experts=4),
        tf.DeepseekV3Config(
            **small,
            num_key_value_heads=4,
            q_lora_rank=16,
            kv_lora_rank=16,
            qk_nope_head_dim=8,
            qk_rope_head_dim=8,
            v_head_dim=8,
            n_routed_experts=8,
            moe_intermediate_size=32,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=1,
            topk_group=1,
        ),
    ]
    for cfg in configs:
        with torch.device("meta"):
            model = tf.AutoModelForCausalLM.from_config(cfg)
        hf = sum(p.numel() for p in model.parameters())
        ours = from_hf_config(cfg.to_dict(), name=cfg.model_type).total_params
        assert 0 <= hf - ours <= 0.005 * hf, (cfg.model_type, hf, ours)


def test_bad_configs_raise():
    with pytest.raises(MoeClusterError, match="unsupported model_type"):
        from_hf_config({"model_type": "llama"})
    with pytest.raises(MoeClusterError, match="num_local_experts"):
        from_hf_config(
            {
                "model_type": "mixtral",
                "hidden_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "intermediate_size": 4,
                "num_experts_per_tok": 1,
                "vocab_size": 10,
            }
        )
    with pytest.raises(MoeClusterError, match="unknown model"):
        load_model("no-such-model", PRESETS.models)


# -- routing --------------------------------------------------------------------------------


def brute_force_max(num_experts: int, top_k: int, world: int) -> float:
    owner = [r for r, g in enumerate(routing.contiguous_groups(num_experts, world)) for _ in range(g)]
    combos = list(itertools.combinations(range(num_experts), top_k))
    return sum(max(sum(owner[e] == r for e in c) for r in range(world)) for c in combos) / len(combos)


def test_one_token_max_is_exact():
    assert routing.contiguous_groups(16, 3) == (6, 5, 5)
    # DBRX on 2 ranks: counts 2/3/4 with weights 784/896/140 of C(16,4) = 1820
    assert routing.uniform_rank_load(16, 4, 1, 2).evaluations == pytest.approx(4816 / 1820)
    for e, k, n in [(16, 4, 4), (8, 2, 3), (10, 3, 4), (6, 6, 2)]:
        assert routing.uniform_rank_load(e, k, 1, n).distinct == pytest.approx(brute_force_max(e, k, n))
    assert routing.uniform_rank_load(16, 4, 1, 1).evaluations == pytest.approx(4)
    assert routing.uniform_rank_load(16, 4, 1, 16).evaluations == pytest.approx(1)


def test_batch_load_close_to_monte_carlo_and_monotone():
    rnd = random.Random(0)
    e, k, n, b = 16, 4, 4, 8
    owner = [r for r, g in enumerate(routing.contiguous_groups(e, n)) for _ in range(g)]
    evals = distinct = 0
    trials = 3000
    for _ in range(trials):
        pairs, held = [0] * n, [set() for _ in range(n)]
        for _ in range(b):
            for ex in rnd.sample(range(e), k):
                pairs[owner[ex]] += 1
                held[owner[ex]].add(ex)
        evals += max(pairs)
        distinct += max(len(h) for h in held)
    load = routing.uniform_rank_load(e, k, b, n)
    assert load.evaluations == pytest.approx(evals / trials, rel=0.04)
    assert load.distinct == pytest.approx(distinct / trials, rel=0.04)
    loads = [routing.uniform_rank_load(16, 4, t, 2) for t in (1, 2, 4, 16, 64, 256)]
    assert all(a.evaluations <= b.evaluations for a, b in zip(loads, loads[1:]))
    assert all(a.distinct <= b.distinct + 1e-9 for a, b in zip(loads, loads[1:]))
    assert routing.expected_distinct_experts(16, 4, 3) == pytest.approx(16 * (1 - 0.75**3))


# -- network --------------------------------------------------------------------------------


def test_allreduce_arithmetic():
    m, a, b = 12288, 10e-6, 1e9
    t = algorithm_times(4, m, a, b)
    assert t["ring"] == pytest.approx(6 * (a + m / 4 / b))
    assert t["recursive_doubling"] == pytest.approx(2 * (a + m / b))
    assert t["rabenseifner"] == pytest.approx(4 * a + 1.5 * m / b)
    assert algorithm_times(3, m, a, b)["recursive_doubling"] == pytest.approx(3 * (a + m / b))
    assert allreduce_time(1, m, a, b) == (0.0, "none")
    assert allreduce_time(4, m, a, b)[1] == "recursive_doubling"  # small message
    assert allreduce_time(4, 1e9, a, b)[1] in ("ring", "rabenseifner")  # large message
    assert allreduce_time(4, m, a, b, mesh=True)[1] == "direct"
    assert allreduce_time(4, m, a, b, algorithm="ring")[0] == pytest.approx(t["ring"])


def test_interpolate():
    pts = [(100.0, 1.0), (200.0, 2.0), (400.0, 3.0)]
    assert interpolate(pts, 10) == 1.0
    assert interpolate(pts, 150) == pytest.approx(1.5)
    assert interpolate(pts, 600) == pytest.approx(4.0)
    assert interpolate([(1.0, 5.0)], 99) == 5.0


# -- predictions ----------------------------------------------------------------------------


def test_decode_step_by_hand():
    shape, node, wl = toy_shape(), toy_node(), Workload(batch=1, context=1, prompt=1)
    p1 = predict(shape, node, toy_net(), 1, wl)
    assert p1.step.attention == pytest.approx(2 * (40000 + 200) / 1e6)
    assert p1.step.router == pytest.approx(2 * 400 / 1e6)
    assert p1.step.experts == pytest.approx(2 * 30000 / 1e6)  # top-1: one expert per layer
    assert p1.step.head == pytest.approx((100000 + 200) / 1e6)
    assert p1.step.sampling == pytest.approx(3 * 1000 * 4 / 1e6)
    assert p1.step.exchange == 0.0
    assert p1.step.total == pytest.approx(0.2534)
    p2 = predict(shape, node, toy_net(), 2, wl)
    # 100-byte message, 2 ranks: recursive doubling, 1 step of 1 ms + 100 B / 1 MB/s, per layer
    assert p2.algorithm == "recursive_doubling"
    assert p2.step.exchange == pytest.approx(2 * 1.1e-3)
    # + rank 0's token broadcast: 16 bytes (token, done), 1 step of 1 ms + 16 B / 1 MB/s
    assert p2.step.sampling == pytest.approx(3 * 1000 * 4 / 1e6 + 1.016e-3)
    assert p2.tokens_per_s == pytest.approx(1 / (0.2534 + 2.2e-3 + 1.016e-3))
    assert p2.price_usd == 2 * 1000 + 2 * 100
    tcp = predict(shape, toy_node(tcp_extra_latency_s=1e-3, exchange_overhead_s=5e-4), toy_net(), 2, wl)
    assert tcp.step.exchange == pytest.approx(2 * (2.1e-3 + 5e-4))
    rdma = predict(shape, toy_node(tcp_extra_latency_s=1e-3), toy_net(transport="rdma"), 2, wl)
    assert rdma.step.exchange == pytest.approx(2 * 1.1e-3)


def test_monotonicity():
    shape, node = dbrx(), PRESETS.node("m2-ultra-192")
    for batch in (1, 8):
        wl = Workload(batch=batch)
        for n in (2, 3, 4, 8):
            lat = [
                predict(shape, node, toy_net(latency=x, bandwidth=1.25e9), n, wl).tokens_per_s
                for x in (1e-6, 1e-5, 1e-4, 1e-3)
            ]
            assert all(a >= b for a, b in zip(lat, lat[1:]))
            bw = [
                predict(shape, node, toy_net(latency=1e-5, bandwidth=x), n, wl).tokens_per_s
                for x in (1e8, 1e9, 1e10, 1e11)
            ]
            assert all(a <= b for a, b in zip(bw, bw[1:]))
            mem = [
                predict(shape, replace(node, mem_efficiency=e), toy_net(), n, wl).tokens_per_s for e in (0.3, 0.6, 0.9)
            ]
            assert all(a <= b for a, b in zip(mem, mem[1:]))
    for name in PRESETS.models:
        shape = load_model(name, PRESETS.models)
        mem = [memory_per_node(shape, node, n, Workload()).total for n in range(1, 40)]
        assert all(a >= b for a, b in zip(mem, mem[1:])), name


def test_memory_fit_edges():
    shape, wl = toy_shape(), Workload(batch=2, context=10)
    need = memory_per_node(shape, toy_node(), 2, wl).total
    # replicated + 2 experts x 2 layers + KV (2 x 10 tokens x 2 layers x 200 x 1 byte)
    assert need == shape.replicated_bytes + 2 * 2 * 30000 + 2 * 10 * 2 * 200
    assert predict(shape, toy_node(memory_bytes=need), toy_net(), 2, wl).memory.fits
    over = predict(shape, toy_node(memory_bytes=need - 1), toy_net(), 2, wl)
    assert not over.memory.fits and "does not fit" in over.notes[0]
    half = predict(shape, toy_node(memory_bytes=need, usable_memory_fraction=0.5), toy_net(), 2, wl)
    assert not half.memory.fits


def test_paper_regime_is_sane():
    """DBRX bf16 on M2 Ultras over 10GbE: paper measured single-digit to low-teens tok/s."""
    shape, node, net = dbrx(), PRESETS.node("m2-ultra-192"), PRESETS.network("10gbe")
    preds = {n: predict(shape, node, net, n) for n in (1, 2, 4)}
    assert not preds[1].memory.fits and preds[2].memory.fits and preds[4].memory.fits
    for n in (2, 4):
        assert 5 < preds[n].tokens_per_s < 20
        assert 0.03 < preds[n].comm_share < 0.4
    assert preds[4].comm_share > preds[2].comm_share
    assert preds[2].ttft_s > 0 and preds[2].prefill.total > preds[2].step.total


def test_expert_load_and_profile_overrides():
    shape, node, net = dbrx(), PRESETS.node("m2-ultra-192"), PRESETS.network("10gbe")
    base = predict(shape, node, net, 2)
    heavier = predict(shape, node, net, 2, expert_load_per_layer=4.0)
    assert heavier.step.experts > base.step.experts and heavier.load.distinct == 4.0
    with pytest.raises(MoeClusterError, match="MoE layers"):
        predict(shape, node, net, 2, expert_load_per_layer=[1.0, 2.0])
    prof = profile_from_dict(
        {
            "format": "moecluster-profile",
            "version": 1,
            "network": "10gbe",
            "times_s": {
                "attention_per_layer": [[1, 0.001], [4, 0.002]],
                "expert_eval": 0.0005,
                "head": 0.003,
                "sampling": 0.0001,
            },
            "memory_efficiency": 0.5,
            "allreduce": {"2": [[1000, 1e-4], [100000, 2e-4]]},
        }
    )
    p = predict(shape, node, net, 2, profile=prof)
    assert p.step.attention == pytest.approx(40 * 0.001)
    assert p.step.experts == pytest.approx(40 * base.load.distinct * 0.0005)
    assert p.step.exchange == pytest.approx(40 * (1e-4 + 1e-4 * (12288 - 1000) / 99000))
    assert p.step.head == 0.003 and p.algorithm == "measured"
    other = predict(shape, node, PRESETS.network("ib-200g"), 2, profile=prof)
    assert other.algorithm != "measured"  # the table belongs to 10gbe only
    assert predict(shape, node, net, 4, profile=prof).algorithm != "measured"  # measured at N=2 only


# -- presets and profiles -------------------------------------------------------------------


def test_every_preset_number_has_a_source():
    raw = json.loads(PRESETS_PATH.read_text())

    def walk(obj, path):
        if isinstance(obj, dict):
            if "value" in obj:
                assert isinstance(obj.get("source"), str) and obj["source"].strip(), path
                return
            for k, v in obj.items():
                if k != "models":
                    walk(v, f"{path}.{k}")
        elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
            pytest.fail(f"bare number without a source at {path}")

    for section in ("nodes", "networks", "systems"):
        walk(raw[section], section)
    assert all(m.get("source") for m in raw["models"].values())
    for name in ("m2-ultra-192", "m3-ultra-256", "m3-ultra-512", "m4-pro-mini-64", "h100-sxm-80"):
        assert name in PRESETS.nodes
    for name in ("10gbe", "rocev2-25g", "ib-100g", "ib-200g", "tb4-ip", "tb5-ip", "tb5-rdma"):
        assert name in PRESETS.networks
    assert PRESETS.node("m2-ultra-192").mem_bandwidth == 800e9


def test_extra_presets_and_unknown_names(tmp_path):
    extra = tmp_path / "p.json"
    entry = json.loads(PRESETS_PATH.read_text())["networks"]["10gbe"]
    entry["latency_us"] = {"value": 500, "source": "test"}
    extra.write_text(json.dumps({"networks": {"slow": entry}}))
    presets = load_presets(extra)
    assert presets.network("slow").latency_s == pytest.approx(5e-4)
    with pytest.raises(MoeClusterError, match="unknown network preset"):
        presets.network("nope")
    extra.write_text(json.dumps({"nodes": {"bad": {"memory_gib": 4}}}))
    with pytest.raises(MoeClusterError, match="bad"):
        load_presets(extra)


@pytest.mark.parametrize(
    "data, match",
    [
        ({"format": "x", "version": 1}, "format"),
        ({"format": "moecluster-profile", "version": 9}, "version"),
        ({"format": "moecluster-profile", "version": 1, "times_s": {"attn": 1}}, "unknown times_s"),
        ({"format": "moecluster-profile", "version": 1, "times_s": {"head": -1}}, ">= 0"),
        ({"format": "moecluster-profile", "version": 1, "times_s": {"head": [[1, 2, 3]]}}, r"\[x, seconds\]"),
        ({"format": "moecluster-profile", "version": 1, "allreduce": {"2": [[1, 1e-5]]}}, "network"),
        ({"format": "moecluster-profile", "version": 1, "network": "n", "allreduce": {"1": [[1, 1]]}}, "world size"),
    ],
)
def test_malformed_profiles(data, match):
    with pytest.raises(MoeClusterError, match=match):
        profile_from_dict(data)


def test_profile_round_trip(tmp_path):
    prof = profile_from_dict(
        {
            "format": "moecluster-profile",
            "version": 1,
            "network": "10gbe",
            "model": "dbrx",
            "times_s": {"router_per_layer": 2e-5},
            "allreduce": {"2": [[10, 1e-5], [1000, 2e-5]]},
        }
    )
    path = tmp_path / "prof.json"
    path.write_text(json.dumps(prof.to_dict()))
    again = load_profile(path)
    assert again.times == prof.times and again.allreduce == prof.allreduce
    path.write_text("{not json")
    with pytest.raises(MoeClusterError, match="not valid JSON"):
        load_profile(path)


# -- CLI ------------------------------------------------------------------------------------


def plan_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plan_cli.register(parser.add_subparsers())
    return parser.parse_args(["plan", *argv])


def test_plan_json_and_plots(tmp_path, capsys):
    args = plan_args(
        "--model",
        "dbrx",
        "--node",
        "m2-ultra-192",
        "--nodes",
        "1-4",
        "--network",
        "10gbe,rocev2-25g,ib-200g",
        "--compare",
        "8xh100:120:300000",
        "--plot-dir",
        str(tmp_path / "plots"),
        "--json",
    )
    assert plan_cli.run_plan(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["configs"]) == 12
    c = report["configs"][1]
    for key in (
        "network",
        "nodes",
        "fits",
        "decode_tok_s",
        "breakdown_ms",
        "shares",
        "comm_share",
        "memory_gb",
        "ttft_s",
        "price_usd",
        "tok_s_per_1000usd",
        "vs_reference",
        "notes",
    ):
        assert key in c
    assert report["compare"]["tok_s_per_1000usd"] == pytest.approx(0.4)
    assert len(report["plots"]) == 3
    for p in report["plots"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plan_table_and_system_compare(capsys):
    assert plan_cli.run_plan(plan_args("--nodes", "2,4", "--compare", "8xh100", "--no-plots")) == 0
    out = capsys.readouterr().out
    assert "tok/s/$1k" in out and "reference 8xh100" in out and "10gbe" in out


def test_plan_with_profile_file(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(
        json.dumps(
            {
                "format": "moecluster-profile",
                "version": 1,
                "network": "10gbe",
                "times_s": {"attention_per_layer": 0.0004, "expert_eval": [[1, 0.00075], [4, 0.0008]]},
                "allreduce": {"2": [[12288, 0.0006], [98304, 0.0007]]},
            }
        )
    )
    report = plan_cli.build_report(plan_args("--profile", str(path), "--nodes", "2,4", "--no-plots"))
    two, four = report["configs"]
    assert report["profile"] and two["network"] == "10gbe"  # network defaults to the profile's
    assert two["exchange_algorithm"] == "measured" and four["exchange_algorithm"] != "measured"
    assert two["breakdown_ms"]["exchange"] == pytest.approx(40 * 0.6)
    assert two["breakdown_ms"]["attention"] == pytest.approx(40 * 0.4)


def test_plan_errors():
    for argv, match in [
        (("--node", "nope"), "unknown node preset"),
        (("--network", "10gbe,warp"), "unknown network preset"),
        (("--nodes", "4-2"), "bad --nodes"),
        (("--nodes", "x"), "bad --nodes"),
        (("--compare", "h100:abc:1"), "bad --compare"),
        (("--profile", "/nonexistent/p.json"), "cannot read profile"),
        (("--batch", "0"), ">= 1"),
    ]:
        with pytest.raises(MoeClusterError, match=match):
            plan_cli.build_report(plan_args(*argv, "--no-plots"))


def test_cli_wiring(capsys):
    from moecluster import cli

    assert cli.main(["plan", "--nodes", "2", "--no-plots", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["configs"][0]["nodes"] == 2
    assert cli.main(["plan", "--model", "nope", "--no-plots"]) == 2
    assert "unknown model" in capsys.readouterr().err


# -- engines, stacks, parallelism (issue 18) ------------------------------------------------


def test_engines_name_every_prediction_and_the_paper_stack_reproduces_the_paper():
    from moecluster.perfmodel.stackfit import PAPER_SCENARIO, fit_stack

    mac = PRESETS.node("m2-ultra-192")
    assert PRESETS.resolve(mac).engine == "mlx-metal"
    assert PRESETS.resolve(PRESETS.node("linux-2core")).engine == "torch-cpu"
    cpu = PRESETS.resolve(mac, "torch-cpu")
    assert cpu.mem_efficiency == pytest.approx(0.39) and cpu.engine == "torch-cpu"
    with pytest.raises(MoeClusterError, match="no efficiency terms"):
        PRESETS.resolve(PRESETS.node("linux-2core"), "mlx-metal")
    shape, net = dbrx(), PRESETS.network(PAPER_SCENARIO["network"])
    node = PRESETS.resolve(mac, stack="paper-python-grpc")
    assert node.exchange_overhead_s == pytest.approx(860e-6) and node.per_expert_overhead_s == pytest.approx(305e-6)
    for n, (toks, share) in PAPER_SCENARIO["points"].items():  # the seed scenario within 15%
        p = predict(shape, node, net, n)
        assert p.engine == "mlx-metal+paper-python-grpc"
        assert p.tokens_per_s == pytest.approx(toks, rel=0.15) and p.comm_share == pytest.approx(share, rel=0.15)
    fit = fit_stack(shape, PRESETS.resolve(mac, "mlx-metal"), net, PAPER_SCENARIO["points"])
    assert fit["exchange_overhead_s"] == pytest.approx(860e-6, rel=0.01)  # the preset is this derivation, rounded
    assert fit["per_expert_overhead_s"] == pytest.approx(305e-6, rel=0.01)


def test_per_expert_overhead_by_hand():
    shape, wl = toy_shape(), Workload(batch=1, context=1, prompt=1)
    p = predict(shape, toy_node(per_expert_overhead_s=1e-3), toy_net(), 1, wl)
    assert p.step.experts == pytest.approx(2 * (30000 / 1e6 + 1e-3))  # 2 layers x (1 expert + 1 ms)


def test_parallelism_by_hand():
    from moecluster.perfmodel.parallel import Layout, layouts, parse_parallelism, predict_layout

    shape, node, net, wl = toy_shape(), toy_node(), toy_net(), Workload(batch=1, context=1, prompt=1)
    one = predict(shape, node, net, 1, wl)
    tp = predict_layout(shape, node, net, Layout(tp=2), wl)
    assert tp.parallelism == "tp"
    assert tp.step.attention == pytest.approx(2 * (40000 + 200) / 2 / 1e6)  # half the weights and KV
    assert tp.step.experts == pytest.approx(2 * 30000 / 2 / 1e6)  # half of the one active expert
    assert tp.step.head == pytest.approx(one.step.head)  # lm_head not split
    # two all-reduces per layer of 100 bytes over 2 ranks: 1 step of 1 ms + 100 B / 1 MB/s each
    assert tp.step.exchange == pytest.approx(2 * 2 * 1.1e-3)
    pp = predict_layout(shape, node, net, Layout(pp=2), wl)
    assert pp.step.attention + pp.step.experts == pytest.approx(one.step.attention + one.step.experts)
    assert pp.step.exchange == pytest.approx(1.1e-3)  # one hop between the two stages
    assert pp.memory.experts == pytest.approx(one.memory.experts / 2)  # one of two layers per stage
    ep = predict_layout(shape, node, net, Layout(ep=2), wl)
    assert ep.step.total == pytest.approx(predict(shape, node, net, 2, wl).step.total)  # EP is predict
    assert [x.name for x in layouts(parse_parallelism("all"), 4)] == ["ep", "tp", "pp", "ep2xtp2", "pp2xep2"]
    assert [x.name for x in layouts(["ep+tp"], 3)] == []  # 3 has no split
    with pytest.raises(MoeClusterError, match="--parallelism"):
        parse_parallelism("ep,zz")


def test_plan_parallelism_compare_validate_and_plots(tmp_path, capsys):
    csv = tmp_path / "measured.csv"
    csv.write_text("nodes,tok_s,network,parallelism,batch,label\n2,6.1,10gbe,ep,1,paper\n4,7.0,,ep,,paper\n")
    args = plan_args(
        "--nodes",
        "1-4",
        "--parallelism",
        "ep,tp,pp,ep+tp",
        "--stack",
        "paper-python-grpc",
        "--compare",
        "8xh100",
        "--validate",
        str(csv),
        "--measured",
        str(csv),
        "--plot-dir",
        str(tmp_path / "plots"),
        "--json",
    )
    assert plan_cli.run_plan(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"]["name"] == "mlx-metal+paper-python-grpc" and report["engine"]["sources"]
    for n in (2, 3, 4):
        rows = [c for c in report["configs"] if c["nodes"] == n]
        assert sum(c["best"] for c in rows) == 1
    val = report["validation"]
    assert [abs(r["error"]) < 0.15 for r in val] == [True, True]
    ref = report["compare"]
    assert [r["batch"] for r in ref["batches"]] == [1, 256] and "max_num_seqs" in ref["batch_source"]
    assert ref["batches"][1]["tok_s"] > ref["batches"][0]["tok_s"] and ref["cluster"]
    assert any(p.endswith("parallelism_10gbe.png") for p in report["plots"])
    plan_cli.run_plan(
        plan_args("--nodes", "2", "--parallelism", "all", "--compare", "8xh100", "--no-plots", "--validate", str(csv))
    )
    out = capsys.readouterr().out
    assert "engine mlx-metal" in out and "validation" in out and "normally run at batch 256" in out
    csv.write_text("nodes,speed\n2,3\n")
    with pytest.raises(MoeClusterError, match="tok_s"):
        plan_cli.build_report(plan_args("--validate", str(csv), "--no-plots"))


def test_measured_rows_name_a_layout_or_a_kind_and_match_their_configuration(tmp_path, capsys):
    from moecluster.perfmodel import plots

    csv = tmp_path / "measured.csv"
    csv.write_text("nodes,tok_s,parallelism\n4,5.5,ep+tp\n2,6.0,ep\n1,3.0,\n")
    report = plan_cli.build_report(plan_args("--nodes", "1-4", "--parallelism", "ep,ep+tp", "--validate", str(csv)))
    assert [r["parallelism"] for r in report["validation"]] == ["ep2xtp2", "ep", "single"]
    print(plan_cli.format_table(report))
    errs = sorted(abs(r["error"]) for r in report["validation"])
    assert f"median |error| {100 * errs[1]:.1f}%" in capsys.readouterr().out  # the middle row, not the upper
    rows = plan_cli.read_measured(str(csv))
    by_name = {(c["nodes"], c["parallelism"]): c for c in report["configs"]}
    assert plots._same_config(rows[0], by_name[(4, "ep2xtp2")]) and not plots._same_config(rows[0], by_name[(4, "ep")])
    assert plots._same_config(rows[2], by_name[(1, "single")])
    price = {(c["network"], c["nodes"], c["parallelism"]): c["price_usd"] for c in report["configs"]}
    assert plots._match_price(rows[1], price) == by_name[(2, "ep")]["price_usd"]
    csv.write_text("nodes,tok_s,parallelism\n3,5.5,ep+tp\n")  # 3 nodes have no ep x tp split
    with pytest.raises(MoeClusterError, match="not a layout of 3 nodes"):
        plan_cli.build_report(plan_args("--nodes", "3", "--validate", str(csv)))


def test_tensor_and_pipeline_layouts_use_the_expert_parallel_profile():
    from moecluster.perfmodel.parallel import Layout, predict_layout, profiled_step

    shape, node, net = dbrx(), PRESETS.node("m2-ultra-192"), PRESETS.network("10gbe")
    prof = profile_from_dict(
        {
            "format": "moecluster-profile",
            "version": 1,
            "network": "10gbe",
            "times_s": {"attention_per_layer": 0.002, "expert_eval": 0.0005, "head": 0.003, "sampling": 0.0001},
            "exchange_overhead_s": 5e-5,
            "allreduce": {"2": [[16, 5e-5], [100000, 2e-4]]},
        }
    )
    wl = Workload(batch=1)
    ep = predict(shape, node, net, 2, wl, prof)
    assert profiled_step(shape, node, net, Layout(ep=2), wl, prof).total == pytest.approx(ep.step.total)
    tp = predict_layout(shape, node, net, Layout(tp=2), wl, prof)
    assert tp.step.attention == pytest.approx(40 * 0.002 / 2)
    distinct = routing.uniform_rank_load(16, 4, 1, 1).distinct  # every selected expert, half of each
    assert tp.step.experts == pytest.approx(40 * distinct * 0.0005 / 2)
    one_ar = 5e-5 + (2e-4 - 5e-5) * (12288 - 16) / (100000 - 16) + 5e-5  # table + in-engine overhead
    assert tp.step.exchange == pytest.approx(40 * 2 * one_ar)
    pp = predict_layout(shape, node, net, Layout(pp=2), wl, prof)
    assert pp.step.attention == pytest.approx(40 * 0.002) and pp.step.exchange == pytest.approx(one_ar)
    assert any("profile" in n for n in tp.notes)
