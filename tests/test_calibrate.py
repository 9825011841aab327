"""`moecluster calibrate` -> profile -> `moecluster plan --profile` round trip on a tiny model, the
profile's what-if latency, and the emulated link (netns + TAP forwarder; root only)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from moecluster.errors import MoeClusterError
from moecluster.perfmodel.profile import load_profile, profile_from_dict

CLI = [sys.executable, "-m", "moecluster.cli"]


from cli_runner import run_cli  # noqa: E402  (in-process: no interpreter + torch start-up per call)


@pytest.fixture(scope="module")
def calibrated(tiny_dbrx, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibrate") / "profile.json"
    res = run_cli(
        "calibrate",
        "--model",
        str(tiny_dbrx),
        "--nodes",
        "2",
        "--backend",
        "mpi",
        "--batch",
        "1,2",
        "--steps",
        "6",
        "--warmup",
        "1",
        "--ar-iters",
        "40",
        "--network",
        "10gbe",
        "--repeats",
        "2",
        "--out",
        str(out),
    )
    assert res.returncode == 0, res.stderr[-2000:]
    return out, res.stdout


@pytest.mark.multirank
@pytest.mark.slow
def test_calibrate_writes_a_valid_profile(calibrated, tiny_dbrx):
    path, stdout = calibrated
    data = json.loads(path.read_text())
    profile = load_profile(path)  # validates
    assert data["network"] == "10gbe" and data["measured"]["ranks"] == 2 and data["measured"]["runs"] == 2
    for key in ("attention_per_layer", "router_per_layer", "expert_eval", "head", "sampling"):
        table = profile.times[key]
        assert table and all(seconds > 0 for _, seconds in table), key
    assert [x for x, _ in profile.times["attention_per_layer"]] == [1.0, 2.0]  # x = batch
    assert profile.times["expert_eval"][0][0] == 1.0  # batch 1: one token per evaluated expert
    cfg = json.loads((tiny_dbrx / "config.json").read_text())
    per_token = cfg["ffn_config"]["moe_top_k"] * cfg["d_model"] * 4  # exact exchange, fp32 model
    assert profile.exchange_bytes_per_token == per_token
    sizes = [size for size, _ in profile.allreduce[2]]
    assert per_token in sizes and 2 * per_token in sizes and 16 in sizes  # exchanges and the broadcast
    assert all(seconds > 0 for _, seconds in profile.allreduce[2])
    assert profile.memory_bandwidth and 0 < profile.memory_efficiency <= 1
    assert set(profile.latency_steps) == {2}  # MPICH: the algorithm's latency steps are known
    assert "tok/s" in stdout and "moecluster plan" in stdout


@pytest.mark.multirank
@pytest.mark.slow
def test_plan_uses_the_calibrated_profile(calibrated, tiny_dbrx):
    path, _ = calibrated
    res = run_cli(
        "plan",
        "--model",
        str(tiny_dbrx),
        "--node",
        "linux-2core",
        "--nodes",
        "1-3",
        "--profile",
        str(path),
        "--batch",
        "1",
        "--context",
        "16",
        "--json",
        "--no-plots",
    )
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    one, two, three = report["configs"]
    assert report["profile"] == str(path) and two["network"] == "10gbe"  # the profile's network
    assert two["exchange_algorithm"] == "measured" and three["exchange_algorithm"] != "measured"
    data = json.loads(path.read_text())
    attn, head = data["times_s"]["attention_per_layer"][0][1], data["times_s"]["head"][0][1]
    assert two["breakdown_ms"]["attention"] == pytest.approx(3 * attn * 1e3)  # 3 layers, measured
    assert two["breakdown_ms"]["head"] == pytest.approx(head * 1e3)
    assert one["breakdown_ms"]["exchange"] == 0 < two["breakdown_ms"]["exchange"]
    assert one["decode_tok_s"] > 0 and two["decode_tok_s"] > 0  # accuracy: benchmarks/perfmodel_validation.py


def test_profile_from_results_of_a_hand_started_job(tiny_dbrx, tmp_path):
    """Multi-host: ranks started by hand (here one, without a launcher) write a result; calibrate assembles."""
    result, out = tmp_path / "engine.json", tmp_path / "profile.json"
    res = run_cli(
        "calibrate",
        "--model",
        str(tiny_dbrx),
        "--rank-worker",
        "--backend",
        "single",
        "--phase",
        "engine",
        "--result",
        str(result),
        "--batch",
        "1",
        "--steps",
        "3",
        "--warmup",
        "0",
    )
    assert res.returncode == 0, res.stderr
    res = run_cli("calibrate", "--model", str(tiny_dbrx), "--from-results", str(result), "--out", str(out))
    assert res.returncode == 0, res.stderr
    profile = load_profile(out)
    assert profile.times["attention_per_layer"][0][0] == 1.0 and not profile.allreduce  # one rank
    res = run_cli("calibrate", "--model", str(tiny_dbrx), "--from-results", str(tiny_dbrx / "config.json"))
    assert res.returncode == 2 and "not a calibration result" in res.stderr


def test_added_latency_uses_the_latency_steps():
    base = {
        "format": "moecluster-profile",
        "version": 1,
        "network": "x",
        "allreduce": {"2": [[16, 1e-5], [65536, 5e-5]], "4": [[16, 2e-5], [65536, 8e-5]]},
        "allreduce_latency_steps": {"2": [[16, 1], [4096, 2], [16384, 1]]},
    }
    prof = profile_from_dict(base).with_added_latency(1e-4)
    assert prof.allreduce_time("x", 2, 16) == pytest.approx(1e-5 + 1e-4)
    assert prof.allreduce_time("x", 2, 8192) == pytest.approx(1e-5 + 4e-5 * 8176 / 65520 + 2e-4)
    assert prof.allreduce_time("x", 2, 32768) == pytest.approx(1e-5 + 4e-5 * 32752 / 65520 + 1e-4)
    assert prof.allreduce_time("x", 4, 16) == pytest.approx(2e-5 + 2 * 1e-4)  # no table: log2(4) steps
    assert prof.allreduce_time("other", 2, 16) is None
    assert profile_from_dict(base).allreduce_time("x", 2, 16) == pytest.approx(1e-5)
    with pytest.raises(MoeClusterError, match="added latency"):
        profile_from_dict(base).with_added_latency(-1.0)
    for bad, match in [
        ({"exchange_bytes_per_token": 0}, "exchange_bytes_per_token"),
        ({"memory_bandwidth_gbs": "fast"}, "memory_bandwidth_gbs"),
        ({"allreduce_latency_steps": {"1": [[16, 1]]}}, "world size"),
    ]:
        with pytest.raises(MoeClusterError, match=match):
            profile_from_dict({**base, **bad})


def test_calibrate_errors(tmp_path, tiny_dbrx):
    res = run_cli("calibrate", "--model", str(tmp_path / "nope"))
    assert res.returncode == 2 and "config.json" in res.stderr
    res = run_cli("calibrate", "--model", str(tiny_dbrx), "--network", "carrier-pigeon")
    assert res.returncode == 2 and "unknown network preset" in res.stderr
    res = run_cli("calibrate", "--model", str(tiny_dbrx), "--batch", "0")
    assert res.returncode == 2 and "--batch" in res.stderr


# -- emulated links ---------------------------------------------------------------------------

NETEMU_DIR = Path(__file__).resolve().parents[1] / "tools" / "netemu"  # a repository tool, not in the package
sys.path.insert(0, str(NETEMU_DIR))

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("gcc") or not os.path.exists("/dev/net/tun"),
    reason="emulated links need root, iproute2, gcc and /dev/net/tun",
)


@needs_root
def test_forwarder_adds_the_delay_and_cleans_up():
    from netemu import EmulatedLink, cleanup_leftovers, list_namespaces, measure_rtt

    rtt = {}
    for delay in (0, 300):
        link = EmulatedLink(delay)
        with link:
            names = list(link.names)
            assert set(names) <= set(list_namespaces())
            rtt[delay] = measure_rtt(link, rounds=400)["median_us"]
            forwarder = link.forwarder
        assert forwarder.returncode is not None  # stopped
        assert not set(names) & set(list_namespaces())  # namespaces gone
        assert "late mean" in link.report
    growth = rtt[300] - rtt[0]
    assert 560 <= growth <= 800, rtt  # 2 x 300 us, plus a little wake-up noise on a busy machine
    subprocess.run(["ip", "netns", "add", "mcemu999999999h0"], check=True)  # left by a dead process
    assert "mcemu999999999h0" in cleanup_leftovers()
    assert "mcemu999999999h0" not in list_namespaces()


def test_emulated_link_needs_root(monkeypatch):
    import netemu

    monkeypatch.setattr(netemu.os, "geteuid", lambda: 1000)
    with pytest.raises(MoeClusterError, match="root"):
        netemu.EmulatedLink(50).open()
    with pytest.raises(MoeClusterError, match=">= 0"):
        netemu.EmulatedLink(-1)
