"""What a run's data is, from its content: enough to tell a resume that its data changed.

A file is known by its size and a SHA-256 of its bytes: all of them up to ``WHOLE_BYTES``; above,
``BLOCKS`` blocks of ``BLOCK_BYTES`` spread evenly from the first byte to the last. Either way at
most 4 MiB are read per file, whatever its size. Never by its modification time: the same bytes
staged again (a SLURM requeue that copies the data to local disk anew) are the same data. An edit
that keeps the size and touches no sampled block of a larger file goes unseen; an edit of a file up
to 4 MiB never does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

WHOLE_BYTES = 4 << 20  # files up to 4 MiB are hashed whole (as many bytes as the sampled blocks)
BLOCK_BYTES = 64 << 10  # above: BLOCKS blocks of 64 KiB, evenly spread, first and last included
BLOCKS = 64


def file_fingerprint(path: str | Path) -> list:
    """``[size, "sha256:<16 hex>"]`` of a file (whole), or ``[size, "sampled-sha256:<16 hex>"]`` above
    ``WHOLE_BYTES`` (``BLOCKS`` blocks)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_BYTES:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
            return [size, "sha256:" + digest.hexdigest()[:16]]
        last = size - BLOCK_BYTES
        for i in range(BLOCKS):
            f.seek(last * i // (BLOCKS - 1))
            digest.update(f.read(BLOCK_BYTES))
    return [size, "sampled-sha256:" + digest.hexdigest()[:16]]


def same_file(recorded: object, now: object) -> bool:
    """Whether two fingerprints of a file agree. One recorded by an older version
    (``[size, mtime_ns, head hash]``) is compared by size alone: it has no hash of the whole file."""
    if isinstance(recorded, list) and len(recorded) == 3 and isinstance(now, list) and len(now) == 2:
        return recorded[0] == now[0]
    return recorded == now


def data_fingerprint(data_cfg: DictConfig) -> dict[str, Any]:
    """Per source: data files by size and a hash of their content (``file_fingerprint``); a saved ``datasets`` folder
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
        from idefics2_ft.data.sources.table import DATA_FILE_TYPES

        files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix.lower() in DATA_FILE_TYPES]
        return {str(p.relative_to(folder)): file_fingerprint(p) for p in files}  # the data files, not the images
    if folder is not None and folder.is_dir():
        states = sorted(folder.rglob("state.json"))
        return {str(p.parent.relative_to(folder)) or ".": json.loads(p.read_text()).get("_fingerprint") for p in states}
    return {"hub": d.path, "subset": d.subset}
