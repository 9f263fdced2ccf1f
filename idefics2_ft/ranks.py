"""Which process is rank 0 (the one that writes the run folder, logs and builds the demo's base), and
how many processes the run has."""

from __future__ import annotations


def is_rank_zero() -> bool:
    """True on the global rank 0. Lightning's own rank: read from the launcher's environment (RANK,
    LOCAL_RANK, SLURM_PROCID) before any Trainer exists, then set by the strategy."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank == 0


def distributed() -> bool:
    """True in a process group: ``torch.distributed`` is available and initialised (by the strategy)."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """The number of processes in this run's process group; 1 without one."""
    import torch.distributed as dist

    return dist.get_world_size() if distributed() else 1
