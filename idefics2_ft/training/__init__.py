"""Training: the LightningModule, optimizers and schedules, strategies (DDP, FSDP2, DeepSpeed), and
the Trainer's assembly with its checkpoints, loggers, progress lines and callbacks (divergence
guard, crash rehearsal, SLURM preemption and requeue)."""

from idefics2_ft.training.callbacks import (
    CrashAt,
    Diverged,
    DivergenceGuard,
    OnFirstStep,
    Preempted,
    RehearsedCrash,
    StopOnSignal,
    StopOnSlurmSignal,
    Stopped,
    requeue_slurm_job,
)
from idefics2_ft.training.checkpoints import (
    AtomicCheckpointIO,
    CheckpointCorrupt,
    CheckpointSaveFailed,
    GuardedCheckpoint,
    checkpoint_step,
    remove_stale_temp_files,
)
from idefics2_ft.training.lightning_module import MODEL_INPUTS, Idefics2Module
from idefics2_ft.training.loggers import KeepingCSVLogger, log_adapter_artifact, make_logger, offline_sync_hint
from idefics2_ft.training.optim import make_optimizer_factory, make_schedule, warmup_cosine
from idefics2_ft.training.trainer import describe_run, make_trainer, resolve_precision

__all__ = [
    "MODEL_INPUTS",
    "AtomicCheckpointIO",
    "CheckpointCorrupt",
    "CheckpointSaveFailed",
    "CrashAt",
    "Diverged",
    "DivergenceGuard",
    "GuardedCheckpoint",
    "Idefics2Module",
    "KeepingCSVLogger",
    "OnFirstStep",
    "Preempted",
    "RehearsedCrash",
    "StopOnSignal",
    "StopOnSlurmSignal",
    "Stopped",
    "checkpoint_step",
    "describe_run",
    "log_adapter_artifact",
    "make_logger",
    "make_optimizer_factory",
    "make_schedule",
    "make_trainer",
    "offline_sync_hint",
    "remove_stale_temp_files",
    "requeue_slurm_job",
    "resolve_precision",
    "warmup_cosine",
]
