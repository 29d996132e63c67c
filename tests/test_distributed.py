"""The MPI layer: blocks of micro-batches per rank and the ordered fold across
ranks, run under a real mpiexec (the mpich wheel's)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT

from cllm_cli import _engine
from cllm_cli.distributed.shares import shares_of
from cllm_cli.distributed.world import Solo, block_of, world
from cllm_cli.model import CLLMConfig
from cllm_cli.training.ranks import describe_layout

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



@pytest.mark.parametrize("threads, spheres", [(1, "1 sphere"), (2, "2 spheres")])
def test_the_layout_names_the_spheres_of_a_rank_in_the_singular_or_plural(threads, spheres):
    class TwoRanks(Solo):
        size = 2

        def allgather(self, obj):
            return [obj, (obj[0], obj[1].replace("rank 0", "rank 1"))]

    layout = describe_layout(TwoRanks(), threads)
    assert layout.startswith(f"2 ranks x {spheres} (rank 0 pid "), layout


@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 7])
def test_shares_are_runs_of_chunks_covering_the_buffer_about_evenly(ranks):
    """GPT-2 small's chunks: each rank's share is a run of whole chunks, the shares follow one
    another from 0 to the end, and each is within a chunk of size / ranks."""
    cfg = CLLMConfig(vocab_size=50257, embed_dim=768, num_layers=12, num_heads=12,
                     ff_dim=3072, seq_len=1024)
    chunks = _engine.optimizer_chunks(cfg)
    size = _engine.num_parameters(cfg)
    shares = shares_of(chunks, ranks)
    assert len(shares) == ranks
    assert shares[0].first_chunk == 0 and shares[-1].end_chunk == len(chunks)
    assert shares[0].start == 0 and shares[-1].stop == size
    for a, b in zip(shares, shares[1:]):
        assert a.end_chunk == b.first_chunk and a.stop == b.start
    for s in shares:
        assert s.start == chunks[s.first_chunk, 0]
        assert s.stop == chunks[s.end_chunk - 1, 0] + chunks[s.end_chunk - 1, 1]
        assert abs(s.size - size / ranks) < chunks[:, 1].max()


def test_more_ranks_than_chunks_leave_shares_empty():
    chunks = np.array([[0, 10, 1], [10, 30, 0], [40, 5, 1]], dtype=np.int64)
    shares = shares_of(chunks, 5)
    # cut at the boundaries nearest to 9, 18, 27 and 36: 10, 10, 40, 40
    assert [(s.start, s.stop) for s in shares] == [(0, 10), (10, 10), (10, 40), (40, 40),
                                                   (40, 45)]
    assert sum(s.end_chunk - s.first_chunk for s in shares) == 3
    with pytest.raises(ValueError, match="do not cover"):
        shares_of(np.array([[0, 10, 1], [12, 5, 1]], dtype=np.int64), 2)


def test_without_a_launcher_the_world_is_one_process(monkeypatch):
    for var in ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS",
                "SLURM_STEP_NUM_TASKS"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(world(), Solo)


@pytest.mark.parametrize("ranks, n_micro, invalid", [
    (2, 8, "-"), (3, 8, "-"), (4, 8, "-"), (3, 8, "0,1,2"), (2, 8, "5"), (4, 3, "-"),
    (3, 8, "0,1,2,3,4,5,6,7"), (2, 1, "0"), (3, 2, "1"),
])
def test_ordered_fold_in_shares_is_the_one_process_sum(ranks, n_micro, invalid):
    p = mpiexec(ranks, "tests/mpi/fold_check.py", n_micro, 5003, invalid, 7)
    assert p.returncode == 0, p.stderr
    assert f"FOLD {ranks} OK" in p.stdout, p.stdout + p.stderr
