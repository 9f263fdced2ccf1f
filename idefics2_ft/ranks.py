"""Which process is rank 0: the one that writes the run folder, logs and builds the demo's base."""

from __future__ import annotations


def is_rank_zero() -> bool:
    """True on the global rank 0. Lightning's own rank: read from the launcher's environment (RANK,
    LOCAL_RANK, SLURM_PROCID) before any Trainer exists, then set by the strategy."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0
