"""The run folder: what lives where, the redacted config, the record of the base, who owns it.

Training writes a run folder; evaluation, prediction and export read it. ``RunFolder`` is the one
place that names its files, so the three agree (``docs/run-folder.md`` describes each file).
Everything written into it, or into a folder a command is told to write, goes through
``outputs.py`` (atomic, and never over something else); ``FolderLock`` lets one process own it.
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

from idefics2_ft.run_folder.outputs import MARKER as MARKER
from idefics2_ft.run_folder.outputs import Output, atomic_write_text, claim_output, read_marker
from idefics2_ft.run_folder.outputs import OutputRefused as OutputRefused
from idefics2_ft.run_folder.outputs import claim_output_file as claim_output_file

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
        """Every ``config.resume-N.yaml``, in order (a copy such as ``config.resume-1 (copy).yaml`` is
        not one of them)."""
        found = [(int(m.group(1)), p) for p in self.root.glob("config.resume-*.yaml") if (m := RESUME.match(p.name))]
        return [p for _, p in sorted(found)]

    @property
    def latest_config(self) -> Path:
        """The config the run was last trained with: the newest resume's, else ``config.yaml``."""
        resumed = self.resume_configs()
        return resumed[-1] if resumed else self.config

    def eval(self, split: str) -> Path:
        """Where ``evaluate`` writes a split's predictions, metrics and report: ``eval/<split>``."""
        return self.root / EVAL_DIR / split


RESUME = re.compile(r"config\.resume-(\d+)\.yaml$")


class RunFolderError(ValueError):
    """A file of the run folder cannot be read (invalid YAML or JSON): the message names it and the fix."""


def load_yaml(path: Path) -> DictConfig:
    """A config file of the run folder, or one line naming the file, the line and the fix."""
    try:
        return OmegaConf.load(path)
    except Exception as err:  # yaml's ScannerError/ParserError, a UnicodeDecodeError, ...
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise RunFolderError(
            f"{path} is not valid YAML{where}: {problem}. Fix that line (config.yaml is the config the run was "
            "composed with; command.txt the command that composes it again)."
        ) from None


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


# Where the run keeps its own files: an output folder (export.out_dir, evaluate's out_dir) may not lie there.
RUN_OWN = (
    CHECKPOINT_DIR,
    ADAPTER_DIR,
    FULL_MODEL_DIR,
    LOG_DIR,
    *(n for n in REPLACED_BY_OVERWRITE if "." in n),
    LOCK_FILE,
)


# An output written before markers existed, known by the file each kind always holds
LEGACY_OUTPUTS = {
    "export": "export_report.json",
    "export-adapter": "export_report.json",
    "evaluation": "eval_metrics.json",
}


def run_identity(run_dir: Path) -> tuple[str, ...]:
    """What identifies a run for the outputs it writes: the ``run_id`` in ``base_model.json`` (kept by
    resumes, so a copied or moved folder is the same run), then the folder's absolute path (a run that
    has no id yet, or had none when an earlier version wrote its outputs)."""
    record = read_base_record(run_dir) or {}
    path = str(Path(run_dir).resolve())
    return (str(record["run_id"]), path) if record.get("run_id") else (path,)


def output_folder(run_dir: Path, path: str | Path, kind: str, key: str) -> Output:
    """Claim ``path`` for an output of ``kind`` written from the run in ``run_dir`` (``outputs.claim_output``
    with the run's own places protected). An export or evaluation written before markers existed is
    recognised by its files.

    Raises:
        OutputRefused: naming the path, what is there, and the fix.
    """
    root = Path(run_dir).resolve()

    def legacy(folder: Path) -> bool:
        return root in folder.parents and kind in LEGACY_OUTPUTS and (folder / LEGACY_OUTPUTS[kind]).is_file()

    return claim_output(path, kind, run_identity(run_dir), key, run_root=run_dir, run_own=RUN_OWN, legacy=legacy)


def weights_output(run_dir: Path, full: bool) -> Output:
    """Claim ``adapter/`` (``model/`` for ``peft=full``) for the trained weights: the process that owns
    the run folder (``FolderLock``) replaces the run's own earlier weights, written whole or not at all."""
    path = RunFolder(run_dir).weights(full)

    def earlier_weights(folder: Path) -> bool:  # saved before markers existed
        return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()

    return claim_output(path, path.name, run_identity(run_dir), "run_dir", legacy=earlier_weights)


def run_outputs(run_dir: Path) -> list[str]:
    """The marks of an earlier run in ``run_dir`` (``checkpoints/``, ``adapter/``, ``metrics.json``, ...)."""
    run_dir = Path(run_dir)
    found = []
    for name in RUN_OUTPUTS:
        path = run_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name + ("/" if path.is_dir() else ""))
    return found


def remove_outputs(run_dir: Path) -> tuple[list[str], list[str]]:
    """Remove what ``overwrite=true`` replaces: the run's own files by their names (``checkpoints/``,
    ``adapter/``, ``logs/``, ``metrics.json``, ...) and the output folders whose marker names this run
    (``export/``, ``eval/<split>/``, ``export-adapter/``, ...). A symlink is unlinked, never followed;
    anything else (a note in ``eval/``, a folder the user made) is kept. Everything is decided before
    anything is removed.

    Returns:
        What was removed and what was kept, by name.

    Raises:
        RunFolderError: a removal failed (naming it; what was removed before is listed).
    """
    run_dir = Path(run_dir)
    ours = run_identity(run_dir)  # before base_model.json, which holds it, goes

    def our_output(folder: Path) -> bool:
        if folder.is_symlink() or not folder.is_dir():
            return False
        marker = read_marker(folder)
        if marker is not None:
            return marker.get("owner") in ours
        return any((folder / f).is_file() for f in set(LEGACY_OUTPUTS.values()))  # written before markers existed

    doomed: list[Path] = []
    kept: list[str] = []
    for name in REPLACED_BY_OVERWRITE:  # the names this project gives a run's own files, and only those
        path = run_dir / name
        if name in (EXPORT_DIR, EVAL_DIR) or not (path.exists() or path.is_symlink()):
            continue
        doomed.append(path)
    doomed += RunFolder(run_dir).resume_configs()
    for path in sorted(run_dir.iterdir()):  # exports written anywhere in the folder (RUN/export-adapter)
        if path not in doomed and our_output(path):
            doomed.append(path)
        elif path.name in (EXPORT_DIR, EVAL_DIR) and path.is_symlink():
            kept.append(f"{path.name} (a link: not followed)")
        elif path.name in (EXPORT_DIR, EVAL_DIR) and path.is_dir():
            inner = [p for p in sorted(path.iterdir()) if not our_output(p)] if path.name == EVAL_DIR else [path]
            kept += [str(p.relative_to(run_dir)) + ("/" if p.is_dir() else "") for p in inner]
            if path.name == EVAL_DIR:
                doomed += [p for p in sorted(path.iterdir()) if our_output(p)]
    removed: list[str] = []
    for path in doomed:
        try:
            if path.is_symlink() or not path.is_dir():
                path.unlink()  # a link itself, never what it points to
            else:
                shutil.rmtree(path)
        except OSError as err:
            raise RunFolderError(
                f"overwrite=true could not remove {path} ({err.strerror}); removed before it: "
                f"{', '.join(removed) or 'nothing'}. Fix its permissions, or choose another run_dir."
            ) from None
        removed.append(str(path.relative_to(run_dir)) + ("/" if not path.suffix and not path.is_file() else ""))
    eval_dir = run_dir / EVAL_DIR
    if eval_dir.is_dir() and not eval_dir.is_symlink() and not any(eval_dir.iterdir()):
        eval_dir.rmdir()
    return removed, kept


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
    """Write ``base_model.json``: which base the run trains on, so evaluation and export load exactly that
    one, and the run's identity (``run_id``: made by the first part, kept by every resume)."""
    import uuid

    run_id = (read_base_record(run_dir) or {}).get("run_id") or uuid.uuid4().hex[:16]
    atomic_write_text(RunFolder(run_dir).base_record, json.dumps({"run_id": run_id, **entry}, indent=2))


def read_base_record(run_dir: Path) -> dict | None:
    """``base_model.json`` of a run, or None when the run has none.

    Raises:
        RunFolderError: the file is not valid JSON.
    """
    path = RunFolder(run_dir).base_record
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}): restore it, or start a new run_dir.") from None


# Characters a Hydra override value may hold unquoted (its grammar refuses ~, non-ASCII letters, and
# reads a comma as a sweep); anything else is quoted.
HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_./+-][A-Za-z0-9_./+:-]*")


def hydra_arg(key: str, value: object) -> str:
    """``key=value`` as one shell word that Hydra parses back to ``value``: quoted for Hydra where its
    grammar needs it (``run_dir='my runs/a,b'``), then for the shell."""
    import shlex

    text = str(value)
    if not HYDRA_PLAIN.fullmatch(text):
        # Hydra's quoted strings: a quote is escaped; backslashes only where they precede one (or the end)
        text = "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), text) + "'"
        if not any(c in text for c in '"$`\\!'):
            return f'"{key}={text}"'  # reads better than shlex's '\''-splicing, and means the same to the shell
    return shlex.quote(f"{key}={text}")


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``, on that folder wherever it is now: the
    overrides in ``command.txt`` plus ``run_dir``, and ``resume=true`` once it holds a checkpoint."""
    folder = hydra_arg("run_dir", run_dir)
    if RunFolder(run_dir).last_checkpoint.is_file():
        folder += " resume=true"
    import shlex

    path = RunFolder(run_dir).command
    if not path.is_file():
        return f"idefics2-ft train {folder} (add the run's overrides: its command.txt is missing)"
    try:
        words = shlex.split(path.read_text(encoding="utf-8"))
    except ValueError:  # an edited command.txt with an open quote
        return f"idefics2-ft train {folder} (add the run's overrides: {path} does not parse)"
    # command.txt holds the command as the run started it, with the run_dir of that day: replaced here
    words = words[2:] if words[:2] == ["idefics2-ft", "train"] else words
    kept = [shlex.quote(w) for w in words if not w.startswith(("run_dir=", "resume="))]
    return " ".join(["idefics2-ft train", *kept, folder])


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


def starting_adapter(path: str) -> Path:
    """The adapter ``model.adapter=`` names: an adapter folder itself, or a finished run's ``adapter/``.

    Raises:
        RunFolderError: nothing there, a run that did not finish (its last checkpoint and the command
            that finishes it), or a folder that holds no adapter; each naming the key.
    """
    folder = Path(path)
    if (folder / "adapter_config.json").is_file():
        return folder
    run = RunFolder(folder)
    if (run.adapter / "adapter_config.json").is_file():
        return run.adapter
    if not folder.is_dir():
        raise RunFolderError(
            f"model.adapter={path}: no such folder; give a finished run's folder or an adapter folder."
        )
    if run.config.is_file():
        raise RunFolderError(f"model.adapter={path}: {unfinished(folder)}")
    raise RunFolderError(
        f"model.adapter={path}: holds no adapter_config.json; give a finished run's folder (its adapter/ is read) "
        "or an adapter folder."
    )


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
    run = RunFolder(run_dir)
    if predictions:  # first: metrics.json is what marks the results complete
        atomic_write_text(run.predictions, "".join(json.dumps(row) + "\n" for row in predictions))
    atomic_write_text(run.metrics, json.dumps(metrics, indent=2, sort_keys=True))


def read_history(run_dir: Path) -> list[dict]:
    """The lines of ``run_dir/history.jsonl`` (none if the run wrote none)."""
    path = RunFolder(run_dir).history
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> dict[str, Any]:
    """``metrics.json`` of a run, or an empty dict if it has none."""
    path = RunFolder(run_dir).metrics
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise RunFolderError(f"{path} is not valid JSON ({err}): restore it, or evaluate the run again.") from None


class FolderLock:
    """One process owns a run folder at a time: an exclusive ``flock`` on ``run_dir/.lock``.

    The kernel releases the lock when the process ends, however it ends (kill -9 included), so a
    stale lock never blocks a resume. The lock file is never removed: a process that unlinked it
    while another waited to open it would let a third lock a new file of the same name, and two
    processes would own the folder. While held it names the holder (pid, host, start time, SLURM
    job), for the message that refuses a second process; it is emptied on release. On NFS (v4, and
    v3 with lockd) Linux maps ``flock`` to byte-range locks that every client sees; on Lustre it
    needs the ``flock`` mount option (``localflock`` only locks within one node).
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> dict | None:
        """Take the lock: None when this process holds it now, else what the holder wrote."""
        import fcntl
        import socket
        import time

        while True:
            try:  # the folder may vanish meanwhile (remove_folder_if_unused in another process): try again
                self.path.parent.mkdir(parents=True, exist_ok=True)
                f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115  (held open while owned)
            except (FileNotFoundError, FileExistsError):
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                f.close()
                return self.holder() or {"pid": "?", "host": "?", "started": "?"}
            try:
                same = os.fstat(f.fileno()).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            f.close()  # locked a file that was unlinked meanwhile (remove_folder_if_unused): take the new one
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "slurm_job": os.environ.get("SLURM_JOB_ID"),
        }
        f.seek(0)
        f.truncate()  # the lock file's own content: the holder (written only while this process holds it)
        f.write(json.dumps(holder))
        f.flush()
        self._file = f
        return None

    def holder(self) -> dict | None:
        """Who holds the lock now (what it wrote), or None when nobody does. Takes nothing, creates nothing:
        a read-only folder can be asked."""
        import fcntl

        try:
            f = open(self.path, encoding="utf-8")  # noqa: SIM115
        except OSError:
            return None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                try:
                    return json.loads(f.read()) or {}
                except ValueError:
                    return {}
            fcntl.flock(f, fcntl.LOCK_UN)
            return None

    def remove_folder_if_unused(self) -> bool:
        """Remove the run folder when it holds nothing but an unowned ``.lock`` (a run refused before it
        wrote anything). The lock is taken for the unlink, and ``acquire`` re-checks the file it locked,
        so no process can own a lock file that is gone. Returns whether the folder was removed."""
        folder = self.path.parent
        if not folder.is_dir() or any(p.name != LOCK_FILE for p in folder.iterdir()):
            return False
        if self._file is None and self.acquire() is not None:
            return False  # another process owns it now
        self.path.unlink(missing_ok=True)  # held: see acquire's inode check
        self._file.close()
        self._file = None
        try:
            folder.rmdir()
        except OSError:  # something arrived meanwhile: keep the folder
            return False
        return True

    def release(self) -> None:
        """Give the folder up: the holder's line is emptied, then the descriptor closed (which releases
        the flock). The file stays (see the class)."""
        if self._file is None:
            return
        self._file.seek(0)
        self._file.truncate()
        self._file.close()
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
