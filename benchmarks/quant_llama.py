"""llama.cpp's side of benchmarks/quant.py: the checkpoint as GGUF (bf16 by llama.cpp's convert_hf_to_gguf.py, then
q8_0 / q4_0 by llama_model_quantize; cached under $MOECLUSTER_CACHE/gguf) and its batch-1 decode through
llama-cpp-python, timed as benchmarks/quant.py times moecluster (per-token gaps of a greedy stream)."""

from __future__ import annotations

import ctypes
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

LLAMA_TYPES = {"q8_0": 7, "q4_0": 2, "bf16": 32}  # llama_ftype values (LLAMA_FTYPE_MOSTLY_*)

# convert_hf_to_gguf.py refuses a BPE tokenizer whose pre-tokenizer hash it does not know (the benchmark
# checkpoints' tokenizer is this project's own): use llama.cpp's default pre-tokenizer; speed does not depend on it.
_CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "default"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def llama_cpp_available() -> tuple[bool, str]:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return False, f"llama-cpp-python is not installed ({e}); `pip install llama-cpp-python` (the bench extra)"
    return True, ""


def _cache() -> Path:
    return Path(os.environ.get("MOECLUSTER_CACHE", Path.home() / ".cache" / "moecluster"))


def llama_src(given: str | None) -> Path:
    """A llama.cpp source tree with convert_hf_to_gguf.py: `given`, else the installed llama-cpp-python's sdist."""
    if given:
        return Path(given)
    from importlib.metadata import version

    v = version("llama-cpp-python")
    root = _cache() / "llama-cpp-src"
    tree = root / f"llama_cpp_python-{v}" / "vendor" / "llama.cpp"
    if not (tree / "convert_hf_to_gguf.py").is_file():
        root.mkdir(parents=True, exist_ok=True)
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(root)]
        subprocess.run([*pip, f"llama-cpp-python=={v}"], check=True)
        with tarfile.open(root / f"llama_cpp_python-{v}.tar.gz") as tar:
            tar.extractall(root, filter="data")
    return tree


def gguf_file(model_dir: Path, qtype: str, src: str | None) -> Path:
    """The checkpoint as a GGUF of `qtype`, made once."""
    import llama_cpp

    out = _cache() / "gguf" / f"{model_dir.name}-{qtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.with_name(f"{model_dir.name}-bf16.gguf")
    if not base.is_file():
        tree = llama_src(src)
        tmp = base.with_suffix(".tmp")
        cmd = [sys.executable, "-c", _CONVERT, str(tree), str(model_dir), "--outtype", "bf16", "--outfile", str(tmp)]
        subprocess.run(cmd, check=True, capture_output=True)
        tmp.rename(base)
    if qtype == "bf16":
        return base
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_TYPES[qtype]
    params.nthread = os.cpu_count() or 1
    tmp = out.with_suffix(".tmp")
    if llama_cpp.llama_model_quantize(str(base).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama_model_quantize to {qtype} failed")
    tmp.rename(out)
    return out


def gguf_bytes_per_token(path: Path, src: str | None, top_k: int, num_experts: int) -> int:
    """Bytes one decode token reads: every tensor but the embedding (one row) and the expert tensors
    (top_k / num_experts of them)."""
    sys.path.insert(0, str(llama_src(src) / "gguf-py"))
    import gguf

    total = 0
    for t in gguf.GGUFReader(path).tensors:
        if t.name == "token_embd.weight":
            total += int(t.n_bytes) // int(t.shape[-1])
        elif "_exps." in t.name:
            total += int(t.n_bytes) * top_k // num_experts
        else:
            total += int(t.n_bytes)
    return total


def open_llama(model_dir: Path, qtype: str, args):
    """(llama_cpp.Llama on the cached GGUF of `qtype`, that GGUF's path, its weight bytes per decode token, load
    seconds)."""
    import llama_cpp

    from moecluster.loading import read_config

    shape = read_config(model_dir)[1].shape()
    path = gguf_file(model_dir, qtype, args.llama_cpp_src)
    nbytes = gguf_bytes_per_token(path, args.llama_cpp_src, shape.top_k, shape.num_experts)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(
        str(path), n_ctx=512, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False
    )
    return llm, path, nbytes, time.perf_counter() - t0


def gaps(llm, prompt: list[int], tokens: int) -> list[float]:
    """Seconds between consecutive tokens of a greedy stream of `tokens` tokens."""
    stamps = []
    for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == tokens:
            break
    return [b - a for a, b in zip(stamps, stamps[1:])]


def run_llama(model_dir: Path, qtype: str, prompt: list[int], bw, args, prefill_tokens: int) -> dict:
    """Batch-1 rounds (bandwidth, decode, bandwidth) and prefill of `prefill_tokens`, as quant.run_ours."""
    from moecluster.loading import read_config

    shape = read_config(model_dir)[1].shape()
    llm, path, nbytes, load_s = open_llama(model_dir, qtype, args)

    gaps(llm, prompt, 4)  # warm-up
    runs, after = [], bw()
    for _ in range(args.rounds):
        before = after
        s = statistics.median(gaps(llm, prompt, args.tokens))
        after = bw()
        ref = (before + after) / 2
        runs.append({"s_per_token": s, "reference_gbs": ref, "ratio": nbytes / s / 1e9 / ref})
    long_prompt = [(31 * i + 11) % shape.vocab_size for i in range(prefill_tokens)]
    times = []
    for _ in range(3):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(long_prompt)
        times.append(time.perf_counter() - t0)
    del llm
    s = statistics.median(r["s_per_token"] for r in runs)
    return {
        "engine": "llama.cpp",
        "format": qtype,
        "gguf": path.name,
        "load_s": load_s,
        "bytes_per_token": nbytes,
        "tok_s": 1 / s,
        "gbs": nbytes / s / 1e9,
        "reference_gbs": statistics.median(r["reference_gbs"] for r in runs),
        "ratio": statistics.median(r["ratio"] for r in runs),
        "rounds": runs,
        "batch8": None,
        "prefill_tok_s": prefill_tokens / statistics.median(times),
    }
