"""Data flows one way: sources -> rows -> records -> collator -> batches.

``build_rows`` reads a source (easy-VQA, DocVQA, JSONL, any ``datasets`` dataset) into rows;
``RecordDataset`` turns rows into chat records (images opened on read); ``Idefics2Collator`` renders
the chat template, expands images and builds the -100 masks; ``Idefics2DataModule`` wires them
into resumable, rank-sharded loaders; ``GroupedBatchSampler`` (``data.group_by``) batches alike records.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it; loaded on first use, so that ``idefics2_ft.data.sources`` and
# ``idefics2_ft.data.checks`` (what ``validate`` asks before anything loads) import no torch or Lightning
_EXPORTS = {
    "IGNORE_INDEX": "collator",
    "Idefics2Collator": "collator",
    "format_labels": "collator",
    "Idefics2DataModule": "datamodule",
    "ResumableSampler": "datamodule",
    "RecordDataset": "dataset",
    "GROUP_BY": "grouping",
    "GroupedBatchSampler": "grouping",
    "RecordShape": "grouping",
    "record_shapes": "grouping",
    "sort_keys": "grouping",
    "load_image": "images",
    "pictures_per_image": "images",
    "to_rgb": "images",
    "BadSample": "records",
    "BadSampleError": "records",
    "DataError": "records",
    "Row": "records",
    "count_images": "records",
    "message_text": "records",
    "build_rows": "sources",
    "check_sources": "sources",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'idefics2_ft.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"idefics2_ft.data.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
