"""The compiled expert mat-vec kernel against fp32 references and against torch's path."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moecluster import kernels

needs_kernel = pytest.mark.skipif(
    not kernels.moe_gemv_available(), reason=f"moe_gemv unavailable: {kernels.unavailable_reason}"
)


def reference(w_eRC, experts, x_kC):
    x_kC = x_kC.expand(len(experts), -1) if x_kC.dim() == 1 else x_kC
    return torch.stack([w_eRC[e].float() @ x_kC[k].float() for k, e in enumerate(experts)]).bfloat16()


@needs_kernel
@pytest.mark.parametrize("E,R,C", [(8, 96, 48), (8, 7, 64), (4, 33, 100), (16, 512, 2048), (3, 1, 31)])
def test_moe_gemv_equals_fp32_reference_rounded(E, R, C):
    gen = torch.Generator().manual_seed(E * R + C)
    w = torch.randn(E, R, C, generator=gen).bfloat16()
    experts = [e % E for e in (2, 0, E - 1, 1)]
    x = torch.randn(C, generator=gen).bfloat16()
    out = kernels.moe_gemv(w, experts, x, torch.zeros(4, R, dtype=torch.bfloat16))
    # fp32 accumulation, then one rounding to bf16: at most one bf16 ulp from the fp32 reference
    ref = reference(w, experts, x)
    assert torch.allclose(out.float(), ref.float(), rtol=2**-7, atol=1e-6)
    xs = torch.randn(4, C, generator=gen).bfloat16()
    out2 = torch.full((6, R), 7.0, dtype=torch.bfloat16)
    kernels.moe_gemv(w, experts, xs, out2, out_rows=[5, 0, 2, 3])
    assert torch.allclose(out2[[5, 0, 2, 3]].float(), reference(w, experts, xs).float(), rtol=2**-7, atol=1e-6)
    assert (out2[[1, 4]] == 7.0).all(), "rows not named in out_rows must stay untouched"


@needs_kernel
def test_moe_gemv_is_reproducible_across_thread_counts_and_companions():
    """Each output row comes from one thread in a fixed order: the same bits whatever the thread
    count or which other experts share the call (what makes ranks and placements agree)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(6, 130, 200, generator=gen).bfloat16()
    x = torch.randn(200, generator=gen).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = kernels.moe_gemv(w, [4], x, torch.empty(1, 130, dtype=torch.bfloat16))
        torch.set_num_threads(2)
        together = kernels.moe_gemv(w, [1, 4, 0], x, torch.empty(3, 130, dtype=torch.bfloat16))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone[0], together[1])


@needs_kernel
def test_moe_gemv_rejects_bad_arguments():
    w = torch.zeros(2, 4, 8, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        kernels.moe_gemv(w, [2], torch.zeros(8, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernels.moe_gemv(w.float(), [0], torch.zeros(8), torch.zeros(1, 4))
    with pytest.raises(ValueError):
        kernels.moe_gemv(w, [0], torch.zeros(7, dtype=torch.bfloat16), torch.zeros(1, 4, dtype=torch.bfloat16))


@needs_kernel
def test_grouped_experts_decode_with_kernel_matches_torch_path():
    """The single-token path through the kernel against the per-expert torch mat-vecs."""
    from moecluster.kernels.apply import fast_moe_gemm
    from moecluster.models.moe import RoutedExperts

    gen = torch.Generator().manual_seed(0)
    experts = RoutedExperts(8, 64, 48, [0, 2, 3, 5, 6, 7], dtype=torch.bfloat16)
    experts.gemm = fast_moe_gemm
    experts.w13_eGD.copy_(torch.randn(experts.w13_eGD.shape, generator=gen) * 0.1)
    experts.w2_eDF.copy_(torch.randn(experts.w2_eDF.shape, generator=gen) * 0.1)
    x = torch.randn(1, 64, generator=gen).bfloat16()
    ids = torch.tensor([[6, 0, 3]])
    mine = torch.tensor([[True, False, True]])
    y, n = experts.pairs(x, ids, mine)
    assert n == 2 and (y[0, 1] == 0).all()
    for k in (0, 2):
        i = experts.expert_ids.index(int(ids[0, k]))
        gate, up = torch.mv(experts.w13_eGD[i], x[0]).chunk(2)
        want = torch.mv(experts.w2_eDF[i], F.silu(gate) * up)
        assert torch.allclose(y[0, k].float(), want.float(), rtol=0.02, atol=1e-3), k


def test_kernels_can_be_switched_off():
    code = (
        "import os; os.environ['MOECLUSTER_KERNELS'] = '0'\n"
        "from moecluster import kernels\n"
        "assert not kernels.moe_gemv_available()\n"
        "assert 'MOECLUSTER_KERNELS=0' in kernels.unavailable_reason\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@needs_kernel
@pytest.mark.parametrize("E,R,C", [(8, 96, 48), (8, 7, 64), (16, 64, 2048), (4, 9, 1000), (4, 9, 4100)])
def test_moe_gemm_pairs_equal_moe_gemv_alone(E, R, C):
    """Batched pairs (several inputs per expert, any order) give each pair the bits moe_gemv gives it alone
    (one pair per expert takes the row-after-row path for rows up to 4096 columns, with a partial last 32)."""
    gen = torch.Generator().manual_seed(E + R + C)
    w = torch.randn(E, R, C, generator=gen).bfloat16()
    X = torch.randn(5, C, generator=gen).bfloat16()
    experts, counts = [1, 3, E - 2], [2, 6, 1]
    x_rows, out_rows = [0, 4, 0, 1, 2, 3, 4, 2, 1], [8, 0, 1, 2, 3, 4, 5, 6, 7]
    out = torch.zeros(9, R, dtype=torch.bfloat16)
    kernels.moe_gemm(w, experts, counts, X, x_rows, out, out_rows)
    expert_of = [e for e, c in zip(experts, counts) for _ in range(c)]
    for p in range(9):
        alone = kernels.moe_gemv(w, [expert_of[p]], X[x_rows[p]], torch.empty(1, R, dtype=torch.bfloat16))[0]
        assert torch.equal(out[out_rows[p]], alone), p
        ref = (w[expert_of[p]].float() @ X[x_rows[p]].float()).bfloat16()
        assert torch.allclose(out[out_rows[p]].float(), ref.float(), rtol=2**-7, atol=1e-6), p
    with pytest.raises(ValueError):
        kernels.moe_gemm(w, experts, [2, 6, 2], X, x_rows, out, out_rows)  # counts do not sum to the pairs
    with pytest.raises(ValueError):
        kernels.moe_gemm(w, experts, counts, X, [9] + x_rows[1:], out, out_rows)  # no such input row


@needs_kernel
def test_batched_decode_rows_equal_one_token_steps():
    """RoutedExperts on 6 tokens (the batched-decode path) == each token alone (the single path), bitwise."""
    from moecluster.kernels.apply import fast_moe_gemm
    from moecluster.models.moe import RoutedExperts

    gen = torch.Generator().manual_seed(1)
    experts = RoutedExperts(8, 64, 48, list(range(8)), dtype=torch.bfloat16)
    experts.gemm = fast_moe_gemm
    experts.w13_eGD.copy_(torch.randn(experts.w13_eGD.shape, generator=gen) * 0.1)
    experts.w2_eDF.copy_(torch.randn(experts.w2_eDF.shape, generator=gen) * 0.1)
    x = torch.randn(6, 64, generator=gen).bfloat16()
    ids = torch.stack([torch.randperm(8, generator=gen)[:3] for _ in range(6)])
    mine = torch.rand(6, 3, generator=gen) < 0.7
    y, _ = experts.pairs(x, ids, mine)
    for n in range(6):
        alone, _ = experts.pairs(x[n : n + 1], ids[n : n + 1], mine[n : n + 1])
        assert torch.equal(y[n], alone[0]), n


@needs_kernel
def test_linear_equals_moe_gemm_of_one_expert():
    """kernels.linear (the dense decode products) gives moe_gemm's bits for one expert whose pairs are the rows."""
    gen = torch.Generator().manual_seed(11)
    w = torch.randn(37, 300, generator=gen).bfloat16()
    x = torch.randn(5, 300, generator=gen).bfloat16()
    got = kernels.linear(w, x, torch.empty(5, 37, dtype=torch.bfloat16))
    want = kernels.moe_gemm(
        w[None], [0], [5], x, list(range(5)), torch.empty(5, 37, dtype=torch.bfloat16), list(range(5))
    )
    assert torch.equal(got, want)
    assert torch.allclose(got.float(), (x.float() @ w.float().T).bfloat16().float(), rtol=2**-7, atol=1e-6)
    with pytest.raises(ValueError):
        kernels.linear(w, x[:, :299], torch.empty(5, 37, dtype=torch.bfloat16))  # inputs do not match
    with pytest.raises(ValueError):
        kernels.linear(w.t().contiguous().t(), x, torch.empty(5, 37, dtype=torch.bfloat16))  # not contiguous


@needs_kernel
@pytest.mark.parametrize("arch", ["dbrx", "qwen3_moe", "qwen2_moe", "glm4_moe", "mixtral"])
def test_decode_attention_kernel_matches_torch_path(tmp_path, arch):
    """The compiled decode attention (clip: dbrx; per-head q/k norms: qwen3; biases: qwen2; partial rotary: glm4)
    against the torch path on the same bf16 model: the same keys and values cached (bits), logits within bf16
    rounding over 12 decode steps of 3 rows in a batch, and each row's bits equal to its decoding alone."""
    from moecluster.engine.generate import Engine
    from moecluster.loading import load_model
    from moecluster.models.layers import Attention
    from tests.tiny_models import build_tiny

    engine = Engine(load_model(build_tiny(arch, tmp_path / arch), "bf16"), num_slots=6)
    attns = [m for m in engine.model.modules() if isinstance(m, Attention)]
    assert attns and all(a.decode_kernel is not None for a in attns)
    kernel_path = attns[0].decode_kernel

    def use_kernel(on: bool) -> None:
        for a in attns:
            a.decode_kernel = kernel_path if on else None

    prompts = [[5, 17, 33, 2], [9, 9, 41, 7, 100, 3, 8], [77]]
    with torch.inference_mode():
        for on, base in ((True, 0), (False, 3)):  # kernel rows in slots 0-2, torch rows in slots 3-5
            use_kernel(on)
            for b, ids in enumerate(prompts):
                engine.step(torch.tensor([ids]), torch.tensor([0]), torch.tensor([base + b]))
        pos = torch.tensor([len(p) for p in prompts])
        tok = torch.tensor([[11], [12], [13]])
        for _ in range(12):
            use_kernel(True)
            got = engine.step(tok, pos, torch.arange(3))
            alone = torch.cat([engine.step(tok[b : b + 1], pos[b : b + 1], torch.tensor([b])) for b in range(3)])
            use_kernel(False)
            want = engine.step(tok, pos, torch.arange(3, 6))
            assert torch.equal(got, alone)
            rel = (got.float() - want.float()).norm(dim=-1) / want.float().norm(dim=-1)
            assert rel.max() < 0.03, rel
            tok, pos = want.argmax(-1, keepdim=True), pos + 1
        for a in attns:
            cache = a.cache
            assert torch.equal(cache.k[:3, :, : int(pos.max())], cache.k[3:, :, : int(pos.max())])
            assert torch.equal(cache.v[:3, :, : int(pos.max())], cache.v[3:, :, : int(pos.max())])


def _ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in bf16 units in the last place (same-sign values)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_kernel
@pytest.mark.parametrize("D", [2048, 100, 7])
def test_glue_ops_match_torch(D):
    """glue.c's RMSNorm, combine, SwiGLU, router softmax and renormalization against the torch code they replace,
    on shapes with vector tails: the combine bit for bit, the rest within one bf16 ulp (a sum's order, exp's last
    bit) on at most 1% of elements."""
    from moecluster.kernels import glue
    from moecluster.models.layers import RMSNorm
    from moecluster.models.moe import combine, silu_glu, softmax_topk

    gen = torch.Generator().manual_seed(D)
    x = (torch.randn(6, D, generator=gen) * 3).bfloat16()
    norm = RMSNorm(D, 1e-6).bfloat16()
    norm.weight.data = torch.randn(D, generator=gen).bfloat16()
    ulps = _ulps_bf16(glue.rms_norm(x, norm.weight, 1e-6), norm(x))
    assert ulps.max() <= 1 and (ulps > 0).float().mean() <= 0.01
    y, w = torch.randn(3, 8, D, generator=gen).bfloat16(), torch.rand(3, 8, generator=gen)
    assert torch.equal(glue.combine(y, w), combine(y, w, torch.bfloat16))
    h_PG = (torch.randn(9, 2 * D, generator=gen) * 4).bfloat16()
    gate, up = h_PG.chunk(2, dim=-1)
    ulps = _ulps_bf16(glue.silu_mul(gate, up), silu_glu(gate, up))
    assert ulps.max() <= 1 and (ulps > 0).float().mean() <= 0.01
    logits = (torch.randn(64, D, generator=gen) * 2).bfloat16()
    p = glue.softmax(logits)
    assert torch.allclose(p, torch.softmax(logits.float(), dim=-1), rtol=1e-6, atol=1e-9)
    k = min(4, D)
    ids_want, w_want = softmax_topk(logits, k, renorm_p=1.0)
    w_got, ids_got = torch.topk(p, k)
    assert torch.equal(ids_got, ids_want)
    assert torch.allclose(glue.renorm_(w_got), w_want, rtol=1e-6)
    with pytest.raises(ValueError):
        glue.rms_norm(x.float(), norm.weight, 1e-6)
    with pytest.raises(ValueError):
        glue.silu_mul(gate, up.contiguous())  # strides differ


@needs_kernel
@pytest.mark.parametrize(
    "arch, fmt",
    [("qwen3_moe", None), ("olmoe", None), ("mixtral", None), ("qwen3_moe", "int8"), ("mixtral", "int4")]
    + [("qwen3_moe", "fp8")],
)
def test_moe_decode_kernel_equals_pair_path(tmp_path, arch, fmt):
    """RoutedExperts.decode_kernel (one token's experts, SwiGLU and combine in one call; quantized stacks too)
    gives the bits of the per-pair path with the kernels, step after step of greedy decoding."""
    from moecluster.engine.generate import Engine
    from moecluster.loading import load_model
    from moecluster.models.moe import RoutedExperts
    from moecluster.quant.experts import QuantizedRoutedExperts, QuantOptions
    from tests.tiny_models import WIDE, build_fp8, build_tiny

    if fmt is None:
        loaded = load_model(build_tiny(arch, tmp_path / arch), "bf16")
    elif fmt == "fp8":
        loaded = load_model(build_fp8(arch, tmp_path)[0], "bf16")
    else:
        loaded = load_model(build_tiny(arch, tmp_path / arch, **WIDE[arch]), "bf16", quant=QuantOptions(fmt, 64))
    engine = Engine(loaded, num_slots=2)
    experts = [m for m in engine.model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(m.decode_kernel is not None for m in experts)
    if fmt is not None:
        assert all(isinstance(m, QuantizedRoutedExperts) and m.fmt == fmt for m in experts)
    fused = experts[0].decode_kernel
    calls = []

    def counted(*args):
        out = fused(*args)
        calls.append(out is not None)
        return out

    with torch.inference_mode():
        for slot in (0, 1):
            engine.step(torch.tensor([[5, 17, 33, 2]]), torch.tensor([0]), torch.tensor([slot]))
        tok, pos = torch.tensor([[11]]), torch.tensor([4])
        for _ in range(10):
            for m in experts:
                m.decode_kernel = counted
            got = engine.step(tok, pos, torch.tensor([0]))
            for m in experts:
                m.decode_kernel = None
            want = engine.step(tok, pos, torch.tensor([1]))
            assert torch.equal(got, want)
            tok, pos = want.argmax(-1, keepdim=True), pos + 1
    assert calls and all(calls)
