"""Issue 15 item 6: threads and pinning as written. The README's multi-host commands (mpiexec -hosts ...
-ppn 1 -genv MOECLUSTER_PIN 1, and torchrun --nnodes 2) run on two "hosts" — two network namespaces joined
by tools/netemu's link — and each rank, alone on its host, decodes with every core and no pinning; ranks
sharing a host split its cores. The namespace tests need root (skipped otherwise)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from moecluster.distributed import comm as comm_mod

NETEMU_DIR = Path(__file__).resolve().parents[1] / "tools" / "netemu"  # a repository tool, not in the package
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize(
    ("local_rank", "local_size", "pin", "threads", "pinned"),
    [
        (0, 1, "1", CORES, False),  # one rank per host: every core, never pinned (MOECLUSTER_PIN ignored)
        (0, 1, None, CORES, False),
        (1, 2, "1", max(1, CORES // 2), True),  # ranks sharing a host: their share, each on its own cores
        (1, 2, None, max(1, CORES // 2), False),
    ],
)
def test_threads_and_pinning(monkeypatch, local_rank, local_size, pin, threads, pinned):
    import torch

    before_threads, before_cores = torch.get_num_threads(), os.sched_getaffinity(0)
    monkeypatch.delenv("MOECLUSTER_THREADS", raising=False)
    if pin is None:
        monkeypatch.delenv("MOECLUSTER_PIN", raising=False)
    else:
        monkeypatch.setenv("MOECLUSTER_PIN", pin)
    try:
        comm_mod._apply_cpu_settings(local_rank, local_size, world_size=2)
        assert torch.get_num_threads() == threads
        cores = os.sched_getaffinity(0)
        if pinned:
            assert len(cores) == threads and (CORES < 2 or cores.isdisjoint(sorted(before_cores)[:threads]))
        else:
            assert cores == before_cores
        assert comm_mod.CPU_NOTE[0].startswith(f"{threads} thread") and ("pinned" in comm_mod.CPU_NOTE[0]) == pinned
    finally:
        torch.set_num_threads(before_threads)
        os.sched_setaffinity(0, before_cores)


def test_bad_thread_count_is_one_error(monkeypatch):
    from moecluster.errors import MoeClusterError

    monkeypatch.setenv("MOECLUSTER_THREADS", "many")
    with pytest.raises(MoeClusterError, match="MOECLUSTER_THREADS must be a positive integer"):
        comm_mod._apply_cpu_settings(0, 1, world_size=2)


def _link():
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("network namespaces need root and /dev/net/tun")
    sys.path.insert(0, str(NETEMU_DIR))
    from netemu import EmulatedLink

    return EmulatedLink(delay_us=0, tag="thr")


def _generate(model: Path, backend: str, iface: str) -> list[str]:
    return [
        *("generate", "--model", str(model), "--prompt", "Hello", "--max-tokens", "6", "--nodes", "2"),
        *("--backend", backend, "--rank-worker", "--iface", iface, "--dtype", "fp32"),
    ]


def _check_ranks(out: str) -> None:
    """Both ranks loaded and report every core of their host, unpinned."""
    for rank in (0, 1):
        m = re.search(
            rf"rank {rank}: loaded [^\n]*; (\d+) threads?(, pinned[^\n(]*)? \((\d+) ranks? on this host\)", out
        )
        assert m, out
        assert (int(m.group(1)), m.group(2), int(m.group(3))) == (CORES, None, 1), m.group(0)


@pytest.mark.multirank
def test_readme_multihost_commands_in_two_namespaces(tiny_dbrx, tmp_path):
    link = _link()  # puts tools/netemu on sys.path
    from netemu import MPI_ENV, TAP, run_job

    from moecluster.distributed.launch_mpi import find_mpiexec

    python = sys.executable
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1", **MPI_ENV}
    with link:
        # README: mpiexec -hosts hostA,hostB -ppn 1 -n 2 -genv MOECLUSTER_PIN 1 python -m moecluster.cli ...
        # (hydra reaches "hostB" through `ip netns exec` instead of ssh: netemu's launcher script)
        script = tmp_path / "netns-launcher.sh"
        mpi = link.mpi_command(["true"], tmp_path)  # writes the launcher script
        assert script.exists() and mpi
        cmd = [
            *("ip", "netns", "exec", link.names[0], find_mpiexec(), "-launcher", "ssh", "-launcher-exec", str(script)),
            *("-hosts", f"{link.addr(0)},{link.addr(1)}", "-localhost", link.addr(0), "-iface", TAP),
            *("-ppn", "1", "-n", "2", "-genv", "MOECLUSTER_PIN", "1"),
            *(python, "-m", "moecluster.cli", *_generate(tiny_dbrx, "mpi", TAP)),
        ]
        res = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stdout + res.stderr
        _check_ranks(res.stderr)
        mpi_text = res.stdout
        # README: torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --master-addr hostA --master-port P ...
        logs = [tmp_path / f"torch{r}.log" for r in range(2)]
        jobs = []
        for r in range(2):
            torchrun = [
                *(str(Path(python).parent / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1"),
                *("--node-rank", str(r), "--master-addr", link.addr(0), "--master-port", "29733"),
                *("-m", "moecluster.cli", *_generate(tiny_dbrx, "torch", TAP)),
            ]
            sh = f"exec {' '.join(torchrun)} > {logs[r]} 2>&1"
            jobs.append((link.netns_cmd(r, ["sh", "-c", sh]), env))
        code = run_job(jobs, timeout_s=300)
        out = "".join(p.read_text() for p in logs)
        assert code == 0, out
        _check_ranks(out)
        assert mpi_text.strip() and mpi_text.strip() in out  # the same greedy text over both backends
