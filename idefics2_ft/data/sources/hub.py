"""``data.source=hub``: a ``datasets`` dataset, wherever it is (``data=docvqa`` and ``data=cauldron`` are presets of it).

``data.path`` is a Hub dataset id, a ``save_to_disk`` folder, a folder of data files (``train.jsonl``,
``validation.parquet``, ...) or one data file; ``data.train_split`` / ``data.val_split`` name its splits
(or slices of one: ``train[:200]``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from idefics2_ft.data.records import DataError, Row
from idefics2_ft.data.sources.base import SourceKind
from idefics2_ft.data.sources.files import JSON_SUFFIXES, JsonRows
from idefics2_ft.data.sources.table import (
    DATA_FILE_TYPES,
    TableRows,
    no_rows_left,
    parse_split,
    stream_rows,
    subset_folder,
)


def is_hub_id(name: str | None) -> bool:
    """``org/name`` that is not a folder on disk."""
    return bool(name) and re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not Path(name).exists()


class Hub(SourceKind):
    """Any ``datasets`` dataset: rows stay in Arrow and images undecoded until read; it can be streamed."""

    name = "hub"
    about = "data.path: a Hub dataset id, a saved datasets folder, a folder of data files or one data file"
    streams = True

    def rows(self, d: Any, split_key: str) -> Sequence[Row]:
        path = Path(d.path)
        split = d[self.split_key(split_key)]
        if path.is_file() and path.suffix.lower() in JSON_SUFFIXES:
            rows = JsonRows(d.path, d)
            _, start, stop = parse_split(split)
            if start or stop is not None:  # train[200:] / train[:200]: a slice of the file's rows
                sliced = SlicedRows(rows, start, stop)
                if not len(sliced):
                    raise DataError(no_rows_left(d, split, len(rows)))
                return sliced
            rows.single_split = True  # one file serves both splits whole
            return rows
        return TableRows(d, split)

    def stream(self, d: Any, split: str, rank: int = 0, world: int = 1, seed: int | None = None) -> Iterator[Row]:
        return stream_rows(d, split, rank, world, seed)

    def for_split(self, d: Any, split: str) -> dict[str, Any]:
        from omegaconf import OmegaConf

        self.rows(OmegaConf.merge(d, {"val_split": split}), "val")  # no such split: raises, naming the ones it has
        return {"val_split": split}

    def fingerprint(self, d: Any) -> dict[str, Any]:
        """Data files by size and a hash of their content; a saved ``datasets`` folder by ``datasets``' own
        fingerprints (its ``state.json`` files); a Hub dataset by its id and subset."""
        from idefics2_ft.data.fingerprint import file_fingerprint

        folder = Path(d.path) if d.path else None
        if folder is not None and folder.is_file():
            return {folder.name: file_fingerprint(folder)}
        if folder is not None and folder.is_dir() and not any(folder.rglob("state.json")):  # a folder of data files
            try:  # a subset's own folder (The Cauldron downloaded in part): only its files are this run's data
                read, _ = subset_folder(folder, d.get("subset"))
            except DataError:
                read = folder
            files = [p for p in sorted(read.rglob("*")) if p.is_file() and p.suffix.lower() in DATA_FILE_TYPES]
            return {str(p.relative_to(folder)): file_fingerprint(p) for p in files}  # the data files, not the images
        if folder is not None and folder.is_dir():
            states = sorted(folder.rglob("state.json"))
            return {
                str(p.parent.relative_to(folder)) or ".": json.loads(p.read_text()).get("_fingerprint") for p in states
            }
        return {"hub": d.path, "subset": d.subset}

    def hub_dataset(self, d: Any) -> str | None:
        return d.path if is_hub_id(d.path) else None

    def one_split(self, rows: Sequence[Row]) -> bool:
        return bool(getattr(rows, "single_split", False))

    def problems(self, d: Any, where: str) -> list[str]:
        if not d.path:
            return [
                f"{where}.path is required with source {d.source}: a Hub dataset id, a local folder or a data file."
            ]
        return []


class SlicedRows(Sequence):
    """Rows ``start:stop`` of a file's rows (``data.train_split='train[200:]'`` on one data file)."""

    def __init__(self, rows: Sequence[Row], start: int, stop: int | None) -> None:
        self.rows, self.start = rows, min(start, len(rows))
        self.stop = len(rows) if stop is None else min(stop, len(rows))
        self.single_split = False
        self.format = getattr(rows, "format", None)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.rows[self.start + index]
