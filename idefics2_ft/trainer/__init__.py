"""The Lightning Trainer's assembly and our callbacks (crash rehearsal, SLURM preemption and requeue)."""

from idefics2_ft.trainer.assemble import make_logger, make_trainer, resolve_precision
from idefics2_ft.trainer.callbacks import (
    CrashAt,
    Diverged,
    DivergenceGuard,
    GuardedCheckpoint,
    Preempted,
    RehearsedCrash,
    StopOnSlurmSignal,
    requeue_slurm_job,
)

__all__ = [
    "CrashAt",
    "Diverged",
    "DivergenceGuard",
    "GuardedCheckpoint",
    "Preempted",
    "RehearsedCrash",
    "StopOnSlurmSignal",
    "make_logger",
    "make_trainer",
    "requeue_slurm_job",
    "resolve_precision",
]
