"""PNG plots for `moecluster plan` (matplotlib, imported lazily so the model stays pure Python)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moecluster.errors import MoeClusterError


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise MoeClusterError("plots need matplotlib: pip install 'moecluster[plot]', or pass --no-plots") from e
    return plt


def _by_network(configs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        groups.setdefault(c["network"], []).append(c)
    return {k: sorted(v, key=lambda c: c["nodes"]) for k, v in groups.items()}


def kind_of(layout: str) -> str:
    """'ep2xtp2' -> 'ep+tp', 'pp2xep2' -> 'pp+ep', 'ep' -> 'ep'."""
    parts = [p.rstrip("0123456789") for p in layout.split("x")]
    return "+".join(parts) if len(parts) > 1 else parts[0]


def best_per_point(configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One configuration per (network, nodes): the marked best, else the first (none fits)."""
    out: dict[tuple[str, int], dict[str, Any]] = {}
    for c in configs:
        key = (c["network"], c["nodes"])
        if key not in out or (c.get("best") and not out[key].get("best")):
            out[key] = c
    return list(out.values())


def _overlay(
    ax: Any,
    measured: list[dict[str, Any]] | None,
    network: str | None = None,
    configs: list[dict[str, Any]] | None = None,
) -> None:
    """Measured points (from --measured CSV) as black diamonds: tok/s, or with `configs` tok/s per $1000
    at the price of the matching configuration (same network, nodes and layout; rows without one are skipped)."""
    rows = [r for r in measured or [] if network is None or r["network"] in ("", network)]
    if configs is not None:
        price = {(c["network"], c["nodes"], c["parallelism"]): c["price_usd"] for c in configs}
        priced = [(r, _match_price(r, price)) for r in rows]
        rows = [{**r, "tok_s": r["tok_s"] / (p / 1000)} for r, p in priced if p]
    if rows:
        ax.plot([r["nodes"] for r in rows], [r["tok_s"] for r in rows], "D", color="black", label="measured")


def _match_price(row: dict[str, Any], price: dict[tuple[str, int, str], float]) -> float | None:
    for (net, nodes, lay), usd in price.items():
        if nodes == row["nodes"] and row["network"] in ("", net) and _layout_matches(row["parallelism"], lay, nodes):
            return usd
    return None


def _layout_matches(measured: str, layout: str, nodes: int) -> bool:
    """A measured row's parallelism (a layout name like ep2xtp2 or a kind like ep+tp) names `layout`;
    on one node every kind is the single layout."""
    return nodes == 1 or measured in (layout, kind_of(layout))


def _line_plot(
    plt: Any,
    configs: list[dict[str, Any]],
    key: str,
    ylabel: str,
    title: str,
    path: Path,
    reference: dict[str, Any] | None,
    show_nofit: bool = True,
    measured: list[dict[str, Any]] | None = None,
) -> Path:
    """One line per network over node count; configurations that do not fit are drawn as x
    (or left out, for per-dollar plots: a configuration that cannot run has no value)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for net, rows in _by_network(configs).items():
        fit = [c for c in rows if c["fits"]]
        (line,) = ax.plot([c["nodes"] for c in fit], [c[key] for c in fit], marker="o", label=net)
        nofit = [c for c in rows if not c["fits"]] if show_nofit else []
        if nofit:
            ax.plot([c["nodes"] for c in nofit], [c[key] for c in nofit], "x", color=line.get_color())
    if reference is not None and reference.get(key):
        ax.axhline(reference[key], color="gray", linestyle="--", label=f"{reference['name']} (reference)")
    if key == "decode_tok_s":
        _overlay(ax, measured)
    elif key == "tok_s_per_1000usd":
        _overlay(ax, measured, configs=configs)
    ax.set_xlabel("nodes")
    ax.set_ylabel(ylabel)
    ax.set_title(
        title + ("\n(x: does not fit in memory)" if show_nofit else "\n(only configurations that fit)"), fontsize=10
    )
    ax.set_xticks(sorted({c["nodes"] for c in configs}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _breakdown_plot(
    plt: Any, configs: list[dict[str, Any]], title: str, path: Path, measured: list[dict[str, Any]] | None = None
) -> Path:
    """Stacked bars of ms per decode step by term, one bar per configuration; each segment of 5% or
    more is labelled with its share; configurations that do not fit are hatched and marked; measured
    rows of the same network, nodes, layout (and batch) as black diamonds at batch / tok/s."""
    terms = ["attention", "router", "dense_mlp", "experts", "exchange", "head", "sampling"]
    labels = [
        f"{c['network']}\nx{c['nodes']}"
        + ("" if c.get("parallelism", "ep") in ("ep", "single") else f"\n{c['parallelism']}")
        for c in configs
    ]
    fig, ax = plt.subplots(figsize=(max(7.5, 0.7 * len(configs) + 2), 5))
    bottoms = [0.0] * len(configs)
    for term in terms:
        values = [c["breakdown_ms"][term] for c in configs]
        if not any(values):
            continue
        bars = ax.bar(
            range(len(configs)), values, bottom=bottoms, label=term, hatch=None, edgecolor="white", linewidth=0.3
        )
        for bar, c, v, b0 in zip(bars, configs, values, bottoms):
            if not c["fits"]:
                bar.set_hatch("//")
                bar.set_alpha(0.45)
            share = v / c["step_ms"] if c["step_ms"] else 0.0
            if share >= 0.05:
                ax.text(
                    bar.get_x() + bar.get_width() / 2,
                    b0 + v / 2,
                    f"{100 * share:.0f}%",
                    ha="center",
                    va="center",
                    fontsize=6,
                )
        bottoms = [b + v for b, v in zip(bottoms, values)]
    for i, c in enumerate(configs):
        if not c["fits"]:
            ax.text(i, bottoms[i], "does not\nfit", ha="center", va="bottom", fontsize=6, color="red")
    hits = [(i, r) for i, c in enumerate(configs) for r in measured or [] if _same_config(r, c)]
    if hits:
        ys = [1e3 * (r["batch"] or configs[i]["workload"]["batch"]) / r["tok_s"] for i, r in hits]
        ax.plot([i for i, _ in hits], ys, "D", color="black", label="measured", zorder=5)
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_title(title + "\n(hatched: does not fit in memory)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars and diamonds stay visible
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _same_config(row: dict[str, Any], c: dict[str, Any]) -> bool:
    """A measured row belongs to configuration c (network empty = any; batch empty = the plan's)."""
    return (
        row["nodes"] == c["nodes"]
        and row["network"] in ("", c["network"])
        and _layout_matches(row["parallelism"], c["parallelism"], c["nodes"])
        and (row["batch"] or c["workload"]["batch"]) == c["workload"]["batch"]
    )


def _parallelism_plot(
    plt: Any, configs: list[dict[str, Any]], network: str, title: str, path: Path, measured: list[dict[str, Any]] | None
) -> Path:
    """tok/s against nodes on one network, one line per layout kind (best split of hybrids), the
    fastest that fits per node count starred."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [c for c in configs if c["network"] == network]
    for kind in dict.fromkeys(kind_of(c["parallelism"]) for c in rows if c["nodes"] > 1):
        pts: dict[int, dict[str, Any]] = {}
        for c in rows:
            if c["nodes"] == 1 or kind_of(c["parallelism"]) == kind:
                if c["nodes"] not in pts or c["decode_tok_s"] > pts[c["nodes"]]["decode_tok_s"]:
                    pts[c["nodes"]] = c
        xs = sorted(pts)
        (line,) = ax.plot(xs, [pts[x]["decode_tok_s"] for x in xs], marker="o", label=kind)
        nofit = [pts[x] for x in xs if not pts[x]["fits"]]
        ax.plot([c["nodes"] for c in nofit], [c["decode_tok_s"] for c in nofit], "x", color="red", markersize=9)
    best = [c for c in rows if c.get("best")]
    ax.plot(
        [c["nodes"] for c in best],
        [c["decode_tok_s"] for c in best],
        "*",
        color="gold",
        markersize=16,
        markeredgecolor="black",
        label="fastest that fits",
        zorder=5,
    )
    _overlay(ax, measured, network)
    ax.set_xlabel("nodes")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title + "\n(red x: does not fit in memory)", fontsize=10)
    ax.set_xticks(sorted({c["nodes"] for c in rows}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], out_dir: str | Path, measured: list[dict[str, Any]] | None = None) -> list[str]:
    """Write tok/s, tok/s per $1000 and time-breakdown PNGs for a plan report; returns paths."""
    plt = _pyplot()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeClusterError(f"cannot create plot directory {out}: {e}; pass --plot-dir") from e
    every = report["configs"]
    configs = best_per_point(every)
    ref = report.get("compare")
    wl = report["workload"]
    what = (  # two lines: a figure only 6 inches wide clipped the one-line title
        f"{report['model']['name']} on {report['node']['name']} ({report.get('engine', {}).get('name', '')})\n"
        f"batch {wl['batch']}, context {wl['context']}"
    )
    paths = [
        _line_plot(
            plt,
            configs,
            "decode_tok_s",
            "decode tokens/s",
            f"Decode throughput: {what}",
            out / "tok_s_vs_nodes.png",
            ref,
            measured=measured,
        ),
        _line_plot(
            plt,
            configs,
            "tok_s_per_1000usd",
            "tokens/s per $1000",
            f"Cost efficiency: {what}",
            out / "tok_s_per_1000usd_vs_nodes.png",
            ref,
            show_nofit=False,
            measured=measured,
        ),
        _breakdown_plot(plt, every, f"Decode step breakdown: {what}", out / "step_breakdown.png", measured),
    ]
    if len(report.get("parallelism", [])) > 1:
        for net in report["networks"]:
            paths.append(
                _parallelism_plot(
                    plt, every, net, f"Parallelism on {net}: {what}", out / f"parallelism_{net}.png", measured
                )
            )
    return [str(p) for p in paths]
