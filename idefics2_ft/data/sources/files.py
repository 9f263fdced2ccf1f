"""JSON Lines and JSON files (a JSON array, as LLaVA ships), read row by row in any format.

A JSONL file is indexed by line offsets and each line parsed when read, so a large file costs
its index, not its parsed rows; a JSON array is parsed whole (convert a very large one to JSONL
or parquet). Image paths are relative to ``data.image_dir``, or else to the file's folder.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from idefics2_ft.data.formats import SAMPLE_ROWS, ImagePaths, chosen_format, row_options, signature, to_row
from idefics2_ft.data.records import DataError, Row

JSON_SUFFIXES = (".jsonl", ".json")


def read_file(path: str, data_cfg: Any) -> Sequence[Row]:
    """One data file: JSON Lines or JSON read row by row, parquet (and CSV) through ``datasets``."""
    from omegaconf import OmegaConf

    from idefics2_ft.data.sources.table import TableRows

    if not Path(path).is_file():
        raise DataError(f"{path}: no such file.")
    if Path(path).suffix.lower() in JSON_SUFFIXES:
        return JsonRows(path, data_cfg)
    return TableRows(OmegaConf.merge(data_cfg, {"path": path}), "train")


class JsonRows(Sequence):
    """The rows of one ``.jsonl`` / ``.json`` file, converted by format (detected from the first rows)."""

    def __init__(self, path: str | Path, cfg: Any) -> None:
        self.path = str(path)
        self.cfg = cfg
        self.paths = ImagePaths(cfg.get("image_dir") or Path(path).resolve().parent)
        self.items: list | None = None
        self.offsets: np.ndarray | None = None
        self.line_numbers: np.ndarray | None = None
        if _is_json_array(self.path):
            self.items = _read_array(self.path)
        else:
            self.offsets, self.line_numbers = _index_lines(self.path)
        sample = [self._item(i) for i in range(min(SAMPLE_ROWS, len(self)))]
        columns = sorted({key for item in sample for key in item})
        self.format = chosen_format(cfg, columns, sample, self.path)
        self.expected = signature(self.format, columns)
        self.options = row_options(cfg)
        self.single_split = False

    def __len__(self) -> int:
        return len(self.items) if self.items is not None else len(self.offsets)

    def _where(self, index: int) -> str:
        if self.items is not None:
            return f"{self.path} item {index}"
        return f"{self.path}:{int(self.line_numbers[index])}"

    def _item(self, index: int) -> dict:
        if self.items is not None:
            item = self.items[index]
        else:
            line_no = int(self.line_numbers[index])
            with open(self.path, "rb") as f:
                f.seek(int(self.offsets[index]))
                raw = f.readline()
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM, as some editors write
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{self.path}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the file as UTF-8."
                ) from err
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{self.path}:{line_no}: not valid JSON ({err.msg}).") from err
        if not isinstance(item, dict):
            raise DataError(f"{self._where(index)}: a row is a JSON object, not {type(item).__name__}.")
        return item

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        fallback_id = index if self.items is not None else int(self.line_numbers[index])
        return to_row(
            self._item(index), self.format, self.options, self._where(index), self.paths, fallback_id, self.expected
        )


def _is_json_array(path: str) -> bool:
    """A file whose first non-blank character is ``[`` (JSON), not ``{`` (JSON Lines)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _read_array(path: str) -> list:
    try:
        with open(path, encoding="utf-8-sig") as f:
            items = json.load(f)
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 (byte at {err.start}); save the file as UTF-8.") from err
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}: not valid JSON ({err.msg}).") from err
    if not isinstance(items, list):
        raise DataError(f"{path}: a JSON file holds a list of rows (or use JSON Lines, one row a line).")
    return items


def _index_lines(path: str) -> tuple[np.ndarray, np.ndarray]:
    """The byte offset and line number of every non-blank line."""
    offsets, numbers = [], []
    with open(path, "rb") as f:
        position, line_no = 0, 0
        for raw in f:
            line_no += 1
            if raw.strip():
                offsets.append(position)
                numbers.append(line_no)
            position += len(raw)
    return np.asarray(offsets, dtype=np.int64), np.asarray(numbers, dtype=np.int64)
