"""Which base a run trains on: a Hub id, a local folder, or a registered stand-in.

A stand-in is a base that is built rather than downloaded (the demo registers its tiny random-init
Idefics2 as ``tiny``). Train, evaluate, export, plan and the benchmarks all ask ``resolve_base``,
so none of them knows which stand-ins exist.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

IDEFICS2_8B = "huggingfacem4/idefics2-8b"


@dataclass(frozen=True)
class StandIn:
    """A base built on demand: ``build(cfg)`` returns its folder (built once, then cached),
    ``config(cfg)`` its ``Idefics2Config`` without building it, ``description`` what a card says it is."""

    build: Callable[[DictConfig], Path]
    config: Callable[[DictConfig], Any]
    description: str


_STAND_INS: dict[str, StandIn] = {}


def register_stand_in(name: str, stand_in: StandIn) -> None:
    """Make ``model.name_or_path=<name>`` mean this stand-in (registering the same name again replaces it).

    Args:
        name: the value of ``model.name_or_path`` that asks for it.
        stand_in: how to build it, its config, and how a card names it.
    """
    _STAND_INS[name] = stand_in


def stand_in(name: str) -> StandIn | None:
    """The stand-in registered as ``name``, or None."""
    return _STAND_INS.get(name)


def fingerprint(folder: Path) -> str:
    """A hash of a folder's weight files (cheap for a stand-in; a 16 GB checkpoint is never hashed)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.safetensors")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def resolve_base(cfg: DictConfig, recorded: dict | None = None) -> str:
    """The base to load: the run's recorded base when there is one (checked), else a stand-in's
    folder (built if needed), else ``model.name_or_path`` as given (a Hub id or a folder).

    Args:
        cfg: the config (``model.name_or_path``, and what a stand-in is built from).
        recorded: the run's ``base_model.json``, when resuming or reading a finished run.

    Returns:
        A Hub id or a folder for ``from_pretrained``.

    Raises:
        FileNotFoundError: the recorded stand-in is gone (its adapter only fits that base).
        RuntimeError: the stand-in at the recorded path was rebuilt into a different one.
    """
    if recorded is not None:
        return checked_record(recorded)
    built = stand_in(cfg.model.name_or_path)
    return str(built.build(cfg)) if built is not None else cfg.model.name_or_path


def base_record(cfg: DictConfig, model_path: str) -> dict:
    """What ``base_model.json`` keeps of the base: its path, its revision, and for a stand-in (which
    is rebuilt from a cache key and could be replaced) a fingerprint of its weights."""
    entry: dict[str, Any] = {"path": model_path}
    if Path(model_path).is_dir():
        entry["path"] = str(Path(model_path).resolve())
        if stand_in(cfg.model.name_or_path) is not None:
            entry["fingerprint"] = fingerprint(Path(model_path))
    if cfg.model.revision:
        entry["revision"] = cfg.model.revision
    return entry


def checked_record(recorded: dict) -> str:
    """The recorded base's path, after checking a fingerprinted one is still the same base."""
    if "fingerprint" not in recorded:
        return recorded["path"]
    folder = Path(recorded["path"])
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"The base this run was trained on ({folder}) is gone; its adapter only fits that base. "
            "Restore the folder, or train again."
        )
    if fingerprint(folder) != recorded["fingerprint"]:
        raise RuntimeError(f"The base at {folder} is not the one this run was trained on.")
    return str(folder)


def base_config(cfg: DictConfig):
    """The base's ``Idefics2Config`` without loading a weight: a stand-in's, a folder's
    ``config.json``, the published idefics2-8b's, or a Hub id's ``config.json``."""
    from transformers import AutoConfig

    from idefics2_ft.models.reference import idefics2_8b_config

    name = cfg.model.name_or_path
    built = stand_in(name)
    if built is not None:
        return built.config(cfg)
    if Path(name).is_dir():
        return AutoConfig.from_pretrained(name)
    if name.rstrip("/").lower() == IDEFICS2_8B:
        return idefics2_8b_config()
    return AutoConfig.from_pretrained(name, revision=cfg.model.revision)


def describe_base(name: str) -> tuple[str, str | None]:
    """How a model card names the base, and its Hub id for the card's metadata (None for a stand-in)."""
    built = stand_in(name)
    return (built.description, None) if built is not None else (name, name)
