"""The Lightning ``Trainer`` as the config asks for it: strategy, precision, loggers, checkpoints, callbacks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig

from idefics2_ft.config import accumulation
from idefics2_ft.distributed import make_strategy
from idefics2_ft.runs import CHECKPOINT_DIR, LAST_CHECKPOINT, LOG_DIR
from idefics2_ft.trainer.callbacks import CrashAt, DivergenceGuard, GuardedCheckpoint, StopOnSlurmSignal


def make_logger(cfg: DictConfig, run_dir: Path):
    """The logger ``logger.type`` names (CSV / TensorBoard under ``run_dir/logs``, W&B), or False."""
    kind = cfg.logger.type
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=str(run_dir), name=LOG_DIR, version="")
    if kind == "tensorboard":
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(run_dir), name=LOG_DIR, version="")
    from lightning.pytorch.loggers import WandbLogger

    return WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity, name=cfg.name, save_dir=str(run_dir))


def resolve_precision(name: str) -> str:
    """``auto`` is ``bf16-mixed`` on CUDA and ``32-true`` on the CPU."""
    if name != "auto":
        return name
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def make_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """A ``Trainer`` writing checkpoints and logs into ``run_dir``.

    Checkpoints: ``checkpoints/last.ckpt`` every ``trainer.checkpoint_every_n_steps``, at the end,
    and on any exception (nothing lost on a crash, Ctrl-C or preemption), but never with non-finite
    weights: a non-finite loss or gradient norm stops the run at once (``Diverged``). Under SLURM, our
    step-boundary stop (``StopOnSlurmSignal``) replaces Lightning's in-handler checkpoint and requeue.
    """
    t = cfg.trainer
    checkpoint = GuardedCheckpoint(
        dirpath=str(Path(run_dir) / CHECKPOINT_DIR),
        save_last=True,
        save_top_k=0,
        every_n_train_steps=t.checkpoint_every_n_steps,
        save_on_train_epoch_end=True,
        save_on_exception=True,  # nothing lost on a crash or Ctrl-C: resume=true continues from it
        enable_version_counter=False,  # one last.ckpt, never last-v1.ckpt beside an older one
    )
    callbacks: list = [checkpoint, DivergenceGuard(Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT)]
    if cfg.debug.crash_at_step:
        callbacks.append(CrashAt(cfg.debug.crash_at_step))
    plugins = []
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(StopOnSlurmSignal())
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg),
        precision=resolve_precision(t.precision),
        max_steps=t.max_steps,
        accumulate_grad_batches=accumulation(cfg),
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=make_logger(cfg, run_dir),
        callbacks=callbacks,
        plugins=plugins,
        enable_progress_bar=t.enable_progress_bar,
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # the DataModule shards the data itself (resumable)
    )
