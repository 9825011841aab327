"""Quality yardstick of the built-in demo model: held-out perplexity in bf16 and fp32 via `moecluster eval`.

    python benchmarks/demo_model.py [--model DIR] [--text FILE]

Writes benchmarks/results/demo_model.json and .md (date, commit, CPU, versions, command).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from decode import cpu_model, git_commit, package_version  # noqa: E402

RESULTS = HERE / "results"


def run_eval(model: str, text: str, dtype: str) -> dict:
    cmd = [sys.executable, "-m", "moecluster.cli", "eval", "--model", model, "--text", text, "--dtype", dtype, "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    shown = [os.path.relpath(a, HERE.parent) if a in (model, text) else a for a in cmd[3:]]
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "command": " ".join(["moecluster", *shown])}


def main() -> int:
    from moecluster.builtin import DEMO_MODEL_DIR

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEMO_MODEL_DIR))
    ap.add_argument("--text", default=str(HERE / "data" / "demo_heldout.txt"))
    args = ap.parse_args()
    runs = {dtype: run_eval(args.model, args.text, dtype) for dtype in ("bf16", "fp32")}
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
    (RESULTS / "demo_model.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(
        f"| {d} | {r['perplexity']:.3f} | {r['nll_per_token']:.6f} | {r['tokens_scored']} | "
        f"{r['window']} / {r['stride']} | {r['seconds']:.0f} |"
        for d, r in runs.items()
    )
    md = (
        f"# Built-in demo model: held-out perplexity\n\nDate: {result['date']}  \nCommit: {result['commit']}  \n"
        f"Machine: {result['machine']}\n\nCommand: `{result['command']}` (runs `{runs['bf16']['command']}` and "
        f"the same with fp32)\n\nModel: {result['model']} (trained by `python scripts/train_demo_model.py`)  \n"
        f"Text: `{result['text']}`, the held-out split of the Python 3.11 documentation sources (Debian "
        f"python3-doc, PSF License): every 40th source file, never seen by the tokenizer or in training.\n\n"
        f"Token-level perplexity over sliding windows (window = the model's context, stride = window/2; "
        f"each token scored once).\n\n| dtype | perplexity | NLL nats/token | tokens | window / stride | s |\n"
        f"|---|---|---|---|---|---|\n{rows}\n"
    )
    (RESULTS / "demo_model.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
