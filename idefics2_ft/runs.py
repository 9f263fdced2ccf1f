"""The run folder: its layout, the redacted config, the record of the base, resume.

Training writes a run folder; evaluation, prediction and export read it. This module is the one
place that knows what lives where, so the three agree.

    run_dir/
      config.yaml            the resolved config, secret-looking values redacted
      base_model.json        the base the adapter was trained on (path, fingerprint, revision)
      checkpoints/last.ckpt  trainable weights + optimizer + loop state (never the frozen base)
      adapter/ or model/     the PEFT adapter (model/ for peft=full), processor beside it
      metrics.json           final metrics; predictions.jsonl: one line per validation question
      logs/                  CSV / TensorBoard / W&B files
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import ConfigError
from idefics2_ft.distributed import is_rank_zero

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
BASE_RECORD = "base_model.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOG_DIR = "logs"
HISTORY_FILE = "history.jsonl"  # the curves, whatever the logger (trainer/history.py)
REPORT_FILE = "report.html"

# Keys such as `token`, `hf_token`, `api_key`, `password` (not `max_new_tokens`).
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|key)$")


def weights_dir(run_dir: Path, peft_method: str) -> Path:
    """Where a run's trained weights are saved: ``adapter/``, or ``model/`` for ``peft=full``."""
    return Path(run_dir) / ("model" if peft_method == "full" else "adapter")


# What a run leaves in its folder, beyond config.yaml and base_model.json: the marks of a run that
# trained (a folder holding any of them is not reused silently) and what overwrite=true removes.
RUN_OUTPUTS = (CHECKPOINT_DIR, "adapter", "model", METRICS_FILE, PREDICTIONS_FILE)
REPLACED_BY_OVERWRITE = (
    *RUN_OUTPUTS,
    LOG_DIR,
    "export",
    "eval",
    LOG_FILE,
    CONFIG_FILE,
    BASE_RECORD,
    HISTORY_FILE,
    REPORT_FILE,
)


def slurm_restarted() -> bool:
    """True when SLURM restarted this job after a requeue (it then resumes by itself)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def run_outputs(run_dir: Path) -> list[str]:
    """The marks of an earlier run in ``run_dir`` (``checkpoints/``, ``adapter/``, ``metrics.json``, ...)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def claim_run_dir(cfg: DictConfig) -> None:
    """Make ``run_dir`` this run's: refuse a folder that holds another run, unless told.

    ``resume=true`` (or a SLURM restart) continues the run in it; ``overwrite=true`` removes that
    run's outputs first (rank 0). Nothing is written to the folder before this passes.

    Raises:
        ConfigError: the folder holds a run and neither ``resume=true`` nor ``overwrite=true`` was given.
    """
    run_dir = Path(cfg.run_dir)
    found = run_outputs(run_dir)
    if not found or cfg.resume or slurm_restarted():
        return
    if not cfg.overwrite:
        raise ConfigError(
            [
                f"run_dir={run_dir} already holds a run ({', '.join(found)}): add resume=true to continue it, "
                "overwrite=true to replace it, or choose another run_dir."
            ]
        )
    if is_rank_zero():
        for name in REPLACED_BY_OVERWRITE:
            path = run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for path in run_dir.glob("export*"):  # export.out_dir=RUN/export-adapter and the like
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        log.warning("overwrite=true: removed the earlier run in %s (%s)", run_dir, ", ".join(found))


def redacted(cfg: DictConfig) -> dict:
    """The resolved config as a dict, with any secret-looking value replaced."""

    def scrub(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: ("<redacted>" if SECRET_KEY.search(str(k).lower()) and isinstance(v, str) and v else scrub(v))
                for k, v in node.items()
            }
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node

    return scrub(OmegaConf.to_container(cfg, resolve=True))


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write ``config.yaml`` (redacted) on rank 0."""
    if is_rank_zero():
        OmegaConf.save(OmegaConf.create(redacted(cfg)), Path(run_dir) / CONFIG_FILE)


def fingerprint(folder: Path) -> str:
    """A hash of a local base's weight files (cheap for the tiny model)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def record_base(cfg: DictConfig, model_path: str) -> None:
    """Write which base the run trains on, so evaluation and export load exactly that one.

    Local folders are fingerprinted only for the tiny base, which is rebuilt from a cache key and
    could be replaced; hashing a 16 GB checkpoint would cost minutes.
    """
    entry = {"path": model_path}
    if Path(model_path).is_dir():
        entry["path"] = str(Path(model_path).resolve())
        if cfg.model.name_or_path == "tiny":
            entry["fingerprint"] = fingerprint(Path(model_path))
    if cfg.model.revision:
        entry["revision"] = cfg.model.revision
    (Path(cfg.run_dir) / BASE_RECORD).write_text(json.dumps(entry, indent=2))


def recorded_base(cfg: DictConfig) -> str | None:
    """The base recorded in ``run_dir/base_model.json``, or None when the run has no record.

    Raises:
        FileNotFoundError: the recorded tiny base is gone (its adapter only fits that base).
        RuntimeError: the tiny base at the recorded path was rebuilt into a different one.
    """
    record = Path(cfg.run_dir) / BASE_RECORD
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text())
    if cfg.model.name_or_path != "tiny":
        return recorded["path"]
    folder = Path(recorded["path"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The tiny base this run was trained on ({folder}) is gone; its adapter only fits that base. "
            "Restore the folder, or train again."
        )
    if fingerprint(folder) != recorded["fingerprint"]:
        raise RuntimeError(f"The tiny base at {folder} is not the one this run was trained on.")
    return str(folder)


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``checkpoints/last.ckpt`` with ``resume=true``, or when SLURM restarted a requeued job
    (``SLURM_RESTART_COUNT`` > 0, after a preemption signal); else None."""
    restarted = slurm_restarted()
    last = Path(run_dir) / CHECKPOINT_DIR / LAST_CHECKPOINT
    if not (cfg.resume or restarted) or not last.is_file():
        return None
    log.info("Resuming from %s%s", last, " (SLURM restarted the job)" if restarted and not cfg.resume else "")
    return str(last)


def write_results(run_dir: Path, metrics: dict[str, Any], predictions: list[dict] | None = None) -> None:
    """``metrics.json`` and, when there are any, ``predictions.jsonl``."""
    run_dir = Path(run_dir)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if predictions:
        with open(run_dir / PREDICTIONS_FILE, "w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")


def read_history(run_dir: Path) -> list[dict]:
    """The lines of ``run_dir/history.jsonl`` (none if the run wrote none)."""
    path = Path(run_dir) / HISTORY_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run, or an empty dict if it has none."""
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


@contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Copy the package's log lines into ``run_dir/train.log`` (rank 0) while the block runs."""
    path = (Path(run_dir) / LOG_FILE).resolve()
    root = logging.getLogger()
    taken = any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers)
    if taken or not is_rank_zero():
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
