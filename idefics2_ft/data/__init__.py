"""Data flows one way: sources -> rows -> records -> collator -> batches.

``build_rows`` reads a source (easy-VQA, DocVQA, JSONL, any ``datasets`` dataset) into rows;
``RecordDataset`` turns rows into chat records (images opened on read); ``Idefics2Collator`` renders
the chat template, expands images and builds the -100 masks; ``Idefics2DataModule`` wires them
into resumable, rank-sharded loaders.
"""

from idefics2_ft.data.collator import (
    IGNORE_INDEX,
    BadSample,
    BadSampleError,
    Idefics2Collator,
    count_images,
    format_labels,
    message_text,
)
from idefics2_ft.data.datamodule import Idefics2DataModule, ResumableSampler
from idefics2_ft.data.sources import RecordDataset, Row, build_rows, load_image

__all__ = [
    "IGNORE_INDEX",
    "BadSample",
    "BadSampleError",
    "Idefics2Collator",
    "Idefics2DataModule",
    "RecordDataset",
    "ResumableSampler",
    "Row",
    "build_rows",
    "count_images",
    "format_labels",
    "load_image",
    "message_text",
]
