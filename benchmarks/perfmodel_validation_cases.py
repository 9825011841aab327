"""Extra cases of benchmarks/perfmodel_validation.py: the trained demo model's real routing, and the
tensor-/pipeline-parallel splits the engine cannot run (predictions and what a measurement needs).

Demo case (issue 14 item 5): the routing of the very prompts the measuring jobs decode is recorded with
`moecluster profile-routing`, an optimized placement is derived from it with `moecluster place
--strategy optimized`, and both that placement and contiguous are measured on 2 ranks. The model
predicts each from the calibrated profile and the slowest rank's expert load under that placement,
computed from the recorded routing distribution (per-layer activation frequencies, sampled), not from
uniform routing.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

DEMO = "demo"
PLACEMENTS = ("contiguous", "optimized")


def demo_prompts(model: Path, batch: int, length: int) -> list[str]:
    """The measuring jobs' B prompts (calibration.measure.prompt_ids) as text, one per line."""
    from moecluster.calibration.measure import prompt_ids
    from moecluster.loading import load_model

    loaded = load_model(str(model))
    tok = loaded.tokenizer
    return [tok.decode(ids).replace("\n", " ") for ids in prompt_ids(tok, batch, length, loaded.shape.vocab_size)]


def prepare_demo(model: Path, out_dir: Path, batch: int, prompt_len: int, tokens: int) -> dict:
    """Record the demo model's routing on the measured prompts, derive the optimized 2-rank placement.
    Returns {'stats', 'placement', 'commands'} (paths and the commands run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts, stats, placement = out_dir / "prompts.txt", out_dir / "routing.json", out_dir / "placement.json"
    prompts.write_text("\n".join(demo_prompts(model, batch, prompt_len)) + "\n")
    cli = [sys.executable, "-m", "moecluster.cli"]
    commands = [
        ["profile-routing", "--model", str(model), "--prompts", str(prompts), "--out", str(stats)]
        + ["--max-tokens", str(tokens)],
        ["place", "--model", str(model), "--nodes", "2", "--strategy", "optimized", "--stats", str(stats)]
        + ["--out", str(placement)],
    ]
    for cmd in commands:
        subprocess.run(cli + cmd, check=True, stdout=subprocess.DEVNULL)
    return {
        "stats": str(stats),
        "placement": str(placement),
        "commands": ["moecluster " + " ".join(c) for c in commands],
    }


def routing_load(model: Path, demo: dict, placement: str, ranks: int, batch: int) -> dict:
    """Slowest rank's expert load per MoE layer under `placement`, from the recorded routing's
    activation frequencies (2048 sampled tokens per layer, steps of `batch` tokens)."""
    from moecluster.parallel.placement import make_placement
    from moecluster.planning.placement_metrics import placement_metrics, trace_from_stats
    from moecluster.planning.routing_stats import RoutingStats

    stats = RoutingStats.load(demo["stats"])
    spec = demo["placement"] if placement == "optimized" and ranks > 1 else "contiguous"
    place = make_placement(spec, stats.num_experts, stats.num_layers, ranks)
    metrics = placement_metrics(place, trace_from_stats(stats, 2048, recorded=False), batch)
    skew = [max(c) * stats.num_experts / max(sum(c), 1) for c in stats.counts_LE]
    return {
        "distinct_L": [m.step_max_experts for m in metrics],
        "pairs_L": [m.step_max_pairs for m in metrics],
        "skew_L": skew,
    }


def measured_distinct(results: list[dict], layers: int, top_k: int) -> dict[str, float]:
    """Mean over traced runs of the slowest rank's distinct experts per layer, per batch."""
    from moecluster.perfmodel.calibrate import batch_terms

    out: dict[str, list[float]] = {}
    for res in results:
        for b, r in res["batches"].items():
            out.setdefault(b, []).append(batch_terms(r, layers, top_k)["distinct_max_rank_per_layer"])
    return {b: statistics.fmean(v) for b, v in out.items()}


def format_demo(data: dict) -> str:
    """The demo case: routing skew, placements, measured vs predicted load and tok/s."""
    d = data.get("demo")
    if not d:
        return ""
    cells = [c for c in data["cells"] if c["shape"] == DEMO]
    lines = [
        "## The trained demo model's real routing: optimized vs contiguous placement",
        "",
        "Model: the built-in demo model (`src/moecluster/demo_model`, Qwen3-MoE style, 8 experts, top-2, 4 layers). "
        "Its routing on the prompts the measuring jobs decode was recorded and the placement derived from it:",
        "",
        *[f"    {c}" for c in d["commands"]],
        "",
        "Routing skew (busiest expert's activations / the even share), per layer: "
        + ", ".join(f"{s:.2f}" for s in d["skew_L"])
        + ". The model predicts each placement from the demo's calibration (contiguous, delay 0) with the "
        "slowest rank's distinct experts and (token, expert) pairs per layer computed from the recorded "
        "routing distribution under that placement (`placement_metrics` over 2048 tokens sampled from the "
        "per-layer activation frequencies), not from uniform routing.",
        "",
        "| placement | ranks | batch | slowest rank's experts/layer: measured | predicted | measured tok/s (runs) "
        "| predicted tok/s | error % | other load % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        runs = ", ".join(f"{t:.1f}" for t in c["runs_tok_s"])
        meas = d["measured_distinct"].get(c["placement"], {}).get(str(c["batch"])) if c["ranks"] > 1 else None
        lines.append(
            f"| {c['placement'] if c['ranks'] > 1 else '(all on one rank)'} | {c['ranks']} | {c['batch']} | "
            f"{'-' if meas is None else f'{meas:.2f}'} | {statistics.fmean(c['load']['distinct_L']):.2f} | "
            f"{c['measured_tok_s']:.2f} ({runs}) | {c['predicted_tok_s']:.2f} | {c['error_pct']:+.1f} | "
            f"{100 * c['foreign_cpu']:.0f} |"
        )
    return "\n".join(lines)


def tp_pp_section(data: dict, shapes: dict[str, Path], node, net) -> str:
    """Why the 1-rank vs 2-rank tensor-/pipeline-parallel splits are not measured, and what the model
    predicts for them on the validation shapes from each shape's expert-parallel calibration."""
    from moecluster.perfmodel.parallel import Layout, predict_layout
    from moecluster.perfmodel.predict import Workload
    from moecluster.perfmodel.presets import load_presets
    from moecluster.perfmodel.profile import profile_from_dict
    from moecluster.perfmodel.shapes import load_model

    presets = load_presets()
    lines = [
        "## Tensor- and pipeline-parallel splits: not measurable with this engine",
        "",
        "moecluster's engine is expert-parallel only: `parallel/expert_parallel.py` swaps each MoE layer's "
        "RoutedExperts for a rank-local subset and every rank runs every layer's attention, router, norms and "
        "the head. It has no way to run a layer range on one rank (pipeline) or a slice of every weight "
        "matrix (tensor), so no 2-rank PP or TP cell can be measured here. What a measurement would need:",
        "",
        "- PP (llama.cpp RPC, exo's pipeline mode): ranks that load only layers [a, b) (and the embedding on "
        "the first, norm + lm_head on the last), a point-to-point send of the B x D hidden state per stage "
        "boundary per step, and the sampled tokens sent back to the first stage; a 1-rank vs 2-rank run on "
        "the emulated link would then time the hop and the (absent) speedup at batch 1.",
        "- TP (exo, mlx-lm): attention split by heads (q/k/v column-, o row-parallel, KV cache by heads), "
        "every expert's gate/up column- and down row-parallel over the ranks, the router and head replicated, "
        "and an all-reduce of B x D after attention and after each MoE/MLP layer.",
        "",
        "The model's predictions for those splits at delay 0 from each shape's calibration (the expert-parallel "
        "profile's per-layer terms split as the layout splits them: attention, dense MLPs and every selected "
        "expert's work halved by TP with two all-reduces per layer; PP running every layer with one hop, timed "
        "from the profile's 2-rank all-reduce table; `perfmodel/parallel.py: profiled_step`), next to the same "
        "profile's 1-rank and EP predictions and the measured cells; error only where measured (the demo's EP "
        "row is uniform routing, contiguous placement):",
        "",
        "| shape | batch | layout | ranks | predicted tok/s | measured tok/s | error % |",
        "|---|---|---|---|---|---|---|",
    ]
    measured = {
        (c["shape"], c["ranks"], c["batch"]): c["measured_tok_s"]
        for c in data["cells"]
        if c["placement"] == "contiguous" and (c["delay_us"] in (None, 0.0))
    }
    for name, path in shapes.items():
        shape = load_model(str(path), presets.models)
        profile = profile_from_dict(data["profiles"][name])
        for b in sorted({c["batch"] for c in data["cells"]}):
            wl = Workload(batch=b, context=max(1, int(profile.meta.get("context", 32))), prompt=16)
            for lay in (Layout(), Layout(ep=2), Layout(pp=2), Layout(tp=2)):
                pred = predict_layout(shape, node, net, lay, wl, profile).tokens_per_s
                got = measured.get((name, lay.nodes, b)) if lay.tp == lay.pp == 1 else None
                err = "-" if got is None else f"{100 * (pred / got - 1):+.1f}"
                shown = "not measurable" if lay.tp > 1 or lay.pp > 1 else "-" if got is None else f"{got:.2f}"
                lines.append(f"| {name} | {b} | {lay.name} | {lay.nodes} | {pred:.2f} | {shown} | {err} |")
    lines += [
        "",
        "The PP and TP rows are what a measurement would be compared against; TP's split of per-layer "
        "framework time (part of the measured attention term) by 2 is optimistic on a machine where that time "
        "does not shrink with the weights.",
    ]
    return "\n".join(lines)
