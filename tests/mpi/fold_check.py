"""Run under mpiexec by tests/test_distributed.py: the ordered fold across ranks, scattered in
shares, equals one process's float32 fold (((g0 + g1) + g2) + ...) bit for bit, with invalid
micro-batches left out: each rank's share of it, and with allgather_shares the whole on every
rank. argv: n_micro size invalid-indices(comma list or -) seed."""
import sys

import numpy as np

from cllm_cli.distributed import world as distributed

n_micro, size, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[4])
invalid = set() if sys.argv[3] == "-" else {int(i) for i in sys.argv[3].split(",")}
distributed.SEGMENT_FLOATS = 1000          # several segments down the chain
world = distributed.world()
rng = np.random.default_rng(seed)
grads = [(rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4, size)).astype(np.float32)
         for _ in range(n_micro)]
valid = [i not in invalid for i in range(n_micro)]
# uneven shares, one of them empty on 4 ranks, cut inside segments
cuts = {1: [0, size], 2: [0, 1500, size], 3: [0, 10, 2600, size],
        4: [0, 1234, 1234, 4000, size]}[world.size]
shares = list(zip(cuts, cuts[1:]))

first, end = distributed.block_of(world.rank, world.size, n_micro)
rows = np.full((max(1, end - first), size), np.nan, np.float32)
for i in range(first, end):
    rows[i - first] = grads[i]
share = world.fold_and_scatter(rows, valid[first:end], any(valid[:first]), shares)

expected = None
for g, ok in zip(grads, valid):
    if ok:
        expected = g.copy() if expected is None else expected + g
if expected is None:
    expected = np.zeros(size, np.float32)
a, b = shares[world.rank]
ok = share.tobytes() == expected[a:b].tobytes()
whole = np.full(size, np.nan, np.float32)
whole[a:b] = share
world.allgather_shares(whole, shares)
ok = ok and whole.tobytes() == expected.tobytes()
results = world.allgather(ok)
if world.rank == 0:
    print("FOLD", world.size, "OK" if all(results) else f"DIFFERS on ranks {results}")
