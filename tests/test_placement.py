"""Placement, assign, routing stats, planner and `moecluster place` (pure Python, no torch).

Legend: T tokens, K top-k, E experts, L layers, N ranks.
"""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest

from moecluster.cli import place as place_cli
from moecluster.errors import MoeClusterError
from moecluster.parallel.placement import Placement, groups_holders, make_placement
from moecluster.planning.placement_metrics import (
    AssignReplay,
    bytes_per_rank,
    expected_max_rank_load,
    placement_metrics,
    summarize,
)
from moecluster.planning.planner import GB, Cluster, plan
from moecluster.planning.routing_stats import RoutingStats, stats_from_trace, zipf_trace
from moecluster.planning.sizes import ModelSizes

DBRX_CONFIG = {
    "model_type": "dbrx",
    "d_model": 6144,
    "n_layers": 40,
    "n_heads": 48,
    "vocab_size": 100352,
    "attn_config": {"kv_n_heads": 8},
    "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 10752},
    "torch_dtype": "bfloat16",
}
MIXTRAL_CONFIG = {
    "model_type": "mixtral",
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "num_local_experts": 8,
    "num_experts_per_tok": 2,
    "vocab_size": 32000,
    "torch_dtype": "bfloat16",
}


def random_ids(rng: random.Random, num_tokens: int, num_experts: int, top_k: int) -> list[list[int]]:
    return [rng.sample(range(num_experts), top_k) for _ in range(num_tokens)]


def random_placement(
    rng: random.Random, num_layers: int, num_experts: int, world_size: int, speeds: list[float] | None = None
) -> Placement:
    holders = [
        [rng.sample(range(world_size), rng.randint(1, world_size)) for _ in range(num_experts)]
        for _ in range(num_layers)
    ]
    return Placement(holders, world_size, speeds)


# ---- placement invariants ---------------------------------------------------------------
@pytest.mark.parametrize("num_experts,world_size", [(16, 1), (16, 2), (16, 3), (8, 3), (16, 8), (7, 7)])
def test_contiguous_and_round_robin_invariants(num_experts: int, world_size: int) -> None:
    for spec in ("contiguous", "round-robin"):
        p = make_placement(spec, num_experts, 3, world_size)
        sizes = [len(p.experts_of(r, 0)) for r in range(world_size)]
        assert sum(sizes) == num_experts and max(sizes) - min(sizes) <= 1
        for layer in range(3):
            for e in range(num_experts):
                (holder,) = p.holders(layer, e)
                assert e in p.experts_of(holder, layer)
                if spec == "round-robin":
                    assert holder == e % world_size
    contiguous = make_placement("contiguous", num_experts, 1, world_size)
    owners = [contiguous.holders(0, e)[0] for e in range(num_experts)]
    assert owners == sorted(owners)  # blocks of consecutive experts


def test_more_ranks_than_experts() -> None:
    with pytest.raises(MoeClusterError, match="groups"):
        make_placement("contiguous", 4, 2, 8)
    p = make_placement("groups", 4, 2, 8)
    assert all(p.experts_of(r, 0) for r in range(8))
    assert all(len(p.holders(0, e)) == 2 for e in range(4))


def test_groups_holders() -> None:
    holders = groups_holders(16, 4, 2)  # experts 0-7 on ranks 0, 2; experts 8-15 on ranks 1, 3
    assert holders[0] == [0, 2] and holders[15] == [1, 3]
    assert groups_holders(16, 2) == [[0, 1]] * 16  # default ceil(N/2) groups: 1 group of 2


def test_placement_is_immutable() -> None:
    p = make_placement("contiguous", 8, 2, 2)
    with pytest.raises(AttributeError):
        p.world_size = 3
    p.experts_of(0, 0).append(99)
    assert 99 not in p.experts_of(0, 0)


# ---- assign -----------------------------------------------------------------------------
def test_assign_exactly_one_holder_per_pair_and_deterministic() -> None:
    rng = random.Random(0)
    for _ in range(50):
        world_size, num_experts, top_k = rng.randint(1, 6), rng.choice([8, 16]), rng.choice([2, 4])
        speeds = [rng.choice([0.5, 1.0, 2.0]) for _ in range(world_size)]
        p = random_placement(rng, 2, num_experts, world_size, speeds)
        twin = Placement.from_json(json.loads(json.dumps(p.to_json())))
        ids = random_ids(rng, rng.randint(1, 40), num_experts, top_k)
        ranks = p.assign(1, ids)
        assert [len(row) for row in ranks] == [len(row) for row in ids]
        for ids_row, rank_row in zip(ids, ranks):
            for e, r in zip(ids_row, rank_row):
                assert r in p.holders(1, e)
        p.assign(0, random_ids(rng, 3, num_experts, top_k))  # no state carried between calls
        assert p.assign(1, ids) == ranks == twin.assign(1, ids)


def test_assign_balances_replicas() -> None:
    full = make_placement("groups:1", 16, 1, 4)  # every rank holds every expert
    assert sorted(r for row in full.assign(0, [[3, 7, 9, 12]]) for r in row) == [0, 1, 2, 3]
    # 8 tokens with the same 4 experts: each expert's pairs stay on one rank, one expert per rank
    ranks = full.assign(0, [[1, 2, 3, 4]] * 8)
    assert all(len({row[k] for row in ranks}) == 1 for k in range(4))
    assert sorted(ranks[0]) == [0, 1, 2, 3]
    # speeds 2:1 -> the fast rank takes 3 of 4 pairs (max load/speed 1.5, not 2)
    fast = Placement([[[0, 1]] * 8], 2, [2.0, 1.0])
    loads = [0, 0]
    for r in fast.assign(0, [[0, 1, 2, 3]])[0]:
        loads[r] += 1
    assert loads == [3, 1]
    # single-holder experts count first: expert 0 (rank 0 only) pushes replicated 1 to rank 1
    p = Placement([[[0], [0, 1]]], 2)
    assert p.assign(0, [[0, 1]]) == [[0, 1]]
    # big prefill calls split a replicated expert across holders in chunks
    split = Placement([[[0, 1], [0]]], 2).assign(0, [[0]] * 64)
    assert sorted(sum(split, [])).count(0) == 32


@pytest.mark.parametrize("batch", [1, 4])
def test_replay_matches_assign(batch: int) -> None:
    rng = random.Random(batch)
    ids = zipf_trace(1, 16, 4, 512, seed=3)[0]
    for _ in range(5):
        p = random_placement(rng, 1, 16, 4, [1.0, 1.0, 0.5, 2.0])
        replay = AssignReplay(np.array(ids), batch, 16, np.array(p.speeds))
        experts_NB, _ = replay.loads([p.holders(0, e) for e in range(16)])
        want = np.zeros_like(experts_NB)
        for b in range(len(ids) // batch):
            chunk = ids[b * batch : (b + 1) * batch]
            for r, _e in {(r, e) for row, rr in zip(chunk, p.assign(0, chunk)) for e, r in zip(row, rr)}:
                want[r, b] += 1
        assert np.array_equal(experts_NB, want)


# ---- JSON -------------------------------------------------------------------------------
def test_json_round_trip_and_compact_form(tmp_path) -> None:
    same = make_placement("round-robin", 8, 4, 3)
    data = same.to_json()
    assert "default" in data and "layers" not in data
    assert Placement.from_json(data) == same
    varied = random_placement(random.Random(1), 4, 8, 3, [1.0, 1.0, 0.5])
    data = varied.to_json()
    assert "layers" in data and Placement.from_json(data) == varied
    path = tmp_path / "p.json"
    path.write_text(json.dumps(data))
    assert make_placement(str(path), 8, 4, 3) == varied
    with pytest.raises(MoeClusterError, match="moecluster place --nodes 4"):
        make_placement(str(path), 8, 4, 4)
    mixed = {**same.to_json(), "layers": [None, [[2]] * 8, None, None]}
    assert Placement.from_json(mixed).holders(1, 5) == (2,)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"format": "x"}, "not a placement file"),
        ({"default": [[0]] * 7}, "needs a list of 8"),
        ({"default": [[0]] * 7 + [[]]}, "no holder"),
        ({"default": [[0]] * 7 + [[3]]}, "not a rank index"),
        ({"default": [[0]] * 7 + [[1, 1]]}, "twice"),
        ({"speeds": [1.0, 0.0, 1.0]}, "speeds"),
        ({"layers": [None]}, "must list 2 layers"),
    ],
)
def test_json_validation_errors(change: dict, message: str) -> None:
    data = {**make_placement("contiguous", 8, 2, 3).to_json(), **change}
    with pytest.raises(MoeClusterError, match=message):
        Placement.from_json(data)


def test_make_placement_bad_spec() -> None:
    with pytest.raises(MoeClusterError, match="expected contiguous"):
        make_placement("/no/such/file.json", 8, 2, 2)


# ---- routing stats ----------------------------------------------------------------------
def test_routing_stats_record_save_load(tmp_path) -> None:
    stats = RoutingStats(num_layers=2, num_experts=4, max_samples=3)
    stats.record(0, [[0, 1], [1, 2]])
    stats.record(0, [[1, 3], [0, 1]])
    stats.record(1, [[2, 3]])
    assert stats.top_k == 2 and stats.tokens_L == [4, 1]
    assert stats.counts_LE[0] == [2, 4, 1, 1]
    assert stats.coact_LEE[0][0][1] == stats.coact_LEE[0][1][0] == 2
    assert stats.coact_LEE[0][1][1] == 4
    assert len(stats.samples_L[0]) == 3  # reservoir capped at max_samples
    assert sum(stats.frequencies(0)) == pytest.approx(2.0)
    path = tmp_path / "stats.json"
    stats.save(str(path))
    loaded = RoutingStats.load(str(path))
    assert loaded.to_json() == stats.to_json()
    with pytest.raises(MoeClusterError, match="profile-routing"):
        loaded.check_model(40, 16)


@pytest.mark.parametrize(
    "layer,message",
    [
        ({"tokens": 1}, "needs"),
        ({"tokens": 1, "counts": [1, 1, 1]}, "4 non-negative"),
        ({"tokens": 1, "counts": [1, 1, 0, 0], "coactivation": [[1]]}, "4x4"),
        ({"tokens": 1, "counts": [1, 1, 0, 0], "samples": [[0, 9]]}, "expert ids"),
    ],
)
def test_routing_stats_validation(layer: dict, message: str) -> None:
    data = {"format": "moecluster-routing-stats/1", "num_layers": 1, "num_experts": 4, "top_k": 2, "layers": [layer]}
    with pytest.raises(MoeClusterError, match=message):
        RoutingStats.from_json(data)


def test_zipf_trace_is_skewed_and_permuted() -> None:
    trace = zipf_trace(num_layers=2, num_experts=16, top_k=4, num_tokens=2000, seed=0)
    counts = [np.bincount(np.array(t).ravel(), minlength=16) for t in trace]
    assert all(len(set(row)) == 4 for row in trace[0])
    assert counts[0].max() > 4 * counts[0].min()
    assert counts[0].argmax() != counts[1].argmax() or counts[0].argmin() != counts[1].argmin()


# ---- planner ----------------------------------------------------------------------------
def dbrx_cluster(
    memory_gb: list[float] | None, speeds: list[float] | None = None, reserve_gb: float = 0.0
) -> tuple[ModelSizes, Cluster]:
    sizes = ModelSizes.from_hf_config(DBRX_CONFIG)
    n = len(memory_gb or speeds)
    cluster = Cluster(
        n,
        tuple(speeds or [1.0] * n),
        tuple(m * GB for m in memory_gb) if memory_gb else None,
        sizes.fixed_bytes,
        sizes.bytes_per_expert,
        reserve_gb * GB,
    )
    return sizes, cluster


def test_model_sizes_from_configs() -> None:
    dbrx = ModelSizes.from_hf_config(DBRX_CONFIG)
    assert (dbrx.num_layers, dbrx.num_experts, dbrx.top_k) == (40, 16, 4)
    assert dbrx.bytes_per_expert == 3 * 6144 * 10752 * 2
    total = dbrx.fixed_bytes + 40 * 16 * dbrx.bytes_per_expert
    assert 130e9 < total / 2 < 134e9  # DBRX has ~132B parameters
    mixtral = ModelSizes.from_hf_config(MIXTRAL_CONFIG)
    assert (mixtral.num_layers, mixtral.num_experts, mixtral.top_k) == (32, 8, 2)
    assert 45e9 < (mixtral.fixed_bytes + 32 * 8 * mixtral.bytes_per_expert) / 2 < 48e9  # ~46.7B


def test_planner_never_exceeds_memory() -> None:
    stats = stats_from_trace(zipf_trace(40, 16, 4, 512, seed=5), 16)
    cases = [[192, 192, 64], [100, 100, 100], [145, 145], [90, 90, 90, 40], [300, 40]]
    for memory_gb in cases:
        sizes, cluster = dbrx_cluster(memory_gb, reserve_gb=4)
        for strategy in ("contiguous", "round-robin", "groups", "optimized"):
            try:
                p = plan(strategy, 40, 16, 4, cluster, stats, replica_budget_bytes=60 * GB)
            except MoeClusterError as e:
                assert strategy != "optimized", e
                assert "use --strategy optimized" in str(e)
                continue
            used = bytes_per_rank(p, sizes.fixed_bytes, sizes.bytes_per_expert)
            for b, m in zip(used, cluster.memory_N):
                assert b + cluster.reserve_bytes <= m
            if strategy == "optimized":
                assert p.num_replicas() * sizes.bytes_per_expert <= 60 * GB


def test_planner_says_when_model_cannot_fit() -> None:
    _, cluster = dbrx_cluster([128, 128])
    with pytest.raises(MoeClusterError, match="does not fit.*add nodes or memory"):
        plan("optimized", 40, 16, 4, cluster)
    _, cluster = dbrx_cluster([192, 192, 8])
    with pytest.raises(MoeClusterError, match="rank 2 has 8.0 GB"):
        plan("contiguous", 40, 16, 4, cluster)


def test_optimizer_beats_contiguous_on_zipf_trace() -> None:
    profile = zipf_trace(6, 16, 4, 2048, seed=1, popularity_seed=0)
    held_out = zipf_trace(6, 16, 4, 2048, seed=2, popularity_seed=0)
    stats = stats_from_trace(profile, 16)
    for speeds in ([1.0] * 4, [1.0, 1.0, 0.5]):
        cluster = Cluster(len(speeds), tuple(speeds))
        budget = 0.25 * 6 * 16  # bytes_per_expert = 1
        base = summarize(placement_metrics(plan("contiguous", 6, 16, 4, cluster), held_out))
        opt_p = plan("optimized", 6, 16, 4, cluster, stats, budget)
        opt = summarize(placement_metrics(opt_p, held_out))
        assert opt_p.num_replicas() <= budget
        assert opt["imbalance_mean"] < 1.10 < base["imbalance_mean"]
        assert opt["step_max_experts_mean"] < base["step_max_experts_mean"]


def test_expected_max_rank_load() -> None:
    stats = stats_from_trace(zipf_trace(3, 16, 4, 256, seed=0), 16)
    full = make_placement("groups:1", 16, 3, 4)  # all experts everywhere: 1 expert per rank
    assert expected_max_rank_load(full, stats, batch=1) == [1.0, 1.0, 1.0]
    single = make_placement("contiguous", 16, 3, 1)
    assert expected_max_rank_load(single, stats, batch=1) == [4.0, 4.0, 4.0]
    loads = expected_max_rank_load(make_placement("contiguous", 16, 3, 4), stats, batch=4)
    assert len(loads) == 3 and all(1.0 <= x <= 16.0 for x in loads)


# ---- moecluster place -------------------------------------------------------------------
def run_place(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    place_cli.register(parser.add_subparsers())
    args = parser.parse_args(["place", *argv])
    return args.func(args)


def test_place_command_writes_loadable_placement(tmp_path, capsys) -> None:
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(MIXTRAL_CONFIG))
    stats_path = tmp_path / "stats.json"
    stats_from_trace(zipf_trace(32, 8, 2, 256, seed=0), 8).save(str(stats_path))
    out = tmp_path / "placement.json"
    assert (
        run_place(
            [
                "--model",
                str(tmp_path),
                "--nodes",
                "3",
                "--memory-gb",
                "64,32,16",
                "--speed",
                "1,1,0.5",
                "--stats",
                str(stats_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "optimized" in text and "contiguous" in text and "fits" in text
    p = make_placement(str(out), 8, 32, 3)
    assert p.speeds == (1.0, 1.0, 0.5)
    assert json.loads(out.read_text())["planner"]["fits_memory"] == [True, True, True]
    with pytest.raises(MoeClusterError, match="does not fit"):
        run_place(["--model", str(cfg), "--nodes", "2", "--memory-gb", "20"])
    with pytest.raises(MoeClusterError, match="one positive value or 3"):
        run_place(["--model", str(cfg), "--nodes", "3", "--speed", "1,2"])
