"""Making a run folder this run's: refusing one that another process owns or that holds another
run, and what a resume may change.

Schedule keys take effect on a resume and are recorded; the model, the adapter's shape, the data,
the seed and the precision make it another experiment and are refused unless ``resume_changes``
names them. ``config.yaml`` stays the first part's config; each resume that trains its first step
writes ``config.resume-N.yaml`` and a line of ``resumes.jsonl`` with what it changed (a resume
stopped before that leaves the folder as it was; ``docs/run-folder.md``)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import ConfigError
from idefics2_ft.data.fingerprint import same_file
from idefics2_ft.data.sources import ALIASES
from idefics2_ft.ranks import is_rank_zero
from idefics2_ft.run_folder import (
    RunFolder,
    atomic_write_text,
    load_yaml,
    read_base_record,
    redacted,
    remove_outputs,
    run_outputs,
    slurm_restarted,
)

log = logging.getLogger(__name__)

# Keys that make a resumed run a different experiment: refused unless resume_changes names them.
EXPERIMENT = ("model.", "peft.", "data.", "objective.", "seed", "trainer.precision")
# ... except these, which change how the run is read or shown, not what it trains on.
HARMLESS = ("data.num_workers", "data.eval_batch_size", "data.max_val_samples", "data.on_bad_sample")
# The adapter's shape and where it started (last.ckpt holds adapters of the old ones), and the objective (its
# step reads other batches): no resume_changes can accept these.
SHAPE = (
    "peft.method",
    "peft.r",
    "peft.target",
    "peft.modules_to_save",
    "peft.skip_modules",
    "model.adapter",
    "objective.name",
)
# Where the data files are: another path holding the same content (by fingerprint) is the same data.
MOVABLE = ("data.train_file", "data.val_file", "data.path")  # not data.image_dir: images are not fingerprinted
NOT_COMPARED = ("run_dir", "resume", "overwrite", "resume_changes")


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"optim.lr": 1e-3, ...}`` of a nested config dict."""
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}."))
    return out


def previous_config(run_dir: Path) -> dict[str, Any] | None:
    """The config the run was last trained with: the newest ``config.resume-N.yaml``, else ``config.yaml``."""
    folder = RunFolder(run_dir)
    path = folder.latest_config
    return OmegaConf.to_container(load_yaml(path), resolve=True) if path.is_file() else None


def changes(cfg: DictConfig, run_dir: Path, data_fingerprint: dict | None) -> dict[str, tuple[Any, Any]]:
    """Each key whose value differs from the previous part of the run: ``{key: (old, new)}``; the data's
    fingerprint counts as the key ``data (files)``."""
    before = previous_config(run_dir)
    if before is None:
        return {}
    old, new = _as_now(flat(before)), _as_now(flat(redacted(cfg)))
    defaults = _schema_defaults()
    found = {
        key: (old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if not key.startswith(NOT_COMPARED)
        and old.get(key) != new.get(key)
        # a key an older version did not write, at its default now: the same run (objective.name=sft, ...)
        and not (key not in old and key in defaults and new.get(key) == defaults[key])
    }
    if not old.get("data.streaming") and not new.get("data.streaming"):
        found.pop("data.buffer_size", None)  # the shuffle buffer of a stream: no stream, no effect
    edited = edited_data(run_dir, data_fingerprint)
    if edited:
        found["data (files)"] = ("as trained", f"changed since: {', '.join(edited)}")
    return found


def _as_now(values: dict[str, Any]) -> dict[str, Any]:
    """Flat config values with the names an older version wrote read as today's: ``data.source=docvqa``
    is ``hub`` (``data=docvqa`` became a preset of it), in a mixture's entries too."""
    out = dict(values)
    if out.get("data.source") in ALIASES:
        out["data.source"] = ALIASES[out["data.source"]]
    if isinstance(out.get("data.mixture"), list):
        out["data.mixture"] = [
            {**e, "source": ALIASES.get(e.get("source"), e.get("source"))} if isinstance(e, dict) else e
            for e in out["data.mixture"]
        ]
    return out


def _schema_defaults() -> dict[str, Any]:
    """Every key's default in the schema, flat (what a key an older version did not write would have been)."""
    from idefics2_ft.config import TrainConfig

    return flat(OmegaConf.to_container(OmegaConf.structured(TrainConfig), resolve=False, throw_on_missing=False))


def edited_data(run_dir: Path, data_fingerprint: dict | None) -> list[str]:
    """What of the data differs from the fingerprint the run recorded (``train_file``, ...): by content,
    never by modification time (``data/fingerprint.py``)."""
    recorded = (read_base_record(run_dir) or {}).get("data")
    if recorded is None or data_fingerprint is None:
        return []
    return sorted(_differing(recorded, data_fingerprint))


def _differing(recorded: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(recorded) | set(now)):
        old, new = recorded.get(key), now.get(key)
        if isinstance(old, dict) and isinstance(new, dict):  # a mixture: per source
            out += _differing(old, new, f"{prefix}{key}/")
        elif not same_file(old, new):
            out.append(prefix + key)
    return out


def is_experiment(key: str) -> bool:
    return key.startswith(EXPERIMENT) and not key.startswith(HARMLESS) or key == "data (files)"


def check_resume(cfg: DictConfig, run_dir: Path, data_fingerprint: dict | None) -> dict[str, tuple[Any, Any]]:
    """The changes this resume makes, refusing (before anything is written) those that would mix two
    experiments in one run folder.

    Raises:
        ConfigError: naming each refused key with its old and new value, and the fix.
    """
    accepted = set(cfg.resume_changes)
    if previous_config(run_dir) is None or read_base_record(run_dir) is None:
        missing = [p.name for p in (RunFolder(run_dir).config, RunFolder(run_dir).base_record) if not p.is_file()]
        if "all" not in accepted:
            raise ConfigError(
                [
                    f"resume=true: {run_dir} holds checkpoints/last.ckpt but not {' or '.join(missing)}, which this "
                    "resume must be compared with (model, adapter, data): it cannot tell whether it continues the "
                    "same experiment. Restore those files from where the checkpoint came from, or continue anyway "
                    "with resume_changes=[all]."
                ]
            )
        log.warning("resume_changes=[all]: %s is missing; this resume is not compared with the run.", missing)
    found = changes(cfg, run_dir, data_fingerprint)
    if all(f"data.{k}" in accepted for k in edited_data(run_dir, data_fingerprint)):
        accepted.add("data (files)")  # the files of keys accepted by name (data.train_file) differ, of course
    recorded = (read_base_record(run_dir) or {}).get("data")
    if recorded and "hub" not in recorded and not edited_data(run_dir, data_fingerprint):
        # the same bytes at another path (data staged anew on a node's local disk): the same data
        moved = [k for k in found if k in MOVABLE and k not in accepted]
        accepted.update(moved)
        if moved:
            log.info("Resume: %s moved, with the same content (by fingerprint): the same data.", ", ".join(moved))
    problems = []
    for key, (old, new) in found.items():
        if key.startswith(SHAPE):
            problems.append(
                f"resume=true with {key} changed ({old!r} -> {new!r}): checkpoints/last.ckpt holds adapters of the "
                "old shape, so this cannot continue it. Start a new run_dir."
            )
        elif (
            is_experiment(key)
            and key not in accepted
            and "all" not in accepted
            and not (key == "data (files)" and "data" in accepted)
        ):
            accept = "data" if key == "data (files)" else key
            problems.append(
                f"resume=true with {key} changed ({old!r} -> {new!r}): the resumed part would be another experiment. "
                f"Start a new run_dir, or accept it with resume_changes=[{accept}]."
            )
    if problems:
        raise ConfigError(problems)
    return found


def record_resume(cfg: DictConfig, run_dir: Path, found: dict[str, tuple[Any, Any]]) -> Path:
    """Write ``config.resume-N.yaml`` and a line of ``resumes.jsonl``; log what changed. Called once the
    resume has trained its first step (``RecordResume``): a resume that never trained leaves no trace."""
    folder = RunFolder(run_dir)
    resumed = folder.resume_configs()
    number = (int(resumed[-1].stem.rsplit("-", 1)[1]) if resumed else 0) + 1
    path = folder.resume_config(number)
    atomic_write_text(path, OmegaConf.to_yaml(OmegaConf.create(redacted(cfg))))
    entry = {
        "resume": number,
        "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "config": path.name,
        "changed": {k: [v[0], v[1]] for k, v in found.items()},
    }
    with open(folder.resumes, "a", encoding="utf-8") as f:  # appended: one line per resume, never rewritten
        f.write(json.dumps(entry) + "\n")
    if found:
        listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in found.items())
        log.warning("Resume %d changes %s (they take effect from here on; %s)", number, listed, path.name)
    else:
        log.info("Resume %d: the same config as before (%s)", number, path.name)
    return path


def in_use(run_dir: str, holder: dict) -> str:
    job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
    return (
        f"run_dir={run_dir} is in use by pid {holder.get('pid')} on {holder.get('host')} since "
        f"{holder.get('started')}{job}: wait for that run to end (or stop it), or choose another run_dir."
    )


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
        removed, kept = remove_outputs(run_dir)
        log.warning("overwrite=true: removed the earlier run in %s (%s)", run_dir, ", ".join(removed))
        if kept:
            log.warning("overwrite=true kept what this project did not write there: %s", ", ".join(kept))
