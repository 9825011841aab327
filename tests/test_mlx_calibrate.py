"""`moecluster calibrate --engine mlx` -> profile (engine "mlx") -> `plan --profile`, on Linux mlx[cpu]: the flow
and the profile's contents, not speed (MLX's CPU path here is no Mac)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

from cli_runner import run_cli  # noqa: E402

from moecluster.perfmodel.profile import load_profile  # noqa: E402

TERMS = ("attention_per_layer", "router_per_layer", "expert_eval", "head", "sampling")


def _plan(model, profile, nodes: str) -> dict:
    res = run_cli(
        "plan", "--model", str(model), "--node", "linux-2core", "--nodes", nodes, "--profile", str(profile),
        "--batch", "1", "--context", "16", "--json", "--no-plots",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


@pytest.mark.slow
def test_one_rank_profile_from_the_mlx_engine(tiny_mixtral, tmp_path):
    """One rank measured in this process (as a rank started by hand on a Mac would be), then assembled with
    --from-results; plan reads it and says which engine measured it."""
    result, out = tmp_path / "engine.json", tmp_path / "profile.json"
    res = run_cli(
        "calibrate", "--engine", "mlx", "--model", str(tiny_mixtral), "--rank-worker", "--phase", "engine",
        "--result", str(result), "--batch", "1,2", "--steps", "3", "--warmup", "1",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    raw = json.loads(result.read_text())
    assert raw["engine"] == "mlx" and raw["world_size"] == 1 and raw["device"] in ("cpu", "gpu")
    res = run_cli("calibrate", "--model", str(tiny_mixtral), "--from-results", str(result), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert "engine mlx" in res.stdout
    data, profile = json.loads(out.read_text()), load_profile(out)
    assert data["engine"] == "mlx" and data["dtype"] == "fp32" and profile.meta["engine"] == "mlx"
    for key in TERMS:
        assert [x for x, _ in profile.times[key]] == ([1.0] if key == "expert_eval" else [1.0, 2.0]), key
        assert all(seconds > 0 for _, seconds in profile.times[key]), key
    # the MLX engine runs a step's rows one after another: one token per expert evaluation at batch 2 too
    assert data["measured"]["batches"]["2"]["tokens_per_expert"] == 1.0
    cfg = json.loads((tiny_mixtral / "config.json").read_text())
    assert profile.exchange_bytes_per_token == cfg["num_experts_per_tok"] * cfg["hidden_size"] * 4  # exact, fp32
    assert not profile.allreduce and profile.memory_efficiency is not None and 0 < profile.memory_efficiency <= 1
    report = _plan(tiny_mixtral, out, "1")
    assert report["profile_engine"] == "mlx"
    attn = data["times_s"]["attention_per_layer"][0][1]
    assert report["configs"][0]["breakdown_ms"]["attention"] == pytest.approx(3 * attn * 1e3)


def test_calibrate_mlx_refuses_what_the_engine_lacks(tiny_mixtral):
    res = run_cli("calibrate", "--engine", "mlx", "--model", str(tiny_mixtral), "--exchange", "sum")
    assert res.returncode == 2 and "--engine mlx does not support --exchange sum" in res.stderr


@pytest.mark.multirank
def test_two_rank_ring_profile_and_plan(tiny_mixtral, tmp_path):
    out = tmp_path / "profile.json"
    res = run_cli(
        "calibrate", "--engine", "mlx", "--model", str(tiny_mixtral), "--nodes", "2", "--batch", "1,2",
        "--steps", "3", "--warmup", "1", "--ar-iters", "20", "--network", "10gbe", "--out", str(out),
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    data, profile = json.loads(out.read_text()), load_profile(out)
    assert data["engine"] == "mlx" and data["measured"]["ranks"] == 2 and data["measured"]["backend"] == "mlx-ring"
    per_token = profile.exchange_bytes_per_token
    sizes = [size for size, _ in profile.allreduce[2]]
    assert per_token in sizes and 2 * per_token in sizes  # the exchanges the engine sent, at its dtype
    assert all(seconds > 0 for _, seconds in profile.allreduce[2])
    assert data["measured"]["batches"]["1"]["all_reduce_per_layer"] > 0
    one, two = _plan(tiny_mixtral, out, "1-2")["configs"]
    assert two["exchange_algorithm"] == "measured" and one["breakdown_ms"]["exchange"] == 0
