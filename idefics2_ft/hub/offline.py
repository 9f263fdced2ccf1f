"""Without a network: check that the cache holds what a run needs (``preflight``) before anything loads."""

from __future__ import annotations

import json
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from idefics2_ft.data.mixture import source_configs
from idefics2_ft.data.sources import is_hub_id, kind_of
from idefics2_ft.data.sources.table import parse_split
from idefics2_ft.hub.push import HubError

log = logging.getLogger(__name__)


# What a model folder must hold to train and export (a repo may hold more: we never fetch it).
MODEL_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "*.txt"]
REQUIRED_MODEL_FILES = ("config.json", "tokenizer_config.json")


@dataclass(frozen=True)
class Need:
    """One thing from the Hub that a config needs: a model repo or a dataset."""

    kind: str  # "model", "dataset", or "stream" (a dataset read as a stream: it needs the network)
    repo_id: str
    revision: str | None = None
    name: str | None = None  # a dataset's configuration
    splits: tuple[str, ...] = ()

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        subset = f" [{self.name}]" if self.name else ""
        return f"{self.kind} {self.repo_id}{at}{subset}" + (f" ({', '.join(self.splits)})" if self.splits else "")


def needs(cfg: DictConfig) -> list[Need]:
    """What ``cfg`` will read from the Hub: the base model (with its processor) and the dataset."""
    found = []
    if is_hub_id(cfg.model.name_or_path):
        found.append(Need("model", cfg.model.name_or_path, cfg.model.revision))
    for source in source_configs(cfg.data):
        d = source.cfg
        dataset = kind_of(d).hub_dataset(d)
        if dataset is not None:
            splits = tuple(dict.fromkeys(parse_split(s)[0] for s in (d.train_split, d.val_split)))
            found.append(Need("stream" if d.streaming else "dataset", dataset, None, d.subset, splits))
    return found


def hub_reachable(timeout_s: float = 3.0) -> tuple[bool, str]:
    """Whether the Hub answers (any HTTP status counts), and why not in words."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False, "HF_HUB_OFFLINE=1"
    try:
        urllib.request.urlopen(constants.ENDPOINT, timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return True, ""
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        return False, f"{constants.ENDPOINT} cannot be reached: {reason}"
    return True, ""


def cached_model(need: Need) -> tuple[Path | None, list[str]]:
    """The model's snapshot folder in the HF cache and the files it lacks (never touches the network)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(need.repo_id, revision=need.revision, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and kin: nothing of this revision is cached
        return None, ["everything (not in the cache)"]
    missing = [name for name in REQUIRED_MODEL_FILES if not (folder / name).is_file()]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing += [s for s in shards if not (folder / s).is_file()]
    elif not (folder / "model.safetensors").is_file():
        missing.append("model.safetensors")
    for either in (("tokenizer.json", "tokenizer.model"), ("preprocessor_config.json", "processor_config.json")):
        if not any((folder / name).is_file() for name in either):
            missing.append(" or ".join(either))
    return folder, missing


def cached_dataset(need: Need) -> list[str]:
    """The splits of a Hub dataset that ``datasets`` has not prepared in its cache (no network)."""
    import datasets
    from datasets.naming import camelcase_to_snakecase

    # datasets' own cache naming for a Hub dataset: <namespace>___<name in snake case>/<config>/<version>/<hash>
    namespace, _, name = need.repo_id.rpartition("/")
    root = Path(datasets.config.HF_DATASETS_CACHE) / f"{namespace}___{camelcase_to_snakecase(name)}"
    pattern = f"{need.name or '*'}/*/*/dataset_info.json"  # a subset's own configuration folder
    infos = [json.loads(p.read_text()) for p in root.glob(pattern)] if root.is_dir() else []
    have = {split for info in infos for split in (info.get("splits") or {})}
    return [s for s in need.splits if s not in have]


def go_offline() -> None:
    """Make this process (and the ranks it starts) read the Hub's cache only."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    from huggingface_hub import constants

    constants.HF_HUB_OFFLINE = True
    datasets_config = sys.modules.get("datasets.config")
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = datasets_config.HF_DATASETS_OFFLINE = True


def preflight(cfg: DictConfig, prefetch_command: str) -> str:
    """Before anything loads: is what the config needs on the Hub reachable, or in the cache?

    Online, nothing is checked (the usual downloads follow). Without the Hub (``HF_HUB_OFFLINE=1``, or
    the endpoint does not answer in 3 s), every need must be in the cache; then this process goes
    offline so that nothing waits on the network. Returns a one-line summary.

    Raises:
        HubError: listing what the cache lacks and the ``prefetch`` command that fetches it.
    """
    wanted = needs(cfg)
    if not wanted:
        return "nothing to fetch from the Hub"
    reachable, why = hub_reachable()
    if reachable:
        return "the Hub is reachable"
    problems = []
    for need in wanted:
        if need.kind == "model":
            _, missing = cached_model(need)
        elif need.kind == "stream":
            missing = ["a stream from the Hub (data.streaming=true): prefetch it and set data.streaming=false"]
        else:
            missing = [f"split {s}" for s in cached_dataset(need)]
        if missing:
            problems.append(f"{need}: {', '.join(missing)}")
    if problems:
        from huggingface_hub import constants

        raise HubError(
            f"The Hugging Face Hub cannot be used here ({why}) and the cache ({constants.HF_HUB_CACHE}) lacks:\n  - "
            + "\n  - ".join(problems)
            + f"\nOn a machine with internet (a login node) and the same HF_HOME, run once:\n  {prefetch_command}\n"
            "then run this again (with HF_HUB_OFFLINE=1 on nodes without internet)."
        )
    go_offline()
    return f"offline ({why}): {', '.join(str(n) for n in wanted)} from the cache"
