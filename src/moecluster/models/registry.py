"""model_type -> the architecture file that runs it (its model class and on-disk weight map).

Adding an architecture: a config dataclass in configs.py, a file `models/<arch>.py` with the model
class and `dense_weights` / `expert_weights` / `read_expert` (optionally `ignored_on_disk(cfg, name)`: tensors
the checkpoint ships that the model does not run; `read_expert_mxfp4`: experts shipped in MXFP4, as gpt-oss's), and
one line here.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from moecluster.errors import MoeClusterError
from moecluster.models import dbrx, deepseek_v3, glm4_moe, gpt_oss, mixtral, olmoe, qwen2_moe, qwen3_moe
from moecluster.models.configs import CONFIGS, ArchConfig
from moecluster.models.layers import DecoderModel

ModelClass = Callable[[Any], DecoderModel]  # XxxForCausalLM(cfg)
ARCHITECTURES: dict[str, tuple[ModelClass, ModuleType]] = {
    "dbrx": (dbrx.DbrxForCausalLM, dbrx),
    "mixtral": (mixtral.MixtralForCausalLM, mixtral),
    "qwen3_moe": (qwen3_moe.Qwen3MoeForCausalLM, qwen3_moe),
    "qwen2_moe": (qwen2_moe.Qwen2MoeForCausalLM, qwen2_moe),
    "olmoe": (olmoe.OlmoeForCausalLM, olmoe),
    "glm4_moe": (glm4_moe.Glm4MoeForCausalLM, glm4_moe),
    "deepseek_v3": (deepseek_v3.DeepseekV3ForCausalLM, deepseek_v3),
    "deepseek_v2": (deepseek_v3.DeepseekV3ForCausalLM, deepseek_v3),
    "gpt_oss": (gpt_oss.GptOssForCausalLM, gpt_oss),
}


def architecture(cfg: ArchConfig) -> tuple[ModelClass, ModuleType]:
    """The model class and weight-map module for a parsed config; one clear error if it cannot run."""
    if cfg.model_type not in ARCHITECTURES:
        runnable = ", ".join(sorted(ARCHITECTURES))
        plan_only = ", ".join(sorted(set(CONFIGS) - set(ARCHITECTURES)))
        raise MoeClusterError(
            f"model_type {cfg.model_type!r} is not supported by the engine yet (it runs: "
            f"{runnable}); `moecluster plan` and `place` also know {plan_only}"
        )
    return ARCHITECTURES[cfg.model_type]
