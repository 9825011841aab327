"""Quality yardstick of the built-in demo model: held-out perplexity via `moecluster eval`, in bf16 and fp32, and
with quantized experts: int8 / int4 on load (`--quantize`, also with `--quantize-dense int8|int4`) and fp8 (a copy of
the checkpoint written in the DeepSeek-V3 / Qwen3-FP8 block-scaled layout, read as shipped).

    python benchmarks/demo_model.py [--model DIR] [--text FILE] [--only bf16 fp32 int8 int4 int8-dense int4-dense fp8]

Writes benchmarks/results/demo_model.json and .md (date, commit, CPU, versions, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from results_io import keep_history  # a sibling module: benchmarks run as scripts

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from decode import cpu_model, git_commit, package_version  # noqa: E402

RESULTS = HERE / "results"


# label -> (dtype, extra `moecluster eval` arguments); "fp8" evaluates an fp8 copy of the checkpoint
RUNS = {
    "bf16": ("bf16", []),
    "fp32": ("fp32", []),
    "int8": ("bf16", ["--quantize", "int8"]),
    "int4": ("bf16", ["--quantize", "int4"]),
    "int8-dense": ("bf16", ["--quantize", "int8", "--quantize-dense", "int8"]),
    "int4-dense": ("bf16", ["--quantize", "int4", "--quantize-dense", "int4"]),
    "fp8": ("bf16", []),
}
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_fp8_copy(src: Path, dst: Path) -> Path:
    """`src` with its 2-D projections (not embeddings, lm_head, norms, router gates) as float8_e4m3fn + fp32
    128x128 `weight_scale_inv` blocks and a quantization_config: what Qwen3-FP8 / DeepSeek-V3 ship."""
    from safetensors.torch import load_file, save_file

    from moecluster.quant import quantize_fp8_block

    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.weight")
    shutil.copytree(src, dst)
    out = {}
    for name, t in load_file(str(src / "model.safetensors")).items():
        if t.dim() == 2 and name.endswith(".weight") and not any(k in name for k in skip):
            q, scale = quantize_fp8_block(t)
            out[name], out[f"{name}_scale_inv"] = q.contiguous(), scale.contiguous()
        else:
            out[name] = t
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | {"quantization_config": FP8_CONFIG}, indent=2))
    return dst


def run_eval(model: str, text: str, dtype: str, extra: list[str] | None = None) -> dict:
    cmd = [sys.executable, "-m", "moecluster.cli", "eval", "--model", model, "--text", text, "--dtype", dtype]
    cmd += [*(extra or []), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shown = [os.path.relpath(a, HERE.parent) if a in (model, text) else a for a in cmd[3:]]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "command": " ".join(["moecluster", *shown])}


def main() -> int:
    from moecluster.builtin import DEMO_MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--text", default=str(HERE / "data" / "demo_heldout.txt"))
    ap.add_argument("--only", nargs="+", choices=list(RUNS), default=list(RUNS))
    args = ap.parse_args()
    runs = {}
    for label in args.only:
        dtype, extra = RUNS[label]
        if label != "fp8":
            runs[label] = run_eval(args.model, args.text, dtype, extra)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            fp8 = write_fp8_copy(Path(args.model), Path(tmp) / "demo-fp8")
            runs[label] = run_eval(str(fp8), args.text, dtype, extra)
            runs[label]["command"] = runs[label]["command"].replace(str(fp8), "<fp8 copy of the checkpoint>")
    config = json.loads((Path(args.model) / "config.json").read_text())
    result = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": package_version("torch"),
            "transformers": package_version("transformers"),
            "tokenizers": package_version("tokenizers"),
        },
        "command": "python " + " ".join(sys.argv),
        "model": {
            k: config.get(k)
            for k in (
                "model_type",
                "hidden_size",
                "num_hidden_layers",
                "num_local_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "vocab_size",
                "max_position_embeddings",
            )
        },
        "text": os.path.relpath(args.text, HERE.parent),
        "runs": runs,
    }
    RESULTS.mkdir(exist_ok=True)
    keep_history(RESULTS / "demo_model.json", result)
    (RESULTS / "demo_model.json").write_text(json.dumps(result, indent=1) + "\n")
    base = runs.get("bf16")
    rows = "\n".join(
        f"| {d} | {r['perplexity']:.3f} | "
        + (f"{r['perplexity'] / base['perplexity'] - 1:+.3%}" if base else "-")
        + f" | {r['nll_per_token']:.6f} | {r['tokens_scored']} | {r['window']} / {r['stride']} | {r['seconds']:.0f} |"
        for d, r in runs.items()
    )
    md = (
        f"# Built-in demo model: held-out perplexity\n\nDate: {result['date']}  \nCommit: {result['commit']}  \n"
        f"Machine: {result['machine']}\n\nCommand: `{result['command']}` (runs "
        + ", ".join(f"`{r['command']}`" for r in runs.values())
        + ")\n\nModel: {result['model']} (trained by `python scripts/train_demo_model.py`)  \n"
        f"Text: `{result['text']}`, the held-out split of the Python 3.11 documentation sources (Debian "
        f"python3-doc, PSF License): every 40th source file, never seen by the tokenizer or in training.\n\n"
        f"Token-level perplexity over sliding windows (window = the model's context, stride = window/2; "
        f"each token scored once). Rows int8 / int4 / fp8: the routed experts in that format (int8-dense / "
        f"int4-dense: also attention in that format and the lm_head int8; fp8: every projection but the router), "
        f"computed by the quantized kernels (int8/int4 quantize the activations per group to int8); vs bf16 = "
        f"relative perplexity change.\n\n"
        f"| run | perplexity | vs bf16 | NLL nats/token | tokens | window / stride | s |\n"
        f"|---|---|---|---|---|---|---|\n{rows}\n"
    )
    (RESULTS / "demo_model.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
