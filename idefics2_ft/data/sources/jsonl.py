"""``data.source=jsonl``: a training file and a validation file (JSON Lines, JSON or parquet, any format)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from idefics2_ft.data.records import DataError, Row
from idefics2_ft.data.sources.base import SourceKind
from idefics2_ft.data.sources.files import read_file


class Jsonl(SourceKind):
    """The splits are files: ``data.train_file`` and ``data.val_file``; the split names only label them."""

    name = "jsonl"
    about = "data.train_file and data.val_file: JSON Lines, JSON or parquet files, in any format"

    def split_key(self, split_key: str) -> str:
        return "train_file" if split_key == "train" else "val_file"

    def rows(self, d: Any, split_key: str) -> Sequence[Row]:
        return read_file(d[self.split_key(split_key)], d)

    def for_split(self, d: Any, split: str) -> dict[str, Any]:
        files = {d.val_split: d.val_file, d.train_split: d.train_file}
        if split not in files:
            raise DataError(
                f"data.split={split}: a JSONL run's splits are its files ({d.val_split}: {d.val_file}, "
                f"{d.train_split}: {d.train_file}); to evaluate another file, pass data.val_file=FILE."
            )
        return {"val_split": split, "val_file": files[split]}

    def fingerprint(self, d: Any) -> dict[str, Any]:
        from idefics2_ft.data.fingerprint import file_fingerprint

        keys = ("train_file", "val_file")
        return {key: file_fingerprint(d[key]) for key in keys if d[key] and Path(d[key]).is_file()}

    def problems(self, d: Any, where: str) -> list[str]:
        problems = []
        for key in ("train_file", "val_file"):
            value = d[key]
            if value is None:
                problems.append(f"{where}.{key} is required with source jsonl: {where}.{key}=PATH.jsonl")
            elif not Path(value).is_file():
                problems.append(f"{where}.{key}={value!r}: no such file.")
        return problems
