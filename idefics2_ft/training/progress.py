"""Progress that reads well where training really runs: a bar on a terminal, lines in a file.

Under SLURM and in CI stdout is a file, and a progress bar writes its ``\\r`` redraws into it (the
demo's log was 115 KB of them). There, ``LineProgress`` logs one line every ``every_s`` seconds,
and at the first and the last step, instead.
"""

from __future__ import annotations

import logging
import time

import torch
from lightning.pytorch.callbacks import Callback

from idefics2_ft.console import duration

log = logging.getLogger(__name__)


def on_cuda(trainer) -> bool:
    """True when the trainer's device is a CUDA GPU (Lightning 2 has no ``trainer.on_gpu``)."""
    return trainer.strategy.root_device.type == "cuda"


class LineProgress(Callback):
    """One log line per ``every_s`` seconds of training (rank 0): step/total, loss, lr, samples/s,
    the ETA and, on CUDA, the peak memory."""

    def __init__(self, every_s: float = 30.0, batch_size: int = 1) -> None:
        self.every_s = every_s
        self.batch_size = batch_size
        self.samples_per_step = batch_size
        self._start = self._last = 0.0
        self._first_step = self._last_step = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.samples_per_step = self.batch_size * trainer.world_size * trainer.accumulate_grad_batches
        self._start = self._last = time.perf_counter()
        self._first_step = self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return  # mid-accumulation, or not rank 0
        self._last_step = step
        now = time.perf_counter()
        first, last = step == self._first_step + 1, step >= trainer.max_steps
        if not (first or last or now - self._last >= self.every_s):
            return
        self._last = now
        done, elapsed = step - self._first_step, now - self._start
        loss = trainer.callback_metrics.get("train/loss")
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        parts = [
            f"step {step}/{trainer.max_steps}",
            f"loss {float(loss):.4f}" if loss is not None else "loss -",
            f"lr {lr:.3g}",
            f"{done * self.samples_per_step / elapsed:.2f} samples/s" if elapsed > 0 else "",
            f"ETA {duration((trainer.max_steps - step) * elapsed / done)}" if done else "",
        ]
        if on_cuda(trainer):
            parts.append(f"peak memory {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
        log.info("  ".join(p for p in parts if p))


class PerfMetrics(Callback):
    """Where a step's time goes, averaged over each logging window (``trainer.log_every_n_steps``):

    - ``perf/data_wait_frac``: the time from the end of one batch to the start of the next (the loop
      waiting on the loader) over the time from the end of one batch to the end of the next;
    - ``perf/samples_per_s``, ``perf/tokens_per_s`` (real tokens, padding not counted);
    - ``data/pad_frac``, ``data/pixel_pad_frac``: padded tokens and pixels over all (the collator's
      counts: no device sync);
    - on CUDA, ``perf/peak_memory_gb`` and ``perf/mfu`` (``flops_per_token`` from the plan over the
      GPU's bf16 peak).

    Sums are kept per batch and logged once per window: ``LightningModule.log`` costs about 0.7 ms a
    call on the CPU (cProfile over ``scripts/benchmarks/loops.py``), too much to pay for six values every step.
    The batch after validation is timed from the validation's end; the one after a checkpoint save
    is not timed.
    """

    KEYS = ("samples", "tokens", "token_slots", "pixels", "pixel_slots", "wait", "period")

    def __init__(self, flops_per_token: float | None = None, peak_flops: float | None = None) -> None:
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self._last_end: float | None = None
        self._wait = 0.0
        self._step = -1
        self._sums = dict.fromkeys(self.KEYS, 0.0)
        self._timed = dict.fromkeys(("samples", "tokens", "token_slots"), 0.0)

    def on_train_start(self, trainer, pl_module) -> None:
        self._step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._wait = time.perf_counter() - self._last_end if self._last_end is not None else 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        stats = batch.get("stats") if isinstance(batch, dict) else None
        if stats:
            for key in ("samples", "tokens", "token_slots", "pixels", "pixel_slots"):
                self._sums[key] += stats.get(key, 0)
            if self._last_end is not None:  # a timed batch
                self._sums["wait"] += self._wait
                self._sums["period"] += now - self._last_end
                for key in self._timed:
                    self._timed[key] += stats[key]
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if stepped and self._sums["samples"] and trainer._logger_connector.should_update_logs:
            self._log(trainer, pl_module)
        self._last_end = time.perf_counter()

    def _log(self, trainer, pl_module) -> None:
        s, t = self._sums, self._timed
        metrics = {"data/pad_frac": 1 - s["tokens"] / s["token_slots"]}
        if s["pixel_slots"]:
            metrics["data/pixel_pad_frac"] = 1 - s["pixels"] / s["pixel_slots"]
        if s["period"] > 0:
            metrics["perf/data_wait_frac"] = s["wait"] / s["period"]
            metrics["perf/samples_per_s"] = t["samples"] / s["period"]
            metrics["perf/tokens_per_s"] = t["tokens"] / s["period"]
            if on_cuda(trainer) and self.flops_per_token and self.peak_flops:
                metrics["perf/mfu"] = t["token_slots"] * self.flops_per_token / s["period"] / self.peak_flops
        if on_cuda(trainer):
            metrics["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        pl_module.log_dict(metrics, batch_size=1)
        self._sums = dict.fromkeys(self.KEYS, 0.0)
        self._timed = dict.fromkeys(self._timed, 0.0)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._last_end = time.perf_counter()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        self._last_end = None  # the save runs after this batch's end: the next batch starts afresh
