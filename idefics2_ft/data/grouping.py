"""Batches of records that cost alike: ``data.group_by=none|length|aspect``.

Why and how: ``docs/speed.md#how-datagroup_by-batches-records``.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from types import SimpleNamespace
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Sampler

from idefics2_ft.data.mixture import RecordOrder, epoch_permutations
from idefics2_ft.data.records import Row, check_row

log = logging.getLogger(__name__)

GROUP_BY = ("none", "length", "aspect")
POOL = 64  # batches' worth of records sorted together, then shuffled as batches


def index_stream(n: int, seed: int) -> Iterator[int]:
    """Dataset indices epoch after epoch, each epoch a new permutation seeded by ``seed + epoch``."""
    return chain.from_iterable(epoch_permutations(n, seed))


@dataclass(frozen=True)
class RecordShape:
    """What one record costs in a batch, known without decoding its images."""

    tokens: int  # text and image tokens, as the collator builds them
    images: int
    height: int  # the tallest and the widest of its images after resizing (0 without images)
    width: int


def resized_size(width: int, height: int, longest_edge: int, shortest_edge: int) -> tuple[int, int]:
    """``(height, width)`` after the Idefics2 image processor's resize (longest edge capped, then
    both edges at least ``shortest_edge``): the processor's own arithmetic, on the size alone."""
    from transformers.image_utils import SizeDict
    from transformers.models.idefics2.image_processing_pil_idefics2 import get_resize_output_image_size

    shape_only = SimpleNamespace(shape=(height, width))  # it reads nothing but image.shape[-2:]
    return get_resize_output_image_size(shape_only, SizeDict(shortest_edge=shortest_edge, longest_edge=longest_edge))


def image_size(ref: Any) -> tuple[int, int] | None:
    """``(width, height)`` of an image reference from its header alone; None if it cannot be read."""
    try:
        if isinstance(ref, Image.Image):
            return ref.size
        if isinstance(ref, dict):
            ref = ref.get("bytes") or ref.get("path")
        if isinstance(ref, (bytes, bytearray)):
            ref = io.BytesIO(ref)
        with Image.open(ref) as image:  # reads the header; pixels stay on disk
            return image.size
    except Exception:  # a bad image is skipped by the collator later; here it only sorts first
        return None


def row_shape(row: Row, collator: Any, longest_edge: int, shortest_edge: int) -> RecordShape:
    """One row's shape: its tokens as ``collator`` encodes it, its image sizes from their headers;
    zeros for a row the collator would skip."""
    encoded = None if check_row(row) else collator.encode({"messages": row.messages, "images": row.images})
    if not isinstance(encoded, dict):
        return RecordShape(0, 0, 0, 0)
    sizes = [s for s in (image_size(ref) for ref in encoded["images"]) if s is not None]
    dims = [resized_size(w, h, longest_edge, shortest_edge) for w, h in sizes]
    return RecordShape(
        tokens=len(encoded["input_ids"]),
        images=len(encoded["images"]),
        height=max((h for h, _ in dims), default=0),
        width=max((w for _, w in dims), default=0),
    )


def record_shapes(rows: Sequence[Row], collator: Any, longest_edge: int, shortest_edge: int) -> list[RecordShape]:
    """The shape of every row (``row_shape``), with a progress line every 30 s on long reads."""
    shapes, started, last = [], time.perf_counter(), time.perf_counter()
    for i in range(len(rows)):
        shapes.append(row_shape(rows[i], collator, longest_edge, shortest_edge))
        if time.perf_counter() - last > 30:
            last = time.perf_counter()
            log.info("Measuring records for data.group_by: %d/%d", i + 1, len(rows))
    log.info("Measured %d records for data.group_by in %.1f s.", len(rows), time.perf_counter() - started)
    return shapes


def sort_keys(shapes: Sequence[RecordShape], group_by: str, longest_edge: int) -> list[tuple[int, ...]]:
    """The key each record is sorted by within a pool."""
    if group_by == "length":
        return [(s.tokens,) for s in shapes]
    if group_by == "aspect":
        step = max(longest_edge // 8, 1)  # sizes within an eighth of the longest edge pad little
        return [(s.images, round(s.height / step), round(s.width / step), s.tokens) for s in shapes]
    raise ValueError(f"data.group_by={group_by!r}: use one of {', '.join(GROUP_BY)}.")


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches of alike records for a whole run, reproducible from the seed, that can start part-way.

    The records of a global batch (``batch_size`` x ``num_replicas``) are alike, and rank ``r`` takes
    its ``r``-th slice: ranks stay balanced (DDP waits for the slowest), see disjoint records, and
    together see what one process with the global batch sees.

    Args:
        keys: one sort key per record (``sort_keys``).
        batch_size: records per batch on one rank.
        num_batches: batches per rank for the whole run.
        seed: each epoch's permutation is seeded by ``seed + epoch`` (as ``ResumableSampler``'s).
        rank, num_replicas: this rank and the world size.
        start: batches already consumed (a resumed run skips them).
        pool: global batches' worth of records sorted together.
        order: the records' draws epoch after epoch (a mixture's, ``RecordOrder``); None: a new
            permutation of all of them each epoch.
    """

    def __init__(
        self,
        keys: Sequence[tuple],
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int = 0,
        num_replicas: int = 1,
        start: int = 0,
        pool: int = POOL,
        order: Any = None,
    ) -> None:
        self.keys, self.batch_size, self.num_batches, self.seed = list(keys), batch_size, num_batches, seed
        self.rank, self.num_replicas, self.start, self.pool = rank, num_replicas, start, pool
        self.order = order

    def global_batches(self) -> Iterator[list[int]]:
        """The global batches, in order: each epoch's records (a new permutation) in pools sorted by
        key, cut into batches, shuffled. Records that do not fill a last batch open the next epoch."""
        size = self.batch_size * self.num_replicas
        carried: list[int] = []
        pool_no = 0
        order = self.order if self.order is not None else RecordOrder([len(self.keys)], seed=self.seed)
        epochs = order.epochs()
        for drawn in epochs:
            records = carried + drawn
            whole = len(records) - len(records) % size
            records, carried = records[:whole], records[whole:]
            for start in range(0, whole, self.pool * size):
                pool = sorted(records[start : start + self.pool * size], key=self.keys.__getitem__)  # stable
                batches = [pool[k : k + size] for k in range(0, len(pool), size)]
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + pool_no)
                yield from (batches[i] for i in torch.randperm(len(batches), generator=generator).tolist())
                pool_no += 1

    def __iter__(self) -> Iterator[list[int]]:
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for batch in islice(self.global_batches(), self.start, self.num_batches):
            yield batch[mine]

    def __len__(self) -> int:
        # the whole run's length, also on resume (as ResumableSampler's)
        return self.num_batches
