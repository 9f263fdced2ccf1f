"""What W&B and TensorBoard get besides the metrics: the redacted config, the plan, and after each
validation a gallery of answers with their images."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

from idefics2_ft.reporting.gallery import gallery_items
from idefics2_ft.run_folder import RunFolder, redacted


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return out


class TrackerRecord(Callback):
    """Gives the experiment tracker what the run folder holds: the redacted config and the plan at
    the start, and after each validation a gallery of answers (a ``wandb.Table`` with images for
    W&B; images and a text table for TensorBoard). Metrics reach them through ``self.log`` as usual.
    """

    def __init__(self, cfg: DictConfig, run_dir: Path, rows_of_val: Callable[[Any], Sequence] | None = None) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self.rows_of_val = rows_of_val or (lambda trainer: trainer.datamodule.val_set.rows)

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        plan_file = RunFolder(self.run_dir).plan
        plan = json.loads(plan_file.read_text()) if plan_file.is_file() else None
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.config.update({"config": redacted(self.cfg), "plan": plan}, allow_val_change=True)
            elif isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(_flat(redacted(self.cfg)))
                if plan is not None:
                    logger.experiment.add_text("plan", "```\n" + json.dumps(plan, indent=2) + "\n```", 0)

    def on_validation_end(self, trainer, pl_module) -> None:
        predictions = pl_module.val_predictions
        if not trainer.is_global_zero or not predictions or trainer.sanity_checking:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, (WandbLogger, TensorBoardLogger))]
        if not loggers:
            return
        items = gallery_items(predictions, self.rows_of_val(trainer))
        step = trainer.global_step
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                columns = ["step", "image", "question", "prediction", "reference", "right", "type"]
                data = [
                    [
                        step,
                        wandb.Image(i["image"]) if i["image"] is not None else None,
                        i["question"],
                        i["prediction"],
                        i["reference"],
                        i["right"],
                        i["type"],
                    ]
                    for i in items
                ]
                logger.experiment.log(
                    {"val/gallery": wandb.Table(columns=columns, data=data), "trainer/global_step": step}
                )
            else:
                import numpy as np

                lines = ["| # | question | prediction | reference | right |", "|---|---|---|---|---|"]
                for n, i in enumerate(items):
                    if i["image"] is not None:
                        logger.experiment.add_image(
                            f"val/gallery/{n:02d}", np.asarray(i["image"]), step, dataformats="HWC"
                        )
                    cells = [i["question"], i["prediction"], i["reference"]]
                    lines.append(
                        f"| {n:02d} | "
                        + " | ".join(c.replace("|", "/") for c in cells)
                        + f" | {'yes' if i['right'] else 'no'} |"
                    )
                logger.experiment.add_text("val/gallery", "\n".join(lines), step)
