"""Rows -> records: ``RecordDataset`` opens a row's images only when the record is read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch.utils.data import Dataset

from idefics2_ft.data.images import load_image
from idefics2_ft.data.records import BadSample, Row, check_row


class RecordDataset(Dataset):
    """Rows -> records, opening images only when a record is read.

    A row that cannot be a record becomes a ``BadSample`` (the collator skips and counts it, or
    raises, by ``data.on_bad_sample``).
    """

    def __init__(self, rows: Sequence[Row], limit: int | None = None, transform: Callable | None = None) -> None:
        self.rows = rows
        self.length = len(rows) if limit is None else min(limit, len(rows))
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def row(self, index: int) -> Row:
        return self.rows[index]

    def __getitem__(self, index: int) -> dict | BadSample:
        row = self.rows[index]
        origin = row.origin or f"record {index}"
        problem = check_row(row)
        if problem:
            return BadSample(index, problem[1], problem[0], origin)
        try:
            images = [load_image(ref) for ref in row.images]
        except FileNotFoundError as err:
            return BadSample(index, f"image not found: {err.filename}", "missing_image", origin)
        except Exception as err:  # PIL raises many types for a corrupt file
            return BadSample(index, f"unreadable image: {type(err).__name__}: {err}", "unreadable_image", origin)
        return {
            "index": index,
            "origin": origin,
            "images": images,
            "messages": row.messages,
            "answers": row.answers,
            "id": row.id,
            "question_type": row.question_type,
        }
