"""Our Lightning callbacks: the divergence guard, a rehearsed crash, a clean stop when SLURM signals
the job, and an honest stop on SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from idefics2_ft.ranks import is_rank_zero
from idefics2_ft.stops import Interrupted, active

log = logging.getLogger(__name__)


class RehearsedCrash(RuntimeError):
    """Raised by ``debug.crash_at_step``."""


class CrashAt(Callback):
    """Raise ``RehearsedCrash`` when the loop reaches optimizer step ``step`` (``debug.crash_at_step``)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.resumed_at: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.resumed_at = trainer.global_step if trainer.ckpt_path else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step != self.step:
            return
        if self.resumed_at == self.step:
            raise RehearsedCrash(
                f"debug.crash_at_step={self.step} is still set, and the run resumed at that very step: it would "
                "crash here on every resume. Drop debug.crash_at_step (or set debug.crash_at_step=null) to continue."
            )
        raise RehearsedCrash(f"debug.crash_at_step={self.step}: stopping on purpose (resume with resume=true).")


class Diverged(RuntimeError):
    """The loss or the gradient norm became NaN or infinite: the run stopped, nothing was saved after it."""


class DivergenceGuard(Callback):
    """Stop the run at the first non-finite loss or gradient norm, before the optimizer step applies it.

    The message names the step, the lr and the last good checkpoint. ``GuardedCheckpoint``
    (``trainer/checkpoints.py``) saves nothing on the way out, so the last good checkpoint stays the last one.
    """

    def __init__(self, last_checkpoint: Path) -> None:
        self.last_checkpoint = Path(last_checkpoint)
        self._trainable: list[torch.nn.Parameter] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._trainable = [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if str(trainer.precision) == "16-mixed":
            return  # fp16's grad scaler skips steps with infinite gradients by design
        grads = [p.grad for p in self._trainable if p.grad is not None]
        # one fused norm (foreach kernels) over the trainable weights only; on FSDP: this rank's shards
        total = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if trainer.strategy.reduce_boolean_decision(not math.isfinite(total), all=False):
            self._stop(trainer, optimizer, f"gradient norm ({total})")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        bad = loss is not None and not bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(bad, all=False):
            self._stop(trainer, trainer.optimizers[0], f"loss ({float(loss.detach())})")

    def _stop(self, trainer, optimizer, what: str) -> None:
        lr = optimizer.param_groups[0]["lr"]
        last = (
            f"the last good checkpoint is {self.last_checkpoint}, kept as it was"
            if self.last_checkpoint.is_file()
            else "no checkpoint was written before it"
        )
        raise Diverged(
            f"Training diverged: non-finite {what} at step {trainer.global_step} (lr {lr:.3g}). Stopped at once; "
            f"{last}, and no adapter was saved. Lower optim.lr, raise optim.warmup_steps or set "
            "trainer.gradient_clip_val, then start again (or resume=true from the last good checkpoint)."
        )


class Preempted(RuntimeError):
    """SLURM signalled the job before a preemption or its time limit; the run stopped at a step
    boundary with ``checkpoints/last.ckpt`` written, and the job is requeued."""


class StopOnSlurmSignal(Callback):
    """Stop every rank at the same optimizer-step boundary when SLURM signals (SIGUSR1 from
    ``#SBATCH --signal``, SIGUSR2 from submitit).

    Lightning's own handler saves a checkpoint inside the signal handler, wherever each rank
    happens to be: a rank inside an all-reduce meets the other's barrier and the job hangs (seen
    on the test cluster). Here the handler only raises a flag; the ranks agree on it at the next
    step boundary, and stop together (``save_on_exception`` writes last.ckpt on the way out).
    """

    def __init__(self) -> None:
        self.signalled = False
        self._step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit":
            for signum in (signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(signum, self._flag)

    def _flag(self, signum, frame) -> None:
        self.signalled = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # mid-accumulation: not a step boundary
        if trainer.strategy.reduce_boolean_decision(self.signalled, all=False):
            raise Preempted(f"SLURM signalled the job: stopped after step {trainer.global_step}.")


class Stopped(Interrupted):
    """SIGTERM or SIGINT stopped the fit at an optimizer-step boundary, with ``last.ckpt`` written
    (``GuardedCheckpoint`` saves on the way out for this one, never for an ``Interrupted`` mid-step).

    ``exit_code`` is what a shell reports for the signal: 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path, command: str = "") -> None:
        self.step = step
        super().__init__(signum, f"fit, at step {step}", f"{checkpoint} holds step {step}", command)


class StopOnSignal(Callback):
    """Stop every rank at the same optimizer-step boundary on SIGTERM (``docker stop``, Kubernetes,
    a scheduler's cancel) or SIGINT (Ctrl-C), save ``last.ckpt`` and raise ``Stopped``.

    The command's ``StopPolicy`` (``idefics2_ft/stops.py``) owns the handlers for its whole life; during
    the fit it defers, so a signal only raises its flag, read here at each step boundary (the ranks
    agree on it). A second signal stops at once, without a save. Without a policy (``train()`` called
    in a thread), the fit is not stoppable by signal.
    """

    def __init__(self) -> None:
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step:
            return  # mid-accumulation: not a step boundary
        policy = active()
        signum = (policy.signum if policy is not None else None) or 0
        if trainer.world_size > 1:  # every rank stops at the same step, whichever was signalled
            signum = int(trainer.strategy.reduce(torch.tensor(float(signum), device=pl_module.device), reduce_op="max"))
        if signum:
            checkpoint = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            if policy is not None:
                policy.stopping = True  # a second Ctrl-C now would cut the stop's own checkpoint save short
            command = policy.command if policy is not None else ""
            if command and not command.endswith("resume=true"):  # last.ckpt is written on the way out
                command += " resume=true"
            raise Stopped(signum, trainer.global_step, checkpoint, command)


class OnFirstStep(Callback):
    """Call ``action()`` once, on rank 0, when the fit completes its first optimizer step (a resume's
    record is written then: a resume stopped before it leaves no trace)."""

    def __init__(self, action) -> None:
        self.action = action
        self._step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.action is None or trainer.global_step == self._step:
            return
        if trainer.is_global_zero:
            self.action()
        self.action = None


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this job (rank 0 only): SLURM restarts it and ``train`` resumes."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job or not is_rank_zero():
        return
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.warning("Requeued SLURM job %s: it continues from the run folder's last checkpoint.", job)
    else:
        log.error(
            "scontrol requeue %s failed (%s): resubmit with run_dir=SAME resume=true.", job, result.stderr.strip()
        )
