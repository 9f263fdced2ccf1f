"""The Lightning Trainer's assembly: loggers, checkpointing, and our callbacks (divergence guard, crash
rehearsal, SLURM preemption and requeue)."""

from idefics2_ft.trainer.assemble import describe_run, make_trainer, resolve_precision
from idefics2_ft.trainer.callbacks import (
    CrashAt,
    Diverged,
    DivergenceGuard,
    Preempted,
    RehearsedCrash,
    StopOnSlurmSignal,
    requeue_slurm_job,
)
from idefics2_ft.trainer.checkpoints import AtomicCheckpointIO, GuardedCheckpoint, remove_stale_temp_files
from idefics2_ft.trainer.loggers import KeepingCSVLogger, make_logger

__all__ = [
    "AtomicCheckpointIO",
    "CrashAt",
    "Diverged",
    "DivergenceGuard",
    "GuardedCheckpoint",
    "KeepingCSVLogger",
    "Preempted",
    "RehearsedCrash",
    "StopOnSlurmSignal",
    "describe_run",
    "make_logger",
    "make_trainer",
    "remove_stale_temp_files",
    "requeue_slurm_job",
    "resolve_precision",
]
