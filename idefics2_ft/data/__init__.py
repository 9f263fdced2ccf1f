"""Data flows one way: sources -> rows -> records -> collator -> batches.

``build_rows`` reads a source (easy-VQA, DocVQA, JSONL, any ``datasets`` dataset) into rows;
``RecordDataset`` turns rows into chat records (images opened on read); ``Idefics2Collator`` renders
the chat template, expands images and builds the -100 masks; ``Idefics2DataModule`` wires them
into resumable, rank-sharded loaders; ``GroupedBatchSampler`` (``data.group_by``) batches alike records.
"""

from idefics2_ft.data.collator import IGNORE_INDEX, Idefics2Collator, format_labels
from idefics2_ft.data.datamodule import Idefics2DataModule, ResumableSampler
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.grouping import GROUP_BY, GroupedBatchSampler, RecordShape, record_shapes, sort_keys
from idefics2_ft.data.images import load_image, pictures_per_image, to_rgb
from idefics2_ft.data.records import BadSample, BadSampleError, DataError, Row, count_images, message_text
from idefics2_ft.data.sources import build_rows, check_sources

__all__ = [
    "GROUP_BY",
    "GroupedBatchSampler",
    "RecordShape",
    "record_shapes",
    "sort_keys",
    "IGNORE_INDEX",
    "BadSample",
    "BadSampleError",
    "DataError",
    "Idefics2Collator",
    "Idefics2DataModule",
    "RecordDataset",
    "ResumableSampler",
    "Row",
    "build_rows",
    "check_sources",
    "count_images",
    "format_labels",
    "load_image",
    "message_text",
    "pictures_per_image",
    "to_rgb",
]
