"""Where metrics go: CSV (kept across resumes), TensorBoard, W&B, or nowhere; the adapter as a W&B artifact."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from omegaconf import DictConfig

from idefics2_ft.run_folder import LOG_DIR


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes ``metrics.csv`` when it starts; this one keeps the rows and
    the header, and the next rows are appended to them."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])

    def drop_training_rows_from(self, step: int) -> int:
        """Remove training rows at ``step`` or later (a resumed run logs them again); returns how many."""
        if not os.path.isfile(self.metrics_file_path):
            return 0
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if not (r.get("train/loss") and int(r.get("step") or 0) >= step)]
        # the run's own logs/metrics.csv, rewritten by the process that owns the folder (FolderLock)
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(kept)
        return len(rows) - len(kept)


class KeepingCSVLogger(CSVLogger):
    """``CSVLogger`` whose ``metrics.csv`` survives a resume: the earlier steps' rows stay."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(log_dir=self.log_dir)
        return self._experiment


class TrimReplayedRows(Callback):
    """On a resume, drop the CSV rows of the steps that will run again (after the checkpoint's step),
    and log the resumed steps under their own step number."""

    def __init__(self) -> None:
        self._align_log_step = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Lightning logs under the epoch loop's count of optimizer steps. Restarting, it adds one to
        # the checkpoint's count (right for a checkpoint written at a batch's end), which puts it one
        # ahead for a checkpoint written on an exception at a batch's start (step 3 was logged as 4).
        # With automatic optimization the count equals global_step; set after the loop's reset.
        if self._align_log_step:
            self._align_log_step = False
            loop = trainer.fit_loop.epoch_loop
            if pl_module.automatic_optimization:
                loop._batches_that_stepped = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        if not trainer.ckpt_path:
            return
        self._align_log_step = True
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, KeepingCSVLogger):
                    logger.experiment.drop_training_rows_from(trainer.global_step)


def make_logger(cfg: DictConfig, run_dir: Path):
    """The logger ``logger.type`` names (CSV / TensorBoard under ``run_dir/logs``, W&B), or False."""
    kind = cfg.logger.type
    if kind == "none":
        return False
    if kind == "csv":
        return KeepingCSVLogger(save_dir=str(run_dir), name=LOG_DIR, version="")
    if kind == "tensorboard":
        return TensorBoardLogger(save_dir=str(run_dir), name=LOG_DIR, version="")
    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name, save_dir=str(run_dir))


def log_adapter_artifact(trainer, folder: Path, name: str) -> str | None:
    """Upload (or, offline, stage for ``wandb sync``) the adapter folder as a W&B model artifact."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            import wandb

            artifact = wandb.Artifact(name=f"{name}-adapter", type="model", metadata={"folder": str(folder)})
            artifact.add_dir(str(folder))
            logger.experiment.log_artifact(artifact)
            return artifact.name
    return None


def offline_sync_hint(trainer) -> str | None:
    """For an offline W&B run: the ``wandb sync`` command that uploads it later."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero:
            run = logger.experiment
            if getattr(run.settings, "mode", None) == "offline" or os.environ.get("WANDB_MODE") == "offline":
                return f"W&B ran offline; to upload it later: wandb sync {Path(run.dir).parent}"
    return None
