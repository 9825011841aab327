"""Comm backends and the local launcher with real processes (tests/comm_worker.py is one rank).

4 ranks on this 2-core machine are slow: the 4-rank jobs only run the quick collectives check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import torch

from moecluster.distributed.comm import SingleComm, init_comm
from moecluster.distributed.launch import launch_local
from moecluster.errors import MoeClusterError

WORKER = str(Path(__file__).with_name("comm_worker.py"))
BACKENDS = ["mpi", "torch"]


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes whose environment carries this test's tag (launcher children and below)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MOECLUSTER_TEST_TAG") == tag and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def assert_nothing_left(tag: str) -> None:
    deadline = time.monotonic() + 3
    while tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = tagged_processes(tag)
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()) for p in left]}"


def run(
    backend: str, world_size: int, scenario: str, *, comm_timeout: float = 30.0, launch_timeout: float = 30.0
) -> tuple[int, float, str]:
    """launch_local the worker; returns (exit code, seconds, tag)."""
    tag = uuid.uuid4().hex
    cmd = [
        sys.executable,
        WORKER,
        "--backend",
        backend,
        "--scenario",
        scenario,
        "--timeout",
        str(comm_timeout),
        "--tag",
        tag,
    ]
    t0 = time.monotonic()
    code = launch_local(cmd, world_size, backend, timeout_s=launch_timeout, env={"MOECLUSTER_TEST_TAG": tag})
    return code, time.monotonic() - t0, tag


@pytest.mark.multirank
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_collectives(backend: str, world_size: int, capfd) -> None:
    code, _, tag = run(backend, world_size, "collectives", comm_timeout=20)
    out, err = capfd.readouterr()
    assert code == 0, err
    for r in range(world_size):
        assert f"rank {r} ok" in out, (out, err)
    assert_nothing_left(tag)


@pytest.mark.multirank
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_dies(backend: str, capfd) -> None:
    code, seconds, tag = run(backend, 2, "die", comm_timeout=5, launch_timeout=5)
    _, err = capfd.readouterr()
    assert code != 0
    assert seconds < 30
    if backend == "mpi":  # the launcher stops the job at once, naming the rank and how it ended
        assert "rank 1 stopped first (exited with code 3)" in err, err
    else:  # gloo reports the closed connection; the heartbeats name the rank
        assert "rank 0: rank 1 did not join all_reduce" in err, err
        assert "moecluster: rank 1 exited with code 3" in err, err
    assert_nothing_left(tag)


@pytest.mark.multirank
def test_rank_dies_under_hydra_where_gforker_is_missing(monkeypatch, capfd) -> None:
    """An MPICH without mpiexec.gforker: the local launch falls back to hydra's mpiexec, as before."""
    from moecluster.distributed import launch_mpi

    monkeypatch.setattr(launch_mpi, "find_gforker", lambda mpiexec: None)
    code, seconds, tag = run("mpi", 2, "die", comm_timeout=5, launch_timeout=5)
    _, err = capfd.readouterr()
    assert code != 0 and seconds < 30
    assert "rank 1 stopped first" in err, err
    assert_nothing_left(tag)


@pytest.mark.multirank
def test_mpi_ranks_get_a_large_environment() -> None:
    """gforker refuses more than ~190 environment variables: the ranks' environment travels in a private
    file, restored by each rank's wrapper (PMI_* from gforker added), which is not left in the ranks' view."""
    tag = uuid.uuid4().hex
    env = {f"MOECLUSTER_TEST_VAR_{i}": str(i) for i in range(400)}
    body = (
        "import os, sys\n"
        "assert os.environ['MOECLUSTER_TEST_VAR_399'] == '399' and 'MOECLUSTER_ENV_FILE' not in os.environ\n"
        "from moecluster.distributed.comm import init_comm\n"
        "with init_comm('mpi', timeout_s=20) as comm:\n"
        "    print(f'rank {comm.rank} of {comm.world_size} env ok', flush=True)\n"
    )
    script = (
        "import sys; from moecluster.distributed.launch import launch_local; "
        f"sys.exit(launch_local([sys.executable, '-c', {body!r}], 2, 'mpi', timeout_s=30, "
        f"env={{**{env!r}, 'MOECLUSTER_TEST_TAG': {tag!r}}}))"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "rank 0 of 2 env ok" in res.stdout and "rank 1 of 2 env ok" in res.stdout, res.stdout
    assert_nothing_left(tag)


@pytest.mark.multirank
@pytest.mark.parametrize("backend", BACKENDS)
def test_ranks_output_reaches_the_launchers_stdout_whole(backend: str) -> None:
    """Non-ASCII text from every rank arrives unchanged (gforker's relay cut a rank's output at its first
    non-ASCII byte and the rank died of a broken pipe: the ranks write to the launcher's own stdout)."""
    text = "h\u00e9llo \u2014 \u4e16\u754c"
    rank = 'os.environ.get("PMI_RANK", os.environ.get("RANK"))'
    body = f"import os\nprint(f'r{{{rank}}} {text}' * 50, flush=True)\n"
    script = (
        "import sys; from moecluster.distributed.launch import launch_local; "
        f"sys.exit(launch_local([sys.executable, '-c', {body!r}], 2, {backend!r}, timeout_s=30))"
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    out = res.stdout.decode()  # raises on a cut character
    for rank in (0, 1):
        assert f"r{rank} {text}" * 50 in out, out[-300:]


@pytest.mark.multirank
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_stalls(backend: str, capfd) -> None:
    code, seconds, tag = run(backend, 2, "stall", comm_timeout=3, launch_timeout=3)
    _, err = capfd.readouterr()
    assert code != 0
    assert seconds < 25
    assert "rank 0: rank 1 did not join all_reduce (collective #3) within 3.0 s" in err, err
    assert_nothing_left(tag)


@pytest.mark.multirank
def test_launcher_kills_stragglers(capfd) -> None:
    code, seconds, tag = run("torch", 2, "straggle", launch_timeout=2)
    _, err = capfd.readouterr()
    assert code != 0
    assert seconds < 15
    assert "rank 1 exited with code 5; rank 0 was still running 2.0 s later and was killed" in err, err
    assert_nothing_left(tag)  # rank 0 and its grandchild (same process group)


@pytest.mark.multirank
@pytest.mark.parametrize("backend", BACKENDS)
def test_launcher_sigterm_leaves_nothing(backend: str) -> None:
    tag = uuid.uuid4().hex
    script = (
        "import sys; from moecluster.distributed.launch import launch_local; "
        f"sys.exit(launch_local([sys.executable, {WORKER!r}, '--scenario', 'straggle', "
        f"'--tag', {tag!r}], 2, {backend!r}, timeout_s=60, "
        f"env={{'MOECLUSTER_TEST_TAG': {tag!r}}}))"
    )
    launcher = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:  # wait until the ranks (and the grandchild) run
        if sum("comm_worker.py" in " ".join(p.cmdline()) for p in tagged_processes(tag)) >= 2:
            break
        time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=15)
    assert launcher.returncode == 128 + signal.SIGTERM, err
    assert "launcher received SIGTERM" in err
    assert_nothing_left(tag)


def test_single_comm_is_identity() -> None:
    comm = init_comm("single")
    assert isinstance(comm, SingleComm) and comm.world_size == 1 and comm.rank == 0
    x_TD = torch.randn(2, 8)
    assert comm.all_reduce_sum(x_TD) is x_TD
    assert comm.broadcast_bytes(b"abc") == b"abc"
    assert comm.gather_floats([1.0, 2.0]) == [[1.0, 2.0]]
    comm.barrier()
    comm.close()


def test_unknown_backend_says_what_to_use() -> None:
    with pytest.raises(MoeClusterError, match="use 'mpi', 'torch' or 'single'"):
        init_comm("nccl2")
    with pytest.raises(MoeClusterError, match="'single' runs one rank"):
        launch_local(["true"], 2, "single")


def test_torch_without_world_size_is_single(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(init_comm("torch"), SingleComm)
    assert os.environ.get("MOECLUSTER_PIN") is None


@pytest.mark.multirank
@pytest.mark.parametrize("launcher", ["gforker", "hydra"])
def test_rank_dead_before_mpi_init_ends_a_kept_job(launcher: str) -> None:
    """serve's MPI job keeps survivors (each rank's wrapper ends normally for the process manager): a
    rank that dies before MPI_Init never links itself, and rank 0 would wait in MPI_Init forever. Its
    wrapper reports it, so the launcher names it and stops the job timeout_s later."""
    tag = uuid.uuid4().hex
    body = (
        "import os, sys, time\n"
        "if os.environ['PMI_RANK'] == '1':\n    sys.exit(3)\n"
        "from moecluster.distributed.comm import init_comm\n"
        "init_comm('mpi', timeout_s=5)\n"
    )
    no_gforker = "from moecluster.distributed import launch_mpi; launch_mpi.find_gforker = lambda m: None; "
    script = (
        "import sys; from moecluster.distributed.launch import launch_local; "
        + (no_gforker if launcher == "hydra" else "")
        + f"sys.exit(launch_local([sys.executable, '-c', {body!r}], 2, 'mpi', timeout_s=3, "
        f"keep_survivors=True, env={{'MOECLUSTER_TEST_TAG': {tag!r}}}))"
    )
    t0 = time.monotonic()
    launcher = subprocess.run([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True, timeout=60)
    assert launcher.returncode != 0
    assert time.monotonic() - t0 < 30
    assert "rank 1 stopped first" in launcher.stderr, launcher.stderr
    assert_nothing_left(tag)
