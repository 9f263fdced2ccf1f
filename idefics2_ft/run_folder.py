"""The run folder: what lives where, the redacted config, the record of the base.

Training writes a run folder; evaluation, prediction and export read it. ``RunFolder`` is the one
place that names its files, so the three agree (``docs/run-folder.md`` describes each file).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
LOG_FILE = "train.log"
BASE_RECORD = "base_model.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.jsonl"
LOG_DIR = "logs"
HISTORY_FILE = "history.jsonl"  # the curves, whatever the logger
REPORT_FILE = "report.html"
PLAN_FILE = "plan.json"
PHASES_FILE = "phases.json"
ADAPTER_DIR = "adapter"
FULL_MODEL_DIR = "model"  # peft=full saves the whole model instead of an adapter
EXPORT_DIR = "export"
EVAL_DIR = "eval"
COMMAND_FILE = "command.txt"  # the command that continues the run (resume=true)
RESUMES_FILE = "resumes.jsonl"  # one line per resume: what it changed
LOCK_FILE = ".lock"  # held (flock) by the process that owns the folder; see FolderLock


@dataclass(frozen=True)
class RunFolder:
    """A run folder's paths by name: ``RunFolder(run_dir).metrics`` is ``run_dir/metrics.json``."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / CONFIG_FILE)
    log = property(lambda self: self.root / LOG_FILE)
    base_record = property(lambda self: self.root / BASE_RECORD)
    checkpoints = property(lambda self: self.root / CHECKPOINT_DIR)
    last_checkpoint = property(lambda self: self.root / CHECKPOINT_DIR / LAST_CHECKPOINT)
    metrics = property(lambda self: self.root / METRICS_FILE)
    predictions = property(lambda self: self.root / PREDICTIONS_FILE)
    logs = property(lambda self: self.root / LOG_DIR)
    history = property(lambda self: self.root / HISTORY_FILE)
    report = property(lambda self: self.root / REPORT_FILE)
    plan = property(lambda self: self.root / PLAN_FILE)
    phases = property(lambda self: self.root / PHASES_FILE)
    adapter = property(lambda self: self.root / ADAPTER_DIR)
    full_model = property(lambda self: self.root / FULL_MODEL_DIR)
    export = property(lambda self: self.root / EXPORT_DIR)

    def weights(self, full: bool) -> Path:
        """Where the trained weights are saved: ``adapter/``, or ``model/`` for ``peft=full``."""
        return self.full_model if full else self.adapter

    resumes = property(lambda self: self.root / RESUMES_FILE)
    command = property(lambda self: self.root / COMMAND_FILE)

    def resume_config(self, number: int) -> Path:
        """The config resume ``number`` continued with: ``config.resume-<number>.yaml``."""
        return self.root / f"config.resume-{number}.yaml"

    def resume_configs(self) -> list[Path]:
        """Every ``config.resume-N.yaml``, in order."""
        found = self.root.glob("config.resume-*.yaml")
        return sorted(found, key=lambda p: int(p.stem.rsplit("-", 1)[1]))

    @property
    def latest_config(self) -> Path:
        """The config the run was last trained with: the newest resume's, else ``config.yaml``."""
        resumed = self.resume_configs()
        return resumed[-1] if resumed else self.config

    def eval(self, split: str) -> Path:
        """Where ``evaluate`` writes a split's predictions, metrics and report: ``eval/<split>``."""
        return self.root / EVAL_DIR / split


# What a run leaves in its folder, beyond config.yaml and base_model.json: the marks of a run that
# trained (a folder holding any of them is not reused silently) and what overwrite=true removes.
RUN_OUTPUTS = (CHECKPOINT_DIR, ADAPTER_DIR, FULL_MODEL_DIR, METRICS_FILE, PREDICTIONS_FILE)
REPLACED_BY_OVERWRITE = (
    *RUN_OUTPUTS,
    LOG_DIR,
    EXPORT_DIR,
    EVAL_DIR,
    LOG_FILE,
    CONFIG_FILE,
    BASE_RECORD,
    HISTORY_FILE,
    REPORT_FILE,
    PLAN_FILE,
    PHASES_FILE,
    RESUMES_FILE,
    COMMAND_FILE,
)


def run_outputs(run_dir: Path) -> list[str]:
    """The marks of an earlier run in ``run_dir`` (``checkpoints/``, ``adapter/``, ``metrics.json``, ...)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def remove_outputs(run_dir: Path) -> None:
    """Remove what ``overwrite=true`` replaces: every output of an earlier run, exports included."""
    run_dir = Path(run_dir)
    for name in REPLACED_BY_OVERWRITE:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for path in run_dir.glob("config.resume-*.yaml"):
        path.unlink()
    for path in run_dir.glob(EXPORT_DIR + "*"):  # export.out_dir=RUN/export-adapter and the like
        shutil.rmtree(path) if path.is_dir() else path.unlink()


# Keys such as `token`, `hf_token`, `api_key`, `password` (not `max_new_tokens`).
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key|key)$")


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
    """Write ``config.yaml`` (redacted); rank 0 only, the caller decides."""
    OmegaConf.save(OmegaConf.create(redacted(cfg)), RunFolder(run_dir).config)


def write_base_record(run_dir: Path, entry: dict) -> None:
    """Write ``base_model.json``: which base the run trains on, so evaluation and export load exactly that one."""
    RunFolder(run_dir).base_record.write_text(json.dumps(entry, indent=2))


def read_base_record(run_dir: Path) -> dict | None:
    """``base_model.json`` of a run, or None when the run has none."""
    path = RunFolder(run_dir).base_record
    return json.loads(path.read_text()) if path.is_file() else None


def resume_command(run_dir: Path) -> str:
    """The command that continues this run (``command.txt``), or a generic one for a folder without it."""
    path = RunFolder(run_dir).command
    if path.is_file():
        return path.read_text(encoding="utf-8").strip()
    return f"idefics2-ft train <the run's overrides> run_dir={run_dir} resume=true"


def unfinished(run_dir: Path) -> str | None:
    """For a run with no trained weights saved: what it has (its last checkpoint) and how to go on; None
    when the run finished."""
    folder = RunFolder(run_dir)
    if (folder.adapter / "adapter_config.json").is_file() or (folder.full_model / "config.json").is_file():
        return None
    if folder.last_checkpoint.is_file():
        return (
            f"{run_dir} holds no trained adapter: the run did not finish. Its last checkpoint is "
            f"{folder.last_checkpoint}; continue it with: {resume_command(run_dir)}"
        )
    return f"{run_dir} holds no trained adapter and no checkpoint: the run stopped before its first save; train again."


def slurm_restarted() -> bool:
    """True when SLURM restarted this job after a requeue (it then resumes by itself)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def resume_checkpoint(cfg: DictConfig, run_dir: Path) -> str | None:
    """``checkpoints/last.ckpt`` with ``resume=true``, or when SLURM restarted a requeued job
    (``SLURM_RESTART_COUNT`` > 0, after a preemption signal); else None."""
    restarted = slurm_restarted()
    last = RunFolder(run_dir).last_checkpoint
    if not (cfg.resume or restarted) or not last.is_file():
        return None
    log.info("Resuming from %s%s", last, " (SLURM restarted the job)" if restarted and not cfg.resume else "")
    return str(last)


def write_results(run_dir: Path, metrics: dict[str, Any], predictions: list[dict] | None = None) -> None:
    """``metrics.json`` and, when there are any, ``predictions.jsonl``."""
    run_dir = Path(run_dir)
    (RunFolder(run_dir).metrics).write_text(json.dumps(metrics, indent=2, sort_keys=True))
    if predictions:
        with open(RunFolder(run_dir).predictions, "w", encoding="utf-8") as f:
            for row in predictions:
                f.write(json.dumps(row) + "\n")


def read_history(run_dir: Path) -> list[dict]:
    """The lines of ``run_dir/history.jsonl`` (none if the run wrote none)."""
    path = RunFolder(run_dir).history
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run, or an empty dict if it has none."""
    path = RunFolder(run_dir).metrics
    return json.loads(path.read_text()) if path.is_file() else {}


class FolderLock:
    """One process owns a run folder at a time: an exclusive ``flock`` on ``run_dir/.lock``.

    The kernel releases the lock when the process ends, however it ends (kill -9 included), so a
    stale lock never blocks a resume. The file names the holder (pid, host, start time, SLURM job),
    for the message that refuses a second process. On NFS (v4, and v3 with lockd) Linux maps
    ``flock`` to byte-range locks that every client sees; on Lustre it needs the ``flock`` mount
    option (``localflock`` only locks within one node).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> dict | None:
        """Take the lock: None when this process holds it now, else what the holder wrote."""
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held open while owned)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            text = f.read()
            f.close()
            try:
                return json.loads(text)
            except ValueError:
                return {"pid": "?", "host": "?", "started": "?"}
        f.seek(0)
        f.truncate()
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        f.write(json.dumps(holder))
        f.flush()
        self._file = f
        return None

    def release(self) -> None:
        """Give the folder up (the lock file goes, so a finished folder holds no trace of it)."""
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)
        self._file.close()  # closing the descriptor releases the flock
        self._file = None


@contextmanager
def log_to_file(run_dir: Path) -> Iterator[None]:
    """Copy the package's log lines into ``run_dir/train.log`` while the block runs (the caller
    runs it on rank 0 only)."""
    path = RunFolder(run_dir).log.resolve()
    root = logging.getLogger()
    taken = any(getattr(h, "baseFilename", None) == str(path) for h in root.handlers)
    if taken:
        yield
        return
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    handler.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    except BaseException:  # the whole traceback goes to the file; the console gets one line from the command
        handler.stream.write(traceback.format_exc())
        raise
    finally:
        root.removeHandler(handler)
        handler.close()
