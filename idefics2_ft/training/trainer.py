"""The Lightning ``Trainer`` as the config asks for it: strategy, precision, loggers, checkpoints, callbacks."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig

from idefics2_ft.config import accumulation
from idefics2_ft.console import on_a_terminal
from idefics2_ft.hardware import peak_tflops
from idefics2_ft.ranks import is_rank_zero
from idefics2_ft.run_folder import LAST_CHECKPOINT, RunFolder
from idefics2_ft.stops import active
from idefics2_ft.training.callbacks import CrashAt, DivergenceGuard, StopOnSignal, StopOnSlurmSignal
from idefics2_ft.training.checkpoints import AtomicCheckpointIO, GuardedCheckpoint, remove_stale_temp_files
from idefics2_ft.training.history import History
from idefics2_ft.training.loggers import TrimReplayedRows, make_logger
from idefics2_ft.training.progress import LineProgress, PerfMetrics, on_cuda
from idefics2_ft.training.strategies import keep_cpu_4bit_layout, make_strategy

log = logging.getLogger(__name__)


def resolve_precision(name: str) -> str:
    """``auto`` is ``bf16-mixed`` on CUDA and ``32-true`` on the CPU."""
    if name != "auto":
        return name
    return "bf16-mixed" if torch.cuda.is_available() else "32-true"


def make_trainer(
    cfg: DictConfig, run_dir: Path, flops_per_token: float | None = None, callbacks: Sequence[Callback] = ()
) -> L.Trainer:
    """A ``Trainer`` writing checkpoints and logs into ``run_dir``, with our callbacks and ``callbacks``
    (the train task adds the trackers' gallery).

    Checkpoints: ``checkpoints/last.ckpt`` every ``trainer.checkpoint_every_n_steps`` and every
    ``trainer.checkpoint_every_n_minutes``, written atomically, at the end,
    and on any exception (nothing lost on a crash, Ctrl-C or preemption), but never with non-finite
    weights: a non-finite loss or gradient norm stops the run at once (``Diverged``). Under SLURM, our
    step-boundary stop (``StopOnSlurmSignal``) replaces Lightning's in-handler checkpoint and requeue.

    Args:
        cfg: the whole config.
        run_dir: the run folder (checkpoints, logs, history).
        flops_per_token: from the plan, to log the model-FLOPs utilisation; None leaves it out.
        callbacks: more callbacks, after ours.

    Returns:
        The ``Trainer``.
    """
    t = cfg.trainer
    accumulate = accumulation(cfg)
    checkpoint_dir = RunFolder(run_dir).checkpoints
    if is_rank_zero():
        remove_stale_temp_files(checkpoint_dir)
    checkpoint = GuardedCheckpoint(
        dirpath=str(checkpoint_dir),
        save_last=True,
        save_top_k=-1 if t.keep_step_checkpoints else 0,
        every_n_train_steps=t.checkpoint_every_n_steps,
        every_n_minutes=t.checkpoint_every_n_minutes,
        save_on_train_epoch_end=True,
        save_on_exception=True,  # nothing lost on a crash or Ctrl-C: resume=true continues from it
        enable_version_counter=False,  # one last.ckpt, never last-v1.ckpt beside an older one
    )
    peak = peak_tflops(torch.cuda.get_device_name(0)) if torch.cuda.is_available() else None
    quiet_warnings_known_false()
    callbacks: list = [
        TrainableFourBitLayout(),
        checkpoint,
        DivergenceGuard(checkpoint_dir / LAST_CHECKPOINT),
        TrimReplayedRows(),
        PerfMetrics(flops_per_token, peak * 1e12 if peak else None),
        History(run_dir),
        *callbacks,
        StopOnSignal(),  # last: a step that stops has been checkpointed and recorded by the ones before
    ]
    if cfg.debug.crash_at_step:
        callbacks.append(CrashAt(cfg.debug.crash_at_step))
    # DeepSpeed writes its checkpoints through its own engine; every other strategy through this
    plugins: list = [] if cfg.strategy.name == "deepspeed" else [AtomicCheckpointIO()]
    # a bar on a terminal; one line every trainer.progress_every_s seconds in a file (SLURM, CI)
    show_bar = t.enable_progress_bar and on_a_terminal()
    if t.enable_progress_bar and not show_bar:
        callbacks.append(LineProgress(t.progress_every_s, cfg.data.batch_size))
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
        callbacks.append(StopOnSlurmSignal())
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=make_strategy(cfg),
        precision=resolve_precision(t.precision),
        max_steps=t.max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.val_check_interval,
        check_val_every_n_epoch=None if t.val_check_interval else 1,
        limit_val_batches=t.limit_val_batches if t.val_check_interval else 0,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        logger=make_logger(cfg, run_dir),
        callbacks=callbacks,
        plugins=plugins,
        enable_progress_bar=show_bar,
        enable_model_summary=False,  # it counts packed 4-bit bytes as parameters: plan.json has ours, by part
        default_root_dir=str(run_dir),
        deterministic=t.deterministic,
        use_distributed_sampler=False,  # the DataModule shards the data itself (resumable)
    )
    follow_stop_policy(trainer)
    log.info(
        "Effective batch: %d per device x %d device(s) x %d node(s) x %d accumulation = %d",
        *(cfg.data.batch_size, trainer.num_devices, trainer.num_nodes, accumulate),
        cfg.data.batch_size * trainer.world_size * accumulate,
    )
    return trainer


def follow_stop_policy(trainer: L.Trainer) -> L.Trainer:
    """Leave SIGTERM and SIGINT to the command's ``StopPolicy`` (``idefics2_ft/stops.py``).

    Lightning installs its own SIGTERM handler for each ``fit`` and ``validate``: it ends a validation
    with ``SIGTERMException``, a ``SystemExit`` with code 0, so a pipeline read a stopped run as a
    success. Switched off here; the policy forwards each signal to the ranks this process launched
    (what Lightning's handler did), and every rank stops as the policy says.
    """
    trainer._signal_connector.register_signal_handlers = lambda: None
    policy = active()
    launcher = trainer.strategy.launcher
    if policy is not None and launcher is not None and hasattr(launcher, "kill"):
        policy.on_signal(launcher.kill)
    return trainer


class TrainableFourBitLayout(Callback):
    """Keep bitsandbytes' 4-bit weights in the layout whose matmul has a backward, for the whole
    life of the Trainer (validations included).

    On a CPU with AVX512-BF16, ``Linear4bit.forward`` in eval mode without gradients (every
    validation) repacks the weight for its CPU inference kernel and flags it; from then on every
    forward, training's too, goes through ``bitsandbytes::gemv_4bit``, which has no backward: torch
    warns that backprop through it "may lead to silently incorrect behavior", and it is incorrect:
    the gradient of the layer's input loses the 4-bit weight's part, so every LoRA layer below
    trains on a wrong gradient (tests/unit/test_4bit_gradients.py). Kept in the trainable layout,
    the path is never taken and the warning cannot come; it is left unfiltered, so that a path
    that brings it back shows. Evaluation and prediction outside training keep the fast kernel.
    """

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        keep_cpu_4bit_layout(pl_module)


def quiet_warnings_known_false() -> None:
    """Filter the warnings a run prints that are false for this project (by message: any other
    warning still shows). Called where the Trainer is made, not at import."""
    # Lightning asks whether the DataLoader object has state_dict(); ours needs none: each
    # train_dataloader() is built after the restore and starts at the restored step
    # (ResumableSampler, GroupedBatchSampler and the streams take start=consumed), and a resumed run
    # ends with the uninterrupted run's adapter (tests/tiers/test_faults.py, tests/runs/test_train.py).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before the epoch ended")
    # Lightning 2.6's own code (lightning/pytorch/utilities/_pytree.py) calls torch's deprecated
    # LeafSpec: nothing a user can change; it works as it is in the torch and Lightning we allow
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def describe_run(cfg: DictConfig, trainer: L.Trainer) -> dict[str, Any]:
    """What a finished fit ran on: steps, world size, the effective batch, the hardware."""
    accumulate = trainer.accumulate_grad_batches  # as make_trainer set it from the config
    on_gpu = on_cuda(trainer)
    return {
        "train/steps": trainer.global_step,
        "train/world_size": trainer.world_size,
        "train/effective_batch": cfg.data.batch_size * trainer.world_size * accumulate,
        "train/accumulate_grad_batches": accumulate,
        "hardware": f"{trainer.world_size} x {torch.cuda.get_device_name(0)}"
        if on_gpu
        else f"CPU, {torch.get_num_threads()} threads",
    }
