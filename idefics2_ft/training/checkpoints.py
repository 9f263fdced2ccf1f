"""How checkpoints are written: never with non-finite weights, atomically wherever ``$TMPDIR`` is,
every N steps and every M minutes, always as ``last.ckpt`` (never ``last-v1.ckpt``)."""

from __future__ import annotations

import logging
import os
import shlex
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from idefics2_ft.models import non_finite_parameters
from idefics2_ft.stops import Interrupted, active
from idefics2_ft.training.callbacks import Diverged, Stopped

log = logging.getLogger(__name__)

LAST = "last.ckpt"
TEMP_MARK = ".tmp-"  # checkpoints/.last.ckpt.tmp-<pid>: a save in progress, or one a kill cut short


class CheckpointSaveFailed(RuntimeError):
    """A checkpoint could not be written; the message says whether the previous one is intact."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint to a temporary file *in its own folder*, fsync it, then rename it over
    the old one, so a kill at any moment leaves the previous checkpoint or the new one, whole.

    Lightning's own save stages the file through fsspec's transaction, which is atomic only when
    ``$TMPDIR`` is on the run folder's filesystem (not so for a local /tmp and an NFS or Lustre run
    folder: a ``kill -9`` mid-save was seen to leave a corrupt ``last.ckpt`` and no older one).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO.save_checkpoint takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic on POSIX within one filesystem
        except OSError as err:  # a full disk, a quota, a vanished mount: one line, the old checkpoint intact
            tmp.unlink(missing_ok=True)
            last = path.parent / "last.ckpt"
            kept = (
                "the previous checkpoint, last.ckpt, is intact"
                if last.is_file()
                else "no checkpoint was written before"
            )
            raise CheckpointSaveFailed(
                f"Saving {path} failed ({err.strerror or type(err).__name__}); {kept}. Free the space (or fix the "
                "folder), then continue with resume=true."
            ) from err
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        folder = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def remove_stale_temp_files(checkpoint_dir: Path) -> list[Path]:
    """Delete the partial temporary files that killed saves left behind; returns them."""
    stale = sorted(Path(checkpoint_dir).glob(f".*{TEMP_MARK}*")) if Path(checkpoint_dir).is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)  # .NAME.tmp-PID: the names AtomicCheckpointIO gives its own partial files
    if stale:
        log.warning("Removed %d partial checkpoint file(s) a killed save left behind: %s", len(stale), stale)
    return stale


class GuardedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that never writes non-finite trainable weights, writes nothing when the
    run stops for divergence, saves only at optimizer-step boundaries, and also saves every
    ``every_n_minutes`` (the ranks agree on the time through rank 0)."""

    def __init__(self, *args: Any, every_n_minutes: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Lightning accepts a step interval or a time interval, not both; its batch-end logic
        # handles both at once, so the time interval is set after the constructor's check.
        if every_n_minutes:
            self._train_time_interval = timedelta(minutes=every_n_minutes)  # counted from on_train_start
        self._step_at_batch_start = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_batch_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step_at_batch_start:
            return  # mid-accumulation: a checkpoint here would lose the gradients accumulated so far
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, Diverged):
            return
        if isinstance(exception, Interrupted) and not isinstance(exception, Stopped):
            return  # a stop in the middle of a step: the weights may be half-updated; the last save stands
        if isinstance(exception, Stopped):  # saved without Lightning's line: the stop's own line says where
            if self._should_save_on_exception(trainer):
                candidates = self._monitor_candidates(trainer)
                self._save_checkpoint(trainer, self.format_checkpoint_name(metrics=candidates))
                self._save_last_checkpoint(trainer, candidates)
            return
        super().on_exception(trainer, pl_module, exception)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        bad = non_finite_parameters(trainer.lightning_module)
        if trainer.strategy.reduce_boolean_decision(bool(bad), all=False):
            log.error(
                "Not writing %s: trainable weights are not finite (%s). The previous checkpoint is kept.",
                filepath,
                ", ".join(bad[:3]) or "on another rank",
            )
            return
        policy = active()
        with policy.phase_of("a checkpoint save", "checkpoint") if policy is not None else nullcontext():
            super()._save_checkpoint(trainer, filepath)
        if policy is not None and Path(filepath).name == LAST:  # from now on a resume continues the run
            command = policy.command
            if command and not command.endswith("resume=true"):
                command += " resume=true"
            policy.completed(f"{filepath} holds step {trainer.global_step}", command)


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that does not read back whole: the message names it, and an intact older one if any."""


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint holds, after checking that every member of its zip reads back
    with the right CRC (a truncated or damaged file fails here, before any model loads).

    Raises:
        CheckpointCorrupt: naming the file, what is wrong, and an intact older checkpoint beside it.
    """
    import zipfile

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
        if damaged is not None:
            raise zipfile.BadZipFile(f"member {damaged} fails its CRC check")
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return int(state["global_step"])
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError, KeyError, ValueError) as err:
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        others = [p for p in intact_checkpoints(path.parent) if p != path]
        offer = (
            f"{others[0]} (step {checkpoint_step(others[0])}) is intact: copy it over {path.name} "
            f"({shlex.join(['cp', str(others[0]), str(path)])}) and resume again"
            if others
            else "no intact checkpoint lies beside it: start a new run_dir (or overwrite=true)"
        )
        raise CheckpointCorrupt(f"{path} is corrupt ({why}): nothing was loaded. {offer}.") from None


def intact_checkpoints(folder: Path) -> list[Path]:
    """The checkpoints in ``folder`` whose zip reads back whole, the newest step first."""
    import zipfile

    found = []
    for path in Path(folder).glob("*.ckpt"):
        try:
            with zipfile.ZipFile(path) as archive:
                if archive.testzip() is None:
                    found.append(path)
        except (zipfile.BadZipFile, OSError):
            continue
    return sorted(found, key=lambda p: (p.name != LAST, -p.stat().st_mtime))
