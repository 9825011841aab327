"""One rank of an expert-parallel test job: for each (model, placement) job, the prompt's logits and 32
greedy tokens, saved by rank 0 (one process launch for many jobs keeps the suite fast).

    ep_worker.py JOBS.json BACKEND OUT_DIR        JOBS: [{"name", "model", "placement"[, "quantize"]}, ...]
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from moecluster.distributed.comm import init_comm
from moecluster.engine.sampling import SamplingParams
from moecluster.quant.experts import QuantOptions
from moecluster.runtime import open_engine

PROMPT = list(range(3, 40, 3))


def main() -> int:
    jobs_path, backend, out_dir = sys.argv[1:4]
    comm = init_comm(backend, timeout_s=60)
    try:
        for job in json.loads(Path(jobs_path).read_text()):
            quant = QuantOptions(job["quantize"], job.get("group_size", 64)) if job.get("quantize") else None
            engine, _ = open_engine(job["model"], "fp32", comm, job["placement"], quant=quant)
            with torch.inference_mode():
                logits = engine.model(torch.tensor([PROMPT]), torch.tensor([0]))
            _, tokens, _ = engine.generate(PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))
            held = [len(moe.experts.expert_ids) for moe in engine.model.moe_layers()]
            if comm.rank == 0:
                save_file(
                    {"logits": logits[0].contiguous(), "tokens": torch.tensor(tokens)},
                    str(Path(out_dir) / f"{job['name']}.safetensors"),
                )
            print(f"rank {comm.rank} {job['name']} held {held}", file=sys.stderr)
            del engine
            gc.collect()
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
