"""AdamW's moments shared out over the ranks (ZeRO stage 1): which trained values each rank
owns, how m and v reach their owners at set-up, and how rank 0 writes the whole of them into
a checkpoint.

- Shares (shares_of): the optimiser cuts the trained buffer into fixed chunks (the engine's
  optimizer_chunks: at most 16384 floats, never across a tensor; fixed by the model and the
  adapters alone). Rank r owns the contiguous chunks [first_chunk, end_chunk), whose floats
  are [start, stop): the shares are cut at the chunk boundaries nearest to r x size / K, so
  each is size / K give or take a chunk (a share may be empty when there are fewer chunks
  than ranks). A rank keeps m and v of its share only, and updates the weights of its share
  (distributed.step).
- Set-up (MomentShares.scatter): rank 0 holds the whole of m and v (read from a checkpoint,
  or zeros); it sends each rank its share in segments and keeps a copy of its own; the whole
  buffers are then dropped. A run resumes with any number of ranks: a checkpoint always holds
  the whole moments.
- Checkpoints: rank 0 writes the file, reading m and v through MomentShares.whole(), two
  FlatPieces: for each piece it asks (a broadcast of the piece's range) and the ranks owning
  part of it send that part, so rank 0 holds at most one piece (tensorfile.CHUNK_BYTES) of
  the other ranks' moments at a time; the NaN/Inf check of a tensor is answered the same way
  with counts. The other ranks answer (serve) until rank 0 says the file is done
  (MomentShares.done); every rank saves at the same points of the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from numpy.typing import NDArray

from cllm_cli.distributed.world import SEGMENT_FLOATS, World
from cllm_cli.formats import count_non_finite

SHARE_TAG = 0x5A1       # messages of the moments' scatter and of the checkpoint's pieces


@dataclass(frozen=True)
class Share:
    """A rank's optimiser chunks [first_chunk, end_chunk) and their floats [start, stop)."""
    first_chunk: int
    end_chunk: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def overlap(self, start: int, stop: int) -> tuple[int, int]:
        """[lo, hi) of the values [start, stop) this share holds (lo >= hi: none)."""
        return max(start, self.start), min(stop, self.stop)


def shares_of(chunks: np.ndarray, ranks: int) -> list[Share]:
    """Every rank's share of the trained buffer covered by `chunks` (optimizer_chunks: rows
    offset, size, decay, one after another from 0): contiguous runs of chunks, rank r's
    starting at the chunk boundary nearest to r x size / ranks."""
    offsets = chunks[:, 0]
    size = int(chunks[-1, 0] + chunks[-1, 1])
    if offsets[0] != 0 or (offsets[1:] != offsets[:-1] + chunks[:-1, 1]).any():
        raise ValueError("the optimiser chunks do not cover the buffer in order")
    bounds = np.append(offsets, size)          # chunk k starts at bounds[k]
    cuts = [0]
    for r in range(1, ranks):
        target = r * size / ranks
        k = int(np.searchsorted(bounds, target))
        if k > 0 and target - bounds[k - 1] <= bounds[k] - target:
            k -= 1
        cuts.append(max(k, cuts[-1]))
    cuts.append(len(chunks))
    return [Share(a, b, int(bounds[a]), int(bounds[b])) for a, b in zip(cuts, cuts[1:])]


class MomentShares:
    """This rank's share of AdamW's m and v (m, v: float32 of share.size values each) and the
    reading of the whole of them for rank 0's checkpoints (see the module docstring)."""

    def __init__(self, world: World, shares: Sequence[Share], m: NDArray[np.float32],
                 v: NDArray[np.float32]) -> None:
        self.world, self.shares = world, list(shares)
        self.share = self.shares[world.rank]
        self.m, self.v = m, v

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(start, stop) of every rank's share, in rank order."""
        return [(s.start, s.stop) for s in self.shares]

    @classmethod
    def scatter(cls, world: World, chunks: np.ndarray, m: NDArray[np.float32] | None,
                v: NDArray[np.float32] | None) -> MomentShares:
        """Every rank's share of rank 0's whole m and v (given on rank 0 only)."""
        shares = shares_of(chunks, world.size)
        mine = shares[world.rank]
        parts = []
        for whole in (m, v):
            part = np.empty(mine.size, dtype=np.float32)
            if world.is_root:
                assert whole is not None
                part[...] = whole[mine.start:mine.stop]
                for rank, share in enumerate(shares[1:], 1):
                    for a in range(share.start, share.stop, SEGMENT_FLOATS):
                        world.send(whole[a:min(a + SEGMENT_FLOATS, share.stop)], rank,
                                   SHARE_TAG)
            else:
                for a in range(0, mine.size, SEGMENT_FLOATS):
                    world.recv(part[a:a + SEGMENT_FLOATS], 0, SHARE_TAG)
            parts.append(part)
        return cls(world, shares, parts[0], parts[1])

    # -- rank 0's checkpoint writer reads the whole moments -----------------------------------

    def whole(self) -> tuple[GatheredMoment, GatheredMoment]:
        """m and v as FlatPieces, on rank 0; call done() once the checkpoint is written."""
        return GatheredMoment(self, 0), GatheredMoment(self, 1)

    def done(self) -> None:
        """Rank 0: the checkpoint is written (or failed); the other ranks stop serving."""
        self.world.bcast(None)

    def serve(self) -> None:
        """A rank other than 0, while rank 0 writes a checkpoint: sends the parts of m and v
        rank 0 asks for, until it is done."""
        while True:
            request = self.world.bcast(None)
            if request is None:
                return
            kind, which, start, stop = request
            moment = (self.m, self.v)[which]
            lo, hi = self.share.overlap(start, stop)
            if kind == "read":
                if lo < hi:
                    self.world.send(moment[lo - self.share.start:hi - self.share.start], 0,
                                    SHARE_TAG)
            else:
                self.world.gather(count_non_finite(
                    moment[lo - self.share.start:hi - self.share.start]) if lo < hi else (0, 0))


class GatheredMoment:
    """m (which 0) or v (which 1) of every rank, read by rank 0 in pieces (FlatPieces)."""

    def __init__(self, moments: MomentShares, which: int) -> None:
        self.moments, self.which = moments, which
        self.size = moments.shares[-1].stop
        self.piece = np.empty(0, dtype=np.float32)

    def read(self, start: int, stop: int) -> NDArray[np.float32]:
        moments, world = self.moments, self.moments.world
        world.bcast(("read", self.which, start, stop))
        if self.piece.size < stop - start:
            self.piece = np.empty(stop - start, dtype=np.float32)
        out = self.piece[:stop - start]
        for rank, share in enumerate(moments.shares):
            lo, hi = share.overlap(start, stop)
            if lo >= hi:
                continue
            if rank == 0:
                own = (moments.m, moments.v)[self.which]
                out[lo - start:hi - start] = own[lo - share.start:hi - share.start]
            else:
                world.recv(out[lo - start:hi - start], rank, SHARE_TAG)
        return out

    def count_non_finite(self, start: int, stop: int) -> tuple[int, int]:
        moments, world = self.moments, self.moments.world
        world.bcast(("count", self.which, start, stop))
        share = moments.shares[0]
        lo, hi = share.overlap(start, stop)
        own = (moments.m, moments.v)[self.which]
        counts: list[Any] = world.gather(count_non_finite(own[lo - share.start:hi - share.start])
                                         if lo < hi else (0, 0)) or []
        return sum(n for n, _ in counts), sum(i for _, i in counts)
