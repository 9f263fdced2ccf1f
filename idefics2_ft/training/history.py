"""The run's curves, whatever the logger: ``history.jsonl`` in the run folder, for ``report.html``.

One JSON line per logging step (``train/loss``, ``train/lr``; with ``objective=dpo`` also the pair
metrics: ``train/rewards/*``, ``train/logps/*``, ``train/loss/<name>``, ``train/length/*``) and per
validation (``val/loss`` and the validation metrics), each with its optimizer step. Written by rank 0
as it goes, so a crashed run keeps its curve; on a resume the lines of the steps that will run again
are dropped.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from idefics2_ft.ranks import is_rank_zero
from idefics2_ft.run_folder import HISTORY_FILE, atomic_write_text, read_history

TRAIN_KEYS = ("train/loss", "train/lr")
# what a preference run logs each step besides (PreferenceModule): report.html draws the rewards
PAIR_PREFIXES = ("train/rewards/", "train/logps/", "train/loss/", "train/length/")


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


class History(Callback):
    """Appends the logged training and validation figures to ``run_dir/history.jsonl`` (rank 0)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / HISTORY_FILE

    def _write(self, row: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.ckpt_path and is_rank_zero() and self.path.is_file():  # resumed: keep the steps done
            kept = [row for row in read_history(self.path.parent) if row["step"] <= trainer.global_step]
            atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not is_rank_zero() or not trainer._logger_connector.should_update_logs:
            return
        metrics = trainer.callback_metrics
        row = {k: _number(metrics[k]) for k in TRAIN_KEYS if k in metrics}
        row.update({k: _number(v) for k, v in metrics.items() if k.startswith(PAIR_PREFIXES) and v.numel() == 1})
        if row:
            self._write({"step": trainer.global_step, **row})

    def on_validation_end(self, trainer, pl_module) -> None:
        if not is_rank_zero() or trainer.sanity_checking:
            return
        row = {k: _number(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        if row:
            self._write({"step": trainer.global_step, **row})
