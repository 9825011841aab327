"""moecluster.perfmodel: pure-Python performance model of expert-parallel MoE inference.

Predicts decode tokens/s (with a per-term time breakdown), prefill time / TTFT, memory per node
and tokens/s per dollar for N nodes on a network, from a model shape, node and network presets
(presets.json, every number sourced) and optionally a measured profile (see `profile`).
No torch import anywhere in this package; matplotlib only inside `plots.write_plots`.
"""

from moecluster.perfmodel.network import allreduce_time, interpolate
from moecluster.perfmodel.predict import Breakdown, Memory, Prediction, Workload, memory_per_node, predict
from moecluster.perfmodel.presets import NetworkSpec, NodeSpec, Presets, SystemSpec, load_presets
from moecluster.perfmodel.profile import Profile, load_profile, profile_from_dict
from moecluster.perfmodel.routing import RankLoad, expected_distinct_experts, uniform_rank_load
from moecluster.perfmodel.shapes import ModelShape, from_hf_config, load_model

__all__ = [
    "Breakdown",
    "Memory",
    "ModelShape",
    "NetworkSpec",
    "NodeSpec",
    "Prediction",
    "Presets",
    "Profile",
    "RankLoad",
    "SystemSpec",
    "Workload",
    "allreduce_time",
    "expected_distinct_experts",
    "from_hf_config",
    "interpolate",
    "load_model",
    "load_presets",
    "load_profile",
    "memory_per_node",
    "predict",
    "profile_from_dict",
    "uniform_rank_load",
]
