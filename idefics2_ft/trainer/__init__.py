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
from idefics2_ft.trainer.loggers import KeepingCSVLogger, log_adapter_artifact, make_logger, offline_sync_hint

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
    "log_adapter_artifact",
    "make_logger",
    "make_trainer",
    "offline_sync_hint",
    "remove_stale_temp_files",
    "requeue_slurm_job",
    "resolve_precision",
]
