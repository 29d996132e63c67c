"""Run under mpiexec by tests/test_distributed.py: the ordered fold across ranks equals one
process's float32 fold (((g0 + g1) + g2) + ...) bit for bit, with invalid micro-batches left
out. argv: n_micro size invalid-indices(comma list or -) seed."""
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

first, end = distributed.block_of(world.rank, world.size, n_micro)
out = np.full(size, np.nan, np.float32)
world.ordered_fold(grads[first:end], valid[first:end], any(valid[:first]), out)

expected = None
for g, ok in zip(grads, valid):
    if ok:
        expected = g.copy() if expected is None else expected + g
if expected is None:
    ok = bool(np.all(out == 0))
else:
    ok = out.tobytes() == expected.tobytes()
results = world.allgather(ok)
if world.rank == 0:
    print("FOLD", world.size if world.size > 1 else 1, "OK" if all(results) else f"DIFFERS on ranks {results}")
