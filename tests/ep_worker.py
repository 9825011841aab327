"""One rank of an expert-parallel test job: prompt logits and 32 greedy tokens, saved by rank 0.

    ep_worker.py MODEL_DIR PLACEMENT BACKEND OUT.safetensors
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file

from moecluster.distributed.comm import init_comm
from moecluster.engine.sampling import SamplingParams
from moecluster.runtime import open_engine

PROMPT = list(range(3, 40, 3))


def main() -> int:
    model_dir, placement, backend, out = sys.argv[1:5]
    comm = init_comm(backend, timeout_s=60)
    try:
        engine, _ = open_engine(model_dir, "fp32", comm, placement)
        with torch.inference_mode():
            logits = engine.model(torch.tensor([PROMPT]), torch.tensor([0]))
        _, tokens, _ = engine.generate(PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))
        evals = [layer.moe.last_num_evaluated for layer in engine.model.layers]
        held = [len(layer.moe.experts.expert_ids) for layer in engine.model.layers]
        if comm.rank == 0:
            save_file({"logits": logits[0].contiguous(), "tokens": torch.tensor(tokens)}, out)
        print(f"rank {comm.rank} held {held} evals-last-step {evals}", file=sys.stderr)
    finally:
        comm.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
