"""gpt-oss with MXFP4 experts as the Hub ships them, and gpt-oss experts (with biases) quantized on load.

The checkpoint: a tiny transformers GptOssForCausalLM (D = F = 64: multiples of mxfp4's 32 and of the int
groups of 64) whose fused experts are quantized with quant.quantize_mxfp4 and written as the Hub's
`*_blocks` [E, rows, in/32, 16] uint8 + `*_scales` [E, rows, in/32] uint8 (gate/up interleaved along the 2F
rows), biases in bf16, and its quantization_config. The reference is transformers itself loading that
directory (on CPU it dequantizes the experts exactly, by convert_moe_packed_tensors), run in fp32.

Tolerances: the plain torch path computes the same fp32 products -> logits within 1e-4. The compiled kernel
rounds x to bf16 inside the expert products: relative L2 error per position, median < 1%, < 2% at 90% of
positions (the bound of the fp8 test; measured here: see test_mxfp4_checkpoint_matches_transformers).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import VOCAB, build_tiny

from moecluster.errors import MoeClusterError
from moecluster.kernels.apply import apply_kernels
from moecluster.loading import load_model, read_config
from moecluster.models.gpt_oss import gate_up_rows
from moecluster.models.moe import RoutedExperts, torch_moe_gemm
from moecluster.quant import quantize_mxfp4
from moecluster.quant.experts import QuantizedRoutedExperts, QuantOptions

# openai/gpt-oss-20b's quantization_config, verbatim
MXFP4_CONFIG = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
IDS = torch.randint(0, VOCAB, (1, 64), generator=torch.Generator().manual_seed(11))
E, D, F, LAYERS = 8, 64, 64, 3


def build_mxfp4(out: Path) -> tuple[Path, Path]:
    """(the mxfp4 checkpoint, the float checkpoint it was quantized from)."""
    float_dir = build_tiny("gpt_oss", out / "float", intermediate_size=F)
    mxfp4_dir = out / "mxfp4"
    shutil.copytree(float_dir, mxfp4_dir)
    disk = {}
    for name, t in load_file(str(float_dir / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):  # [E, in, out] -> [E, out, in/32, 16]
            disk[f"{name}_blocks"], disk[f"{name}_scales"] = quantize_mxfp4(t.transpose(1, 2))
        elif name.endswith("_proj_bias") and ".experts." in name:
            disk[name] = t.to(torch.bfloat16)  # as shipped
        else:
            disk[name] = t
    save_file(disk, str(mxfp4_dir / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((mxfp4_dir / "config.json").read_text())
    (mxfp4_dir / "config.json").write_text(json.dumps(cfg | {"quantization_config": MXFP4_CONFIG}))
    return mxfp4_dir, float_dir


@pytest.fixture(scope="module")
def gpt_oss_mxfp4(tmp_path_factory) -> tuple[Path, Path]:
    return build_mxfp4(tmp_path_factory.mktemp("gpt_oss_mxfp4"))


def _logits(model) -> torch.Tensor:
    model.setup_cache(1)
    with torch.inference_mode():
        return model(IDS, torch.tensor([0]))[0]


def _transformers_logits(model_dir: Path) -> tuple[torch.Tensor, torch.nn.Module]:
    pytest.importorskip("accelerate")  # transformers' mxfp4 loader needs it
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return ref(IDS).logits[0], ref


def test_mxfp4_checkpoint_matches_transformers(gpt_oss_mxfp4):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    mxfp4_dir, _ = gpt_oss_mxfp4
    want, ref = _transformers_logits(mxfp4_dir)
    loaded = load_model(mxfp4_dir, "fp32")
    disk = load_file(str(mxfp4_dir / "model.safetensors"))
    for layer, moe in enumerate(loaded.model.moe_layers()):
        experts = moe.experts
        assert isinstance(experts, QuantizedRoutedExperts) and experts.fmt == "mxfp4"
        p = f"model.layers.{layer}.mlp.experts"
        # held as shipped, gate/up rows de-interleaved; no dequantized copy
        assert torch.equal(experts.w13_eGD.data, disk[f"{p}.gate_up_proj_blocks"][:, gate_up_rows(F)])
        assert torch.equal(experts.w13_eGD.scales, disk[f"{p}.gate_up_proj_scales"][:, gate_up_rows(F)])
        assert torch.equal(experts.w2_eDF.data, disk[f"{p}.down_proj_blocks"])
        # our exact dequantization is transformers' (its [E, D, 2F] interleaved, x @ W layout)
        hf = ref.model.layers[layer].mlp.experts
        assert torch.equal(
            convert_moe_packed_tensors(
                disk[f"{p}.gate_up_proj_blocks"], disk[f"{p}.gate_up_proj_scales"], dtype=torch.float32
            ),
            hf.gate_up_proj,
        )
        assert torch.equal(
            experts.w13_eGD.dequantize().transpose(1, 2)[..., gate_up_rows(F).argsort()], hf.gate_up_proj
        )
        assert torch.equal(experts.w2_eDF.dequantize().transpose(1, 2), hf.down_proj)
    got = _logits(loaded.model)
    assert (got - want).abs().max().item() <= 1e-4
    fast = _logits(apply_kernels(load_model(mxfp4_dir, "fp32").model))
    rel_T = (fast - want).norm(dim=-1) / want.norm(dim=-1)
    print(
        f"mxfp4 kernel vs transformers: relative L2 per position median {rel_T.median():.4f}, "
        f"90% {rel_T.quantile(0.9):.4f}, max {rel_T.max():.4f}"
    )
    assert rel_T.median() < 0.01 and rel_T.quantile(0.9) < 0.02


def test_held_experts_are_the_mxfp4_bytes_read_by_expert(gpt_oss_mxfp4):
    """A rank holding experts [1, 5] keeps their blocks + scales (+ bf16->fp32 biases) and reads from disk the
    dense tensors and only those experts' byte ranges."""
    mxfp4_dir, _ = gpt_oss_mxfp4
    loaded = load_model(mxfp4_dir, "fp32", expert_filter=lambda layer: [5, 1], progress="")
    per_expert = 2 * F * D // 2 + 2 * F * D // 32 + D * F // 2 + D * F // 32  # packed nibbles + e8m0 per 32
    for moe in loaded.model.moe_layers():
        experts = moe.experts
        assert experts.expert_ids == [1, 5]
        assert experts.w13_eGD.nbytes() + experts.w2_eDF.nbytes() == 2 * per_expert
        assert experts.expert_bytes() == per_expert + 4 * (2 * F + D)
        floats = [p for p in experts.parameters() if p.is_floating_point()]
        assert sum(p.numel() for p in floats) == 2 * (2 * F + D)  # only the biases are held as floats
        sub = experts.subset([5])
        assert torch.equal(sub.w13_eGD.data[0], experts.w13_eGD.data[1])
        assert sub.b13_eG is not None and experts.b13_eG is not None
        assert torch.equal(sub.b13_eG[0], experts.b13_eG[1])
    disk = load_file(str(mxfp4_dir / "model.safetensors"))
    expert_bytes = sum(t.nbytes for n, t in disk.items() if ".experts." in n)
    dense_bytes = sum(t.nbytes for n, t in disk.items() if ".experts." not in n)
    assert loaded.load is not None and loaded.load.bytes == dense_bytes + expert_bytes * 2 // E


def _dequantized(experts: QuantizedRoutedExperts) -> RoutedExperts:
    """The same experts as float RoutedExperts: weights exactly dequantized, the same biases and activation."""
    out = experts.empty_like(experts.expert_ids, torch.float32)
    out.gemm = torch_moe_gemm  # empty_like keeps the quantized gemm
    for i in range(len(experts.expert_ids)):
        assert experts.b13_eG is not None and experts.b2_eD is not None
        out.set_expert(
            i, experts.w13_eGD.dequantize(i), experts.w2_eDF.dequantize(i), experts.b13_eG[i], experts.b2_eD[i]
        )
    return out


def test_quantize_on_load_of_bf16_gpt_oss(gpt_oss_mxfp4):
    """--quantize int8 / int4 on a float gpt-oss (experts with biases and the clamped SwiGLU): logits equal the
    float model's with the dequantized expert weights (1e-4), and int8 stays close to the unquantized model
    (measured median 1.7% relative L2 per position; int4 on these random weights drifts far: 38%)."""
    _, float_dir = gpt_oss_mxfp4
    want = _logits(load_model(float_dir, "fp32").model)
    for fmt in ("int8", "int4"):
        model = load_model(float_dir, "fp32", quant=QuantOptions(fmt, 64)).model
        got = _logits(model)
        for moe in model.moe_layers():
            assert isinstance(moe.experts, QuantizedRoutedExperts) and moe.experts.fmt == fmt
            assert moe.experts.b13_eG is not None
            moe.experts = _dequantized(moe.experts)
        assert (got - _logits(model)).abs().max().item() <= 1e-4
        rel_T = (got - want).norm(dim=-1) / want.norm(dim=-1)
        print(f"{fmt} vs unquantized: relative L2 per position median {rel_T.median():.4f}, max {rel_T.max():.4f}")
        if fmt == "int8":
            assert rel_T.median() < 0.03


def test_mxfp4_errors(gpt_oss_mxfp4, tiny_mixtral, tmp_path):
    mxfp4_dir, _ = gpt_oss_mxfp4
    with pytest.raises(MoeClusterError, match="already quantized"):
        load_model(mxfp4_dir, quant=QuantOptions("int8", 64))
    other = tmp_path / "mixtral-mxfp4"
    other.mkdir()
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"quantization_config": MXFP4_CONFIG}))
    with pytest.raises(MoeClusterError, match="mxfp4 checkpoints are read for gpt-oss.*'mixtral'"):
        read_config(other)
    fp8 = tmp_path / "gpt-oss-fp8"
    shutil.copytree(mxfp4_dir, fp8)
    cfg = json.loads((fp8 / "config.json").read_text())
    (fp8 / "config.json").write_text(
        json.dumps(
            cfg
            | {
                "quantization_config": {
                    "quant_method": "fp8",
                    "fmt": "e4m3",
                    "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128],
                }
            }
        )
    )
    with pytest.raises(MoeClusterError, match=r"quantized \(fp8\).*mxfp4"):
        load_model(fp8)


@pytest.mark.multirank
def test_two_ranks_bit_identical_to_one_with_mxfp4_experts(gpt_oss_mxfp4, tmp_path):
    from test_expert_parallel import PROMPT, run_jobs

    from moecluster.engine.generate import Engine
    from moecluster.engine.sampling import SamplingParams

    mxfp4_dir, float_dir = gpt_oss_mxfp4
    jobs = [
        {"name": "mxfp4", "model": str(mxfp4_dir), "placement": "round-robin"},
        {"name": "int4", "model": str(float_dir), "placement": "contiguous", "quantize": "int4"},
    ]
    results = run_jobs(jobs, "mpi", 2, tmp_path)
    torch.set_num_threads(1)  # as each rank runs
    for job in jobs:
        quant = QuantOptions(job["quantize"], 64) if "quantize" in job else None
        engine = Engine(load_model(job["model"], "fp32", quant=quant))
        with torch.inference_mode():
            logits = engine.model(torch.tensor([PROMPT]), torch.tensor([0]))[0]
        _, tokens, _ = engine.generate(PROMPT, SamplingParams(max_tokens=32, ignore_eos=True))
        assert torch.equal(results[job["name"]][0], logits), job["name"]
        assert results[job["name"]][1] == tokens, job["name"]
