"""A ``datasets`` table: a Hub dataset, a ``save_to_disk`` folder, a folder of data files, or a parquet file.

Rows stay in Arrow (memory-mapped) and images undecoded until a row is read; the row's format is detected from
the columns (``data.format=auto``) and converted by ``idefics2_ft.data.formats``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idefics2_ft.data.formats import ImagePaths, chosen_format, row_options, signature, to_row
from idefics2_ft.data.records import DataError, Row

SAMPLE_ROWS = 32
DATA_FILE_TYPES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


SPLIT_SLICE = re.compile(r"^(?P<name>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def parse_split(split: str) -> tuple[str, int, int | None]:
    """``"train[200:]"`` -> ``("train", 200, None)``: a slice of rows of a split (hold out validation rows
    from a dataset that has one split, as The Cauldron)."""
    match = SPLIT_SLICE.match(split)
    if not match:
        return split, 0, None
    stop = match["stop"]
    return match["name"], int(match["start"] or 0), int(stop) if stop else None


def _slice(dataset: Any, start: int, stop: int | None) -> Any:
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.skip(start) if start else dataset
        return dataset.take(stop - start) if stop is not None else dataset
    end = len(dataset) if stop is None else min(stop, len(dataset))
    return dataset.select(range(min(start, end), end))


def open_table(cfg: Any, split: str, streaming: bool = False) -> tuple[Any, str, bool]:
    """``(dataset, base folder for relative image paths or None, holds one split only)`` of ``data.path``.

    Raises:
        DataError: the path holds no such split (naming the ones it has) or cannot be read.
    """
    import datasets

    split, start, stop = parse_split(split)
    path = cfg.path
    folder = Path(path)
    single = False
    base = None
    if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(path)
        single = isinstance(dataset, datasets.Dataset)
        if streaming:
            dataset = (
                dataset.to_iterable_dataset() if single else {k: v.to_iterable_dataset() for k, v in dataset.items()}
            )
    elif folder.is_file():
        kind = DATA_FILE_TYPES.get(folder.suffix.lower())
        if kind is None:
            raise DataError(
                f"data.path={path}: a {folder.suffix or 'suffix-less'} file; data files are {sorted(DATA_FILE_TYPES)}."
            )
        dataset = datasets.load_dataset(kind, data_files={split: str(folder)}, split=split, streaming=streaming)
        single, base = True, folder.resolve().parent
    else:
        if folder.is_dir():
            base = folder.resolve()
        try:
            dataset = datasets.load_dataset(path, cfg.subset, streaming=streaming)
        except ValueError as err:  # a subset the dataset does not have, and kin
            raise DataError(f"data.path={path} data.subset={cfg.subset}: {str(err).splitlines()[0]}") from err
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict, dict)):
        if split not in dataset:
            raise DataError(
                f"dataset {path!r} has no split {split!r}; its splits are {sorted(dataset)}. "
                "Set data.train_split / data.val_split (or the source's own) to one of them."
            )
        dataset = dataset[split]
    if start or stop is not None:
        dataset = _slice(dataset, start, stop)
    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.decode(False)  # images stay bytes and paths until a record is read
    return dataset, base, single


class TableRows(Sequence):
    """Rows of one split of a ``datasets`` table, converted by format when read."""

    def __init__(self, cfg: Any, split: str) -> None:
        dataset, base, self.single_split = open_table(cfg, split)
        # rows as Arrow gives images as stored (bytes and path), decoded only when a record is read
        self.dataset, self.cfg = dataset.with_format("arrow"), cfg
        self.origin = f"{cfg.path}[{split}]"
        self.paths = ImagePaths(cfg.get("image_dir") or base)
        sample = self.dataset[: min(SAMPLE_ROWS, len(dataset))].to_pylist()
        self.format = chosen_format(cfg, dataset.column_names, sample, self.origin)
        self.expected = signature(self.format, dataset.column_names)
        self.options = row_options(cfg)
        if self.format == "qa":
            needed = [cfg.question_column, cfg.answer_column, cfg.image_column]
            missing = [c for c in needed if c not in dataset.column_names]
            if missing:
                raise DataError(
                    f"dataset {cfg.path!r} split {split!r} has no column(s) {missing}; it has "
                    f"{dataset.column_names}. Map them with data.question_column / data.answer_column / "
                    "data.image_column, or set data.format to one of trl, cauldron, llava."
                )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        item = self.dataset[int(index)].to_pylist()[0]
        return to_row(item, self.format, self.options, f"{self.origin} row {index}", self.paths, index, self.expected)
