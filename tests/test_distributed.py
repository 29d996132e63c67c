"""The MPI layer: blocks of micro-batches per rank and the ordered fold across
ranks, run under a real mpiexec (the mpich wheel's)."""
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from cllm_cli.distributed.world import Solo, block_of, world

MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")


def mpiexec(n, *argv):
    assert os.path.exists(MPIEXEC), "mpiexec missing: make installs the mpich wheel"
    return subprocess.run([MPIEXEC, "-n", str(n), sys.executable, *map(str, argv)], cwd=ROOT,
                          capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.mark.parametrize("size, n_micro", [(1, 8), (2, 8), (3, 8), (4, 8), (3, 2), (4, 1)])
def test_blocks_are_contiguous_and_cover_every_micro_batch(size, n_micro):
    blocks = [block_of(r, size, n_micro) for r in range(size)]
    assert blocks[0][0] == 0 and blocks[-1][1] == n_micro
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))
    lengths = [e - f for f, e in blocks]
    assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)


def test_without_a_launcher_the_world_is_one_process(monkeypatch):
    for var in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(world(), Solo)


@pytest.mark.parametrize("ranks, n_micro, invalid", [
    (2, 8, "-"), (3, 8, "-"), (4, 8, "-"), (3, 8, "0,1,2"), (2, 8, "5"), (4, 3, "-"),
    (3, 8, "0,1,2,3,4,5,6,7"), (1, 8, "3"),
])
def test_ordered_fold_across_ranks_is_the_one_process_sum(ranks, n_micro, invalid):
    p = mpiexec(ranks, "tests/mpi/fold_check.py", n_micro, 5003, invalid, 7)
    assert p.returncode == 0, p.stderr
    assert f"FOLD {ranks} OK" in p.stdout, p.stdout + p.stderr
