"""What the commands that read a finished run share: ``key=value`` arguments and console logging."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import TrainConfig
from idefics2_ft.run_folder import RunFolder, load_yaml


def parse_overrides(argv: list[str], script_keys: dict[str, Any]) -> tuple[DictConfig, dict[str, Any]]:
    """``key=value`` arguments as ``train.py`` takes them: ``run_dir`` and config keys, plus the
    script's own keys (``script_keys`` with their defaults).

    Returns the run's config (``run_dir/config.yaml`` with the overrides, checked against the
    schema) and the script's values.

    Raises:
        SystemExit: with a usage line for a missing ``run_dir`` or a malformed argument.
    """
    pairs = {}
    for arg in argv:
        if "=" not in arg:
            raise SystemExit(f"arguments are key=value (got {arg!r}); e.g. run_dir=outputs/easyvqa_tiny/demo")
        key, value = arg.split("=", 1)
        pairs[key] = value
    if "run_dir" not in pairs:
        raise SystemExit("run_dir=PATH is required: the folder of a finished training run.")
    run_dir = Path(pairs.pop("run_dir"))
    if run_dir.exists() and not run_dir.is_dir():
        raise SystemExit(f"run_dir={run_dir} is a file: run_dir must be a folder that train.py wrote.")
    if not RunFolder(run_dir).config.is_file():
        raise SystemExit(f"{RunFolder(run_dir).config} not found: run_dir must be a folder that train.py wrote.")
    own = dict(script_keys)
    for key in list(pairs):
        if key in script_keys:
            own[key] = pairs.pop(key)
    schema = OmegaConf.structured(TrainConfig)
    cfg = OmegaConf.merge(schema, load_yaml(RunFolder(run_dir).latest_config))  # RunFolderError names a bad file
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in pairs.items()]))
    cfg.run_dir = str(run_dir)
    return cfg, own


def rehearsed_stop(argv: list[str]) -> str | None:
    """``debug.stop_at`` from this command line only: a run trained with it keeps it in its config, and
    the commands that read the run must not stop themselves for that."""
    given = [a.split("=", 1)[1] for a in argv if a.startswith("debug.stop_at=")]
    return given[-1] if given else None


def setup_logging() -> None:
    """Our own messages on stderr (Lightning and transformers keep their own handlers)."""
    logger = logging.getLogger("idefics2_ft")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def mixture_problem(args: list[str]) -> str | None:
    """A ``data.mixture=[...]`` override whose entries hold a key no entry has (``wieght``), named with
    the nearest key, in one line; Hydra's own refusal suggests ``+data.mixture``, which fails the same way."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from idefics2_ft.config.validate import mixture_entry_problems

    given = [a for a in args if a.split("=", 1)[0].lstrip("+~") == "data.mixture"]
    if not given:
        return None
    try:
        value = OverridesParser.create().parse_override(given[-1]).value()
    except Exception:  # not Hydra's grammar: Hydra says so itself
        return None
    problems = mixture_entry_problems(value)
    if not problems:
        return None
    return problems[0] if len(problems) == 1 else f"{len(problems)} problems: " + "; ".join(problems)
