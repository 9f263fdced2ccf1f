"""Rows -> records: ``RecordDataset`` opens a row's images only when the record is read."""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from idefics2_ft.data.images import load_image
from idefics2_ft.data.records import BadSample, Row, check_row


def row_to_record(row: Row, index: int) -> dict | BadSample:
    """A row with its images opened, or the ``BadSample`` it is (the collator skips and counts it,
    or raises, by ``data.on_bad_sample``). A pair's record also has ``rejected`` (the rejected side's
    conversation) and ``rejected_images`` (its own images opened, or None: it shows ``images``)."""
    origin = row.origin or f"record {index}"
    problem = check_row(row)
    if problem:
        return BadSample(index, problem[1], problem[0], origin, row.source)
    try:
        images = [load_image(ref) for ref in row.images]
        own = None if row.rejected_images is None else [load_image(ref) for ref in row.rejected_images]
    except FileNotFoundError as err:
        return BadSample(index, f"image not found: {err.filename}", "missing_image", origin, row.source)
    except Exception as err:  # PIL raises many types for a corrupt file
        reason = f"unreadable image: {type(err).__name__}: {err}"
        return BadSample(index, reason, "unreadable_image", origin, row.source)
    record = {
        "source": row.source,
        "index": index,
        "origin": origin,
        "images": images,
        "messages": row.messages,
        "answers": row.answers,
        "id": row.id,
        "question_type": row.question_type,
    }
    if row.rejected is not None:  # a preference pair: the rejected side, and its own images (or None)
        record.update(rejected=row.rejected, rejected_images=own)
    return record


class RecordDataset(Dataset):
    """Rows -> records, opening images only when a record is read (``row_to_record``)."""

    def __init__(self, rows: Sequence[Row], limit: int | None = None) -> None:
        self.rows = rows
        self.length = len(rows) if limit is None else min(limit, len(rows))

    def __len__(self) -> int:
        return self.length

    def row(self, index: int) -> Row:
        return self.rows[index]

    def __getitem__(self, index: int) -> dict | BadSample:
        return row_to_record(self.rows[index], index)
