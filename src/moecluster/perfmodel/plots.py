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
        raise MoeClusterError(
            "plots need matplotlib: pip install 'moecluster[plot]', or pass --no-plots"
        ) from e
    return plt


def _by_network(configs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in configs:
        groups.setdefault(c["network"], []).append(c)
    return {k: sorted(v, key=lambda c: c["nodes"]) for k, v in groups.items()}


def _line_plot(plt: Any, configs: list[dict[str, Any]], key: str, ylabel: str, title: str,
               path: Path, reference: dict[str, Any] | None, show_nofit: bool = True) -> Path:
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
    ax.set_xlabel("nodes")
    ax.set_ylabel(ylabel)
    ax.set_title(title + ("\n(x: does not fit in memory)" if show_nofit else "\n(only configurations that fit)"),
                 fontsize=10)
    ax.set_xticks(sorted({c["nodes"] for c in configs}))
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _breakdown_plot(plt: Any, configs: list[dict[str, Any]], title: str, path: Path) -> Path:
    """Stacked bars of ms per decode step by term, one bar per (network, nodes)."""
    terms = ["attention", "router", "dense_mlp", "experts", "exchange", "head", "sampling"]
    labels = [f"{c['network']}\nx{c['nodes']}" for c in configs]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(configs) + 2), 4.5))
    bottoms = [0.0] * len(configs)
    for term in terms:
        values = [c["breakdown_ms"][term] for c in configs]
        if not any(values):
            continue
        ax.bar(range(len(configs)), values, bottom=bottoms, label=term)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    ax.set_xticks(range(len(configs)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms per decode step")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(report: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write tok/s, tok/s per $1000 and time-breakdown PNGs for a plan report; returns paths."""
    plt = _pyplot()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MoeClusterError(f"cannot create plot directory {out}: {e}; pass --plot-dir") from e
    configs = report["configs"]
    ref = report.get("compare")
    wl = report["workload"]
    what = f"{report['model']['name']} on {report['node']['name']}, batch {wl['batch']}, context {wl['context']}"
    paths = [
        _line_plot(plt, configs, "decode_tok_s", "decode tokens/s", f"Decode throughput: {what}",
                   out / "tok_s_vs_nodes.png", ref),
        _line_plot(plt, configs, "tok_s_per_1000usd", "tokens/s per $1000",
                   f"Cost efficiency: {what}", out / "tok_s_per_1000usd_vs_nodes.png", ref, show_nofit=False),
        _breakdown_plot(plt, configs, f"Decode step breakdown: {what}", out / "step_breakdown.png"),
    ]
    return [str(p) for p in paths]
