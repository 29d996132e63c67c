"""Many processes over MPI: the world of ranks (world.py), each rank's share of AdamW's state
(shares.py), and one rank's share of a training step and of an evaluation (step.py)."""
from cllm_cli.distributed.shares import MomentShares
from cllm_cli.distributed.step import AgreedStop, DataParallelEngine
from cllm_cli.distributed.world import Solo, World, block_of, on_all_ranks, run_rank

# world.world(), the world this process belongs to, is taken from the module: a name `world`
# here would hide the module itself
__all__ = ["AgreedStop", "DataParallelEngine", "MomentShares", "Solo", "World", "block_of", "on_all_ranks",
           "run_rank"]
