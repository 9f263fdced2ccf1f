"""What a run's data is, cheaply: enough to tell a resume that its data changed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

HEAD_BYTES = 1 << 20  # the head of a file that is hashed: 1 MiB


def file_fingerprint(path: str | Path) -> list:
    """``[size, mtime_ns, sha256 of the first MiB]`` of a file."""
    path = Path(path)
    stat = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(HEAD_BYTES)).hexdigest()[:16]
    return [stat.st_size, stat.st_mtime_ns, head]


def data_fingerprint(data_cfg: DictConfig) -> dict[str, Any]:
    """Per source: data files by size, mtime and the hash of their head; a saved ``datasets`` folder
    by ``datasets``' own fingerprints (its ``state.json`` files); a Hub dataset by its id and subset;
    easy-VQA by the package's version. A mixture: each source's, by name."""
    from idefics2_ft.data.mixture import source_configs

    sources = source_configs(data_cfg)
    if len(sources) > 1:
        return {s.name: _fingerprint(s.cfg) for s in sources}
    return _fingerprint(data_cfg)


def _fingerprint(d: DictConfig) -> dict[str, Any]:
    if d.source == "jsonl":
        return {
            key: file_fingerprint(d[key]) for key in ("train_file", "val_file") if d[key] and Path(d[key]).is_file()
        }
    if d.source == "easyvqa":
        from importlib.metadata import version

        return {"easy-vqa": version("easy-vqa")}
    folder = Path(d.path) if d.path else None
    if folder is not None and folder.is_file():
        return {folder.name: file_fingerprint(folder)}
    if folder is not None and folder.is_dir() and not any(folder.rglob("state.json")):  # a folder of data files
        return {str(p.relative_to(folder)): file_fingerprint(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    if folder is not None and folder.is_dir():
        states = sorted(folder.rglob("state.json"))
        return {str(p.parent.relative_to(folder)) or ".": json.loads(p.read_text()).get("_fingerprint") for p in states}
    return {"hub": d.path, "subset": d.subset}
