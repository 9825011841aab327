"""`moecluster plan`: predict tokens/s, memory fit and tokens/s per dollar across node counts and networks."""

from __future__ import annotations

import argparse
import json
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.predict import Prediction, Workload, predict
from moecluster.perfmodel.presets import Presets, load_presets
from moecluster.perfmodel.profile import load_profile
from moecluster.perfmodel.shapes import DTYPE_BYTES, ModelShape, load_model

MAX_NODES = 1024


def parse_nodes(spec: str) -> list[int]:
    """'1-8', '2,4,8' or '1-4,8' -> sorted unique node counts."""
    out: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo_s, hi_s = part.split("-", 1)
                lo, hi = int(lo_s), int(hi_s)
            else:
                lo = hi = int(part)
        except ValueError:
            raise MoeClusterError(
                f"bad --nodes {spec!r}: use a count, a range like 1-8, or a list like 2,4,8") from None
        if lo < 1 or hi < lo or hi > MAX_NODES:
            raise MoeClusterError(f"bad --nodes range {part!r}: need 1 <= low <= high <= {MAX_NODES}")
        out.update(range(lo, hi + 1))
    return sorted(out)


def parse_compare(spec: str, presets: Presets) -> dict[str, Any]:
    """'NAME:TOKS:PRICE_USD' or a system preset name -> {'name', 'tok_s', 'price_usd', ...}."""
    if spec in presets.systems:
        return {"name": spec, "system": presets.systems[spec]}
    parts = spec.split(":")
    if len(parts) != 3:
        raise MoeClusterError(
            f"bad --compare {spec!r}: use NAME:TOKENS_PER_S:PRICE_USD (e.g. 8xh100:120:300000) "
            f"or a system preset ({', '.join(sorted(presets.systems))})"
        )
    try:
        toks, price = float(parts[1]), float(parts[2])
    except ValueError:
        raise MoeClusterError(f"bad --compare {spec!r}: throughput and price must be numbers") from None
    if toks <= 0 or price <= 0:
        raise MoeClusterError(f"bad --compare {spec!r}: throughput and price must be > 0")
    return {"name": parts[0] or "reference", "tok_s": toks, "price_usd": price}


def _reference(ref: dict[str, Any], presets: Presets, shape: ModelShape, wl: Workload) -> dict[str, Any]:
    """Rate the reference system: given numbers, or predicted by this model for a system preset."""
    if "system" not in ref:
        return {**ref, "source": "given", "tok_s_per_1000usd": ref["tok_s"] / (ref["price_usd"] / 1000)}
    sys = ref["system"]
    pred = predict(shape, presets.node(sys.node), presets.network(sys.network), sys.nodes, wl,
                   price_usd=sys.price_usd)
    return {
        "name": sys.name, "source": f"predicted: {sys.nodes} x {sys.node} on {sys.network}",
        "tok_s": pred.tokens_per_s, "price_usd": sys.price_usd, "fits": pred.memory.fits,
        "tok_s_per_1000usd": pred.tokens_per_s_per_1000usd, "price_source": sys.sources.get("price_usd", ""),
    }


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (network, nodes) prediction for the parsed arguments; JSON-ready dict."""
    presets = load_presets(args.presets)
    shape = load_model(args.model, presets.models)  # a quantized checkpoint's config sets its expert bytes
    shape = shape.with_dtype(args.dtype) if args.dtype else shape
    node = presets.node(args.node)
    profile = load_profile(args.profile) if args.profile else None
    networks = args.network or (profile.network if profile and profile.network else "10gbe")
    net_specs = [presets.network(n.strip()) for n in networks.split(",") if n.strip()]
    if not net_specs:
        raise MoeClusterError("--network is empty; name at least one network preset")
    wl = Workload(batch=args.batch, context=args.context, prompt=min(args.prompt, args.context))
    preds: list[Prediction] = [
        predict(shape, node, net, n, wl, profile, args.expert_load,
                expert_distinct_per_layer=args.expert_distinct)
        for net in net_specs for n in parse_nodes(args.nodes)
    ]
    report: dict[str, Any] = {
        "model": shape.summary(),
        "node": {"name": node.name, "description": node.description,
                 "usable_memory_gb": node.usable_memory_bytes / 1e9, "price_usd": node.price_usd},
        "networks": {n.name: n.description for n in net_specs},
        "workload": {"batch": wl.batch, "context": wl.context, "prompt": wl.prompt},
        "profile": profile.path if profile else None,
        "configs": [p.to_dict() for p in preds],
        "compare": None,
    }
    if args.compare:
        ref = _reference(parse_compare(args.compare, presets), presets, shape, wl)
        report["compare"] = ref
        for c in report["configs"]:
            c["vs_reference"] = c["tok_s_per_1000usd"] / ref["tok_s_per_1000usd"] if ref["tok_s_per_1000usd"] else None
    return report


def format_table(report: dict[str, Any]) -> str:
    """Human-readable table: one row per configuration, then notes."""
    m, wl, node = report["model"], report["workload"], report["node"]
    lines = [
        f"model {m['name']}: {m['total_params_b']:.1f}B params ({m['active_params_b']:.1f}B active), "
        f"{m['weight_bytes_per_param']:g} bytes/param (experts {m['expert_bytes_per_param']:.4g}); "
        f"replicated {m['replicated_gb']:.1f} GB/node, "
        f"{m['expert_gb_each']:.3f} GB per expert x {m['experts']} experts x {m['moe_layers']} layers",
        f"node {node['name']}: {node['usable_memory_gb']:.1f} GB usable, ${node['price_usd']:,.0f}; "
        f"batch {wl['batch']}, context {wl['context']}, prompt {wl['prompt']}"
        + (f"; profile {report['profile']}" if report["profile"] else ""),
        "",
    ]
    ref = report["compare"]
    head = (f"{'network':<12}{'nodes':>5} {'fits':>4} {'tok/s':>7} {'ms/step':>8} {'attn%':>6} {'exp%':>5} "
            f"{'comm%':>6} {'head%':>6} {'GB/node':>8} {'TTFT s':>7} {'price $':>9} {'tok/s/$1k':>9}")
    lines += [head + (f" {'x ref':>6}" if ref else ""), "-" * (len(head) + (7 if ref else 0))]
    for c in report["configs"]:
        s = c["shares"]
        row = (f"{c['network']:<12}{c['nodes']:>5} {'yes' if c['fits'] else 'NO':>4} {c['decode_tok_s']:>7.2f} "
               f"{c['step_ms']:>8.1f} {100 * s['attention']:>6.1f} {100 * s['experts']:>5.1f} "
               f"{100 * s['exchange']:>6.1f} {100 * (s['head'] + s['sampling']):>6.1f} "
               f"{c['memory_gb']['total']:>8.1f} {c['ttft_s']:>7.2f} {c['price_usd']:>9,.0f} ")
        # a configuration that does not fit delivers nothing per dollar
        row += f"{c['tok_s_per_1000usd']:>9.3f}" if c["fits"] else f"{'-':>9}"
        if ref and c.get("vs_reference"):
            row += f" {c['vs_reference']:>6.2f}" if c["fits"] else f" {'-':>6}"
        lines.append(row)
    if ref:
        lines += ["", f"reference {ref['name']}: {ref['tok_s']:.2f} tok/s, ${ref['price_usd']:,.0f}, "
                      f"{ref['tok_s_per_1000usd']:.3f} tok/s per $1000 ({ref['source']})"
                  + ("" if ref.get("fits", True) else "; model does NOT fit on it")]
    grouped: dict[tuple[str, str], list[str]] = {}
    for c in report["configs"]:
        for note in c["notes"]:
            grouped.setdefault((c["network"], note), []).append(str(c["nodes"]))
    if grouped:
        lines += ["", "notes:"] + [f"  {net} x{','.join(ns)}: {note}" for (net, note), ns in grouped.items()]
    if report.get("plots"):
        lines += ["", "plots: " + ", ".join(report["plots"])]
    return "\n".join(lines)


def format_presets(presets: Presets) -> str:
    """Preset names with one-line descriptions."""
    out = ["nodes:"] + [f"  {k:<18} {v.description}" for k, v in presets.nodes.items()]
    out += ["networks:"] + [f"  {k:<18} {v.description}" for k, v in presets.networks.items()]
    out += ["systems (--compare):"] + [f"  {k:<18} {v.description}" for k, v in presets.systems.items()]
    out += ["models:"] + [f"  {k:<18} {v.get('source', '')}" for k, v in presets.models.items()]
    return "\n".join(out)


def run_plan(args: argparse.Namespace) -> int:
    """Entry point of `moecluster plan`."""
    if args.list_presets:
        print(format_presets(load_presets(args.presets)))
        return 0
    report = build_report(args)
    if not args.no_plots:
        from moecluster.perfmodel.plots import write_plots

        report["plots"] = write_plots(report, args.plot_dir)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0


def register(subparsers: Any) -> None:
    """Add the `plan` subcommand."""
    p = subparsers.add_parser(
        "plan",
        help="predict tok/s, memory fit and tok/s per dollar for a cluster",
        description="Predict decode tokens/s, TTFT, memory per node and tokens/s per $1000 for "
        "expert-parallel MoE inference over N nodes and one or more networks.",
    )
    p.add_argument("--model", default="dbrx", help="preset name (see --list-presets) or an HF config.json / model dir")
    p.add_argument("--node", default="m2-ultra-192", help="node preset (default m2-ultra-192)")
    p.add_argument("--nodes", default="1-8", help="node counts: 1-8, 2,4,8 or 1-4,8 (default 1-8)")
    p.add_argument("--network", default=None, help="comma-separated network presets (default 10gbe, or the profile's)")
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together (default 1)")
    p.add_argument("--context", type=int, default=2048, help="KV-cache tokens per sequence (default 2048)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens for prefill/TTFT (default 512)")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPE_BYTES),
                   help="weight format: bf16, fp16, q8, q4 (all weights) or the engine's expert formats int8, "
                        "int4, fp8, mxfp4 (routed experts, scales included; the rest bf16). Default: the "
                        "checkpoint's quantization_config format for experts, else bf16")
    p.add_argument("--expert-load", type=float, default=None,
                   help="expected max-rank (token, expert) evaluations per MoE layer (from a placement); "
                   "default: uniform routing, contiguous placement")
    p.add_argument("--expert-distinct", type=float, default=None,
                   help="expected max-rank distinct experts per MoE layer (from a placement)")
    p.add_argument("--profile", default=None, help="measured profile JSON (from moecluster calibrate)")
    p.add_argument("--compare", default=None, help="reference: NAME:TOKENS_PER_S:PRICE_USD or a system preset (8xh100)")
    p.add_argument("--presets", default=None, help="extra presets JSON (same format as the built-in presets.json)")
    p.add_argument("--plot-dir", default="plan-plots", help="where PNG plots go (default ./plan-plots)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-presets", action="store_true", help="list node, network, system and model presets")
    p.set_defaults(func=run_plan)
