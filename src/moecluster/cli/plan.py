"""`moecluster plan`: predict tokens/s, memory fit and tokens/s per dollar across node counts and networks."""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import replace
from typing import Any

from moecluster.cli.cluster import add_quantize_dense_arg
from moecluster.errors import MoeClusterError
from moecluster.perfmodel.parallel import layouts, parse_parallelism, predict_layout
from moecluster.perfmodel.predict import Prediction, Workload
from moecluster.perfmodel.presets import NodeSpec, Presets, load_presets
from moecluster.perfmodel.profile import load_profile
from moecluster.perfmodel.shapes import DTYPE_BYTES, ModelShape, load_model

MAX_NODES = 1024
KIND_OF = ("ep", "tp", "pp", "ep+tp", "pp+ep")


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
                f"bad --nodes {spec!r}: use a count, a range like 1-8, or a list like 2,4,8"
            ) from None
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
    """Rate the reference system: given numbers, or predicted by this model for a system preset at
    batch 1 and at the batch it is normally run at (capped by its memory)."""
    if "system" not in ref:
        return {**ref, "source": "given", "tok_s_per_1000usd": ref["tok_s"] / (ref["price_usd"] / 1000)}
    sys = ref["system"]
    node = presets.resolve(presets.node(sys.node))
    net = presets.network(sys.network)
    rows = []
    for batch in (1, sys.typical_batch):  # per batch, the fastest layout that fits (batch capped by memory)
        best = None
        for lay in layouts(["ep", "tp", "ep+tp"], sys.nodes):
            b = max(1, min(batch, max_batch(shape, node, net, sys.nodes, wl, lay)))
            pred = predict_layout(shape, node, net, lay, replace(wl, batch=b), price_usd=sys.price_usd)
            if best is None or pred.tokens_per_s > best.tokens_per_s:
                best = pred
        assert best is not None
        rows.append({**_rated(best), "parallelism": best.parallelism})
        if batch == sys.typical_batch == 1:
            break
    return {
        "name": sys.name,
        "source": f"predicted: {sys.nodes} x {sys.node} on {sys.network}, engine {node.engine}",
        "tok_s": rows[0]["tok_s"],
        "price_usd": sys.price_usd,
        "fits": rows[0]["fits"],
        "tok_s_per_1000usd": rows[0]["tok_s_per_1000usd"],
        "price_source": sys.sources.get("price_usd", ""),
        "typical_batch": sys.typical_batch,
        "batch_source": sys.sources.get("typical_batch", ""),
        "batches": rows,
    }


def _rated(pred: Prediction) -> dict[str, Any]:
    return {
        "batch": pred.workload.batch,
        "per_user_tok_s": 1 / pred.step.total,
        "tok_s": pred.tokens_per_s,
        "tok_s_per_1000usd": pred.tokens_per_s_per_1000usd,
        "fits": pred.memory.fits,
    }


def max_batch(shape: ModelShape, node: NodeSpec, net: Any, nodes: int, wl: Workload, layout: Any = None) -> int:
    """Largest batch whose KV cache still fits next to the weights (0 if even batch 1 does not)."""
    lay = layout or layouts(["ep"], nodes)[0]
    from moecluster.perfmodel.parallel import layout_memory

    one = layout_memory(shape, node, lay, replace(wl, batch=1))
    free = one.limit - one.replicated - one.experts - one.overhead
    return max(0, int(free // one.kv_cache)) if one.kv_cache > 0 else 1


def _cluster_batches(
    report: dict[str, Any], shape: ModelShape, node: NodeSpec, nets: dict[str, Any], wl: Workload, batch: int
) -> list[dict[str, Any]]:
    """The best layout of each (network, nodes) at batch 1 and at the largest batch its memory allows
    (up to the reference's batch)."""
    out = []
    for c in report["configs"]:
        if not c.get("best"):
            continue
        lay = next(x for x in layouts([k for k in KIND_OF], c["nodes"]) if x.name == c["parallelism"])
        room = max_batch(shape, node, nets[c["network"]], c["nodes"], wl, lay)
        top = min(batch, room)
        rows = [
            _rated(predict_layout(shape, node, nets[c["network"]], lay, replace(wl, batch=b)))
            for b in sorted({1, max(1, top)})
        ]
        out.append(
            {
                "network": c["network"],
                "nodes": c["nodes"],
                "parallelism": c["parallelism"],
                "max_batch": room,
                "batches": rows,
            }
        )
    return out


def build_report(args: argparse.Namespace) -> dict[str, Any]:
    """Run every (network, nodes, layout) prediction for the parsed arguments; JSON-ready dict."""
    presets = load_presets(args.presets)
    shape = load_model(args.model, presets.models)  # a quantized checkpoint's config sets its expert bytes
    shape = shape.with_dtype(args.dtype) if args.dtype else shape
    if args.quantize_dense:
        if args.dtype not in ("int8", "int4"):
            raise MoeClusterError("--quantize-dense needs --dtype int8 or int4 (the engine's --quantize)")
        shape = shape.with_dense(args.quantize_dense)
    base = presets.node(args.node)
    node = presets.resolve(base, args.engine, args.stack)
    if args.quantize_dense and (node.engine or "").startswith("mlx"):
        raise MoeClusterError(
            f"--quantize-dense is the torch engine's; {node.engine} on {base.name} quantizes dense weights through "
            "an MLX-quantized directory: use --dtype q4 or q8 (all weights), or --engine torch-cpu"
        )
    profile = load_profile(args.profile) if args.profile else None
    networks = args.network or (profile.network if profile and profile.network else "10gbe")
    net_specs = [presets.network(n.strip()) for n in networks.split(",") if n.strip()]
    if not net_specs:
        raise MoeClusterError("--network is empty; name at least one network preset")
    wl = Workload(batch=args.batch, context=args.context, prompt=min(args.prompt, args.context))
    kinds = parse_parallelism(args.parallelism)
    preds: list[Prediction] = [
        predict_layout(
            shape,
            node,
            net,
            lay,
            wl,
            profile,
            expert_load_per_layer=args.expert_load,
            expert_distinct_per_layer=args.expert_distinct,
        )
        if lay.pp == 1 and lay.tp == 1
        else predict_layout(shape, node, net, lay, wl, profile)
        for net in net_specs
        for n in parse_nodes(args.nodes)
        for lay in layouts(kinds, n)
    ]
    engine_spec = (
        presets.stack(args.stack)
        if args.stack
        else (presets.engine(node.engine) if node.engine in presets.engines else None)
    )
    report: dict[str, Any] = {
        "model": shape.summary(),
        "node": {
            "name": node.name,
            "description": node.description,
            "usable_memory_gb": node.usable_memory_bytes / 1e9,
            "price_usd": node.price_usd,
        },
        "engine": {
            "name": node.engine or "preset",
            "mem_efficiency": node.mem_efficiency,
            "compute_efficiency": node.compute_efficiency,
            "exchange_overhead_us": node.exchange_overhead_s * 1e6,
            "per_expert_overhead_us": node.per_expert_overhead_s * 1e6,
            "sources": engine_spec.source_lines(base) if engine_spec else [],
        },
        "networks": {n.name: n.description for n in net_specs},
        "parallelism": kinds,
        "workload": {"batch": wl.batch, "context": wl.context, "prompt": wl.prompt},
        "profile": profile.path if profile else None,
        "profile_engine": profile.meta.get("engine") if profile else None,
        "configs": [p.to_dict() for p in preds],
        "compare": None,
    }
    mark_best(report["configs"])
    if args.compare:
        ref = _reference(parse_compare(args.compare, presets), presets, shape, wl)
        report["compare"] = ref
        for c in report["configs"]:
            c["vs_reference"] = c["tok_s_per_1000usd"] / ref["tok_s_per_1000usd"] if ref["tok_s_per_1000usd"] else None
        if "batches" in ref:
            nets = {n.name: n for n in net_specs}
            ref["cluster"] = _cluster_batches(report, shape, node, nets, wl, ref["typical_batch"])
    if args.validate:
        report["validation"] = validate(read_measured(args.validate), shape, node, net_specs, wl, profile)
    return report


def mark_best(configs: list[dict[str, Any]]) -> None:
    """c['best'] = True for the fastest configuration that fits, per (network, nodes)."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for c in configs:
        c["best"] = False
        groups.setdefault((c["network"], c["nodes"]), []).append(c)
    for rows in groups.values():
        fit = [c for c in rows if c["fits"]]
        if fit:
            max(fit, key=lambda c: c["decode_tok_s"])["best"] = True


def read_measured(path: str) -> list[dict[str, Any]]:
    """A measured CSV: columns nodes, tok_s (required); network, parallelism, batch, label (optional)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise MoeClusterError(f"cannot read measured CSV {path}: {e}") from e
    out = []
    for i, row in enumerate(rows, start=2):
        try:
            nodes, toks = int(row["nodes"]), float(row["tok_s"])
            batch = int(row.get("batch") or 0) or None
        except (KeyError, TypeError, ValueError):
            raise MoeClusterError(
                f"{path} line {i}: need integer 'nodes' and number 'tok_s' columns "
                "(optional: network, parallelism, batch, label)"
            ) from None
        if nodes < 1 or toks <= 0:
            raise MoeClusterError(f"{path} line {i}: nodes must be >= 1 and tok_s > 0")
        out.append(
            {
                "nodes": nodes,
                "tok_s": toks,
                "batch": batch,
                "network": (row.get("network") or "").strip(),
                "parallelism": (row.get("parallelism") or "ep").strip(),
                "label": (row.get("label") or "").strip(),
            }
        )
    if not out:
        raise MoeClusterError(f"{path}: no rows; expected a header 'nodes,tok_s[,network,parallelism,batch,label]'")
    return out


def validate(
    rows: list[dict[str, Any]], shape: ModelShape, node: NodeSpec, nets: list[Any], wl: Workload, profile: Any
) -> list[dict[str, Any]]:
    """Prediction vs measurement per measured row (network default: the first --network)."""
    by_name = {n.name: n for n in nets}
    out = []
    for r in rows:
        net = by_name.get(r["network"] or nets[0].name)
        if net is None:
            raise MoeClusterError(
                f"measured row network {r['network']!r} is not in --network ({', '.join(by_name)}); add it there"
            )
        lay = _row_layout(r["parallelism"], r["nodes"])
        if lay is None:
            names = sorted({x.name for x in layouts(list(KIND_OF), r["nodes"])})
            raise MoeClusterError(
                f"measured row parallelism {r['parallelism']!r} is not a layout of "
                f"{r['nodes']} nodes; use one of {', '.join(names)}"
            )
        pred = predict_layout(shape, node, net, lay, replace(wl, batch=r["batch"] or wl.batch), profile)
        out.append(
            {
                **r,
                "network": net.name,
                "parallelism": lay.name,
                "batch": pred.workload.batch,
                "predicted_tok_s": pred.tokens_per_s,
                "error": pred.tokens_per_s / r["tok_s"] - 1,
            }
        )
    return out


def _row_layout(name: str, nodes: int) -> Any:
    """A measured row's layout: a layout name (ep2xtp2) or a kind (ep+tp) with one split at this node count."""
    every = layouts(list(KIND_OF), nodes)
    lay = next((x for x in every if x.name == name), None)
    if lay is None and name in KIND_OF:
        splits = layouts([name], nodes)
        lay = splits[0] if len(splits) == 1 else None
    return lay


def format_table(report: dict[str, Any]) -> str:
    """Human-readable table: one row per configuration (* = fastest that fits per network and node
    count), the reference, the validation, then notes."""
    m, wl, node, eng = report["model"], report["workload"], report["node"], report["engine"]
    lines = (
        [
            f"model {m['name']}: {m['total_params_b']:.1f}B params ({m['active_params_b']:.1f}B active), "
            f"{m['weight_bytes_per_param']:g} bytes/param (experts {m['expert_bytes_per_param']:.4g}"
            + (
                f", attention / dense MLPs {m['dense_bytes_per_param']:.4g}, head {m['head_bytes_per_param']:.4g}"
                if (m["dense_bytes_per_param"], m["head_bytes_per_param"]) != (m["weight_bytes_per_param"],) * 2
                else ""
            )
            + "); "
            f"replicated {m['replicated_gb']:.1f} GB/node, "
            f"{m['expert_gb_each']:.3f} GB per expert x {m['experts']} experts x {m['moe_layers']} layers",
            f"node {node['name']}: {node['usable_memory_gb']:.1f} GB usable, ${node['price_usd']:,.0f}; "
            f"batch {wl['batch']}, context {wl['context']}, prompt {wl['prompt']}"
            + (f"; profile {report['profile']}" if report["profile"] else "")
            + (f" (measured on engine {report['profile_engine']})" if report.get("profile_engine") else ""),
            f"engine {eng['name']}: memory efficiency {eng['mem_efficiency']:.2f}, compute efficiency "
            f"{eng['compute_efficiency']:.2f}, {eng['exchange_overhead_us']:.0f} us per exchange, "
            f"{eng['per_expert_overhead_us']:.0f} us per expert evaluated",
        ]
        + [f"  {line}" for line in eng["sources"]]
        + [""]
    )
    ref = report["compare"]
    head = (
        f"{'network':<11}{'nodes':>5} {'layout':<9}{'fits':>4} {'tok/s':>7} {'ms/step':>8} {'attn%':>6} "
        f"{'exp%':>5} {'comm%':>6} {'head%':>6} {'GB/node':>8} {'TTFT s':>7} {'price $':>9} {'tok/s/$1k':>9}"
    )
    lines += [head + (f" {'x ref':>6}" if ref else ""), "-" * (len(head) + (7 if ref else 0))]
    for c in report["configs"]:
        s = c["shares"]
        row = (
            f"{c['network']:<11}{c['nodes']:>5} {c['parallelism'] + ('*' if c.get('best') else ''):<9}"
            f"{'yes' if c['fits'] else 'NO':>4} {c['decode_tok_s']:>7.2f} "
            f"{c['step_ms']:>8.1f} {100 * s['attention']:>6.1f} {100 * s['experts']:>5.1f} "
            f"{100 * s['exchange']:>6.1f} {100 * (s['head'] + s['sampling']):>6.1f} "
            f"{c['memory_gb']['total']:>8.1f} {c['ttft_s']:>7.2f} {c['price_usd']:>9,.0f} "
        )
        # a configuration that does not fit delivers nothing per dollar
        row += f"{c['tok_s_per_1000usd']:>9.3f}" if c["fits"] else f"{'-':>9}"
        if ref and c.get("vs_reference"):
            row += f" {c['vs_reference']:>6.2f}" if c["fits"] else f" {'-':>6}"
        lines.append(row)
    if len(report.get("parallelism", [])) > 1:
        lines.append("* fastest layout that fits, per network and node count")
    lines += _format_reference(ref) + _format_validation(report.get("validation"))
    grouped: dict[tuple[str, str], list[str]] = {}
    for c in report["configs"]:
        for note in c["notes"]:
            lay = "" if c["parallelism"] in ("ep", "single") else " " + c["parallelism"]
            grouped.setdefault((c["network"], note), []).append(f"{c['nodes']}{lay}")
    if grouped:
        lines += ["", "notes:"] + [f"  {net} x{','.join(ns)}: {note}" for (net, note), ns in grouped.items()]
    if report.get("plots"):
        lines += ["", "plots: " + ", ".join(report["plots"])]
    return "\n".join(lines)


def _format_reference(ref: dict[str, Any] | None) -> list[str]:
    if not ref:
        return []
    if "batches" not in ref:
        return [
            "",
            f"reference {ref['name']}: {ref['tok_s']:.2f} tok/s, ${ref['price_usd']:,.0f}, "
            f"{ref['tok_s_per_1000usd']:.3f} tok/s per $1000 ({ref['source']})",
        ]
    lines = [
        "",
        f"reference {ref['name']} ({ref['source']}), ${ref['price_usd']:,.0f}"
        + ("" if ref.get("fits", True) else "; model does NOT fit on it"),
        f"  normally run at batch {ref['typical_batch']}: {ref['batch_source']}",
        f"  {'system':<26}{'batch':>6} {'per-user tok/s':>15} {'aggregate tok/s':>16} {'tok/s/$1k':>10}",
    ]
    for r in ref["batches"]:
        name = f"{ref['name']} {r['parallelism']}"
        lines.append(
            f"  {name:<26}{r['batch']:>6} {r['per_user_tok_s']:>15.2f} {r['tok_s']:>16.1f} "
            f"{r['tok_s_per_1000usd']:>10.3f}"
        )
    for c in ref.get("cluster", []):
        name = f"{c['network']} x{c['nodes']} {c['parallelism']}"
        for r in c["batches"]:
            why = (
                "  (largest batch its memory allows)"
                if r["batch"] == c["max_batch"] > 1
                else f"  (memory allows {c['max_batch']})"
                if r["batch"] > 1
                else ""
            )
            lines.append(
                f"  {name:<26}{r['batch']:>6} {r['per_user_tok_s']:>15.2f} {r['tok_s']:>16.1f} "
                f"{r['tok_s_per_1000usd']:>10.3f}{why}"
            )
    return lines


def _format_validation(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        f"validation: {'network':<11}{'nodes':>5} {'layout':<9}{'batch':>5} {'measured':>9} "
        f"{'predicted':>10} {'error %':>8}  label",
    ]
    for r in rows:
        lines.append(
            f"            {r['network']:<11}{r['nodes']:>5} {r['parallelism']:<9}{r['batch']:>5} "
            f"{r['tok_s']:>9.2f} {r['predicted_tok_s']:>10.2f} {100 * r['error']:>+8.1f}  {r['label']}"
        )
    errs = [abs(r["error"]) for r in rows]
    lines.append(
        f"            {len(rows)} rows: median |error| {100 * statistics.median(errs):.1f}%, max {100 * max(errs):.1f}%"
    )
    return lines


def format_presets(presets: Presets) -> str:
    """Preset names with one-line descriptions."""
    out = ["nodes:"] + [f"  {k:<18} {v.description}" for k, v in presets.nodes.items()]
    out += ["networks:"] + [f"  {k:<18} {v.description}" for k, v in presets.networks.items()]
    out += ["engines (--engine):"] + [f"  {k:<18} {v.description}" for k, v in presets.engines.items()]
    out += ["stacks (--stack):"] + [f"  {k:<18} {v.description}" for k, v in presets.stacks.items()]
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

        measured = read_measured(args.measured) if args.measured else None
        report["plots"] = write_plots(report, args.plot_dir, measured)
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
    p.add_argument(
        "--dtype",
        default=None,
        choices=sorted(DTYPE_BYTES),
        help="weight format: bf16, fp16, q8, q4 (all weights) or the engine's expert formats int8, "
        "int4, fp8, mxfp4 (routed experts, scales included; the rest bf16). Default: the "
        "checkpoint's quantization_config format for experts, else bf16",
    )
    add_quantize_dense_arg(p, "with --dtype int8|int4: size, as the engine's --quantize-dense holds them,")
    p.add_argument(
        "--expert-load",
        type=float,
        default=None,
        help="expected max-rank (token, expert) evaluations per MoE layer (from a placement); "
        "default: uniform routing, contiguous placement",
    )
    p.add_argument(
        "--expert-distinct",
        type=float,
        default=None,
        help="expected max-rank distinct experts per MoE layer (from a placement)",
    )
    p.add_argument(
        "--engine",
        default=None,
        help="engine whose efficiency terms to use (torch-cpu, mlx-metal, "
        "llama-cpp-metal, cuda-vllm; default: the node preset's)",
    )
    p.add_argument("--stack", default=None, help="a published system's software stack (e.g. paper-python-grpc)")
    p.add_argument(
        "--parallelism",
        default="ep",
        help="layouts to compare: comma list of ep, tp, pp, ep+tp, pp+ep, or all (default ep)",
    )
    p.add_argument(
        "--validate",
        default=None,
        metavar="CSV",
        help="measured CSV (nodes,tok_s[,network,parallelism,batch,label]): error per row",
    )
    p.add_argument("--measured", default=None, metavar="CSV", help="overlay measured points on the plots")
    p.add_argument("--profile", default=None, help="measured profile JSON (from moecluster calibrate)")
    p.add_argument("--compare", default=None, help="reference: NAME:TOKENS_PER_S:PRICE_USD or a system preset (8xh100)")
    p.add_argument("--presets", default=None, help="extra presets JSON (same format as the built-in presets.json)")
    p.add_argument("--plot-dir", default="plan-plots", help="where PNG plots go (default ./plan-plots)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--list-presets", action="store_true", help="list node, network, system and model presets")
    p.set_defaults(func=run_plan)
