"""``data.streaming=true``: read sources as streams (``datasets.IterableDataset``), nothing downloaded whole.

Each rank reads its own part of every stream (``datasets.distributed.split_dataset_by_node``);
``data.buffer_size`` records (1,000 unless set) are shuffled together (``datasets``' shuffle buffer,
reshuffled each epoch) and, with ``data.group_by``, sorted and cut into batches together;
``data.buffer_size=null`` reads a stream in its stored order, with a warning. The batches are a
pure function of the seed, so a resumed run reads past what it had consumed and goes on exactly
where the first run stopped (reading again what it skips, without decoding its images). How:
``docs/your-data.md#streaming``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import Any

import torch
from torch.utils.data import IterableDataset

from idefics2_ft.data.dataset import row_to_record
from idefics2_ft.data.mixture import Source
from idefics2_ft.data.records import Row
from idefics2_ft.data.sources import kind_of
from idefics2_ft.data.sources.table import stream_rows  # noqa: F401 (the Hub kind's stream, still importable from here)

log = logging.getLogger(__name__)


def log_shuffle(cfg: Any) -> None:
    """Say how a streamed training set is shuffled: within ``data.buffer_size`` records, or not at all."""
    if cfg.buffer_size:
        log.info(
            "Streaming: each stream is shuffled within a buffer of %s records (datasets' shuffle buffer, "
            "reshuffled each epoch from the seed; data.buffer_size sets it).",
            f"{cfg.buffer_size:,}",
        )
    else:
        log.warning(
            "Streaming: data.buffer_size=null: each stream trains in its stored order, unshuffled (a file "
            "sorted by class trains class after class, whatever the seed). Set data.buffer_size=1000 to shuffle."
        )


def source_picks(probs: Sequence[float], seed: int) -> Iterator[int]:
    """The source each draw of a streamed mixture takes, by ``probs``, from ``seed`` (the same on every rank)."""
    chooser = torch.Generator().manual_seed(seed)
    weights = torch.tensor(list(probs), dtype=torch.float64)
    while True:
        yield from torch.multinomial(weights, 1024, replacement=True, generator=chooser).tolist()


class StreamBatches(IterableDataset):
    """This rank's training batches (lists of records) from streamed sources, from batch ``start`` on.

    Args:
        sources: the streamed sources, with ``probs`` their sampling probabilities.
        batch_size: records per batch.
        num_batches: batches of the whole run on this rank.
        seed: shuffles, the source each draw takes, and the batch order within a buffer.
        rank, world: this rank's part of each stream.
        start: batches already consumed (a resumed run skips them without decoding their images).
        sort_key: ``row -> key`` with ``data.group_by``: each ``buffer_size`` rows are sorted by it
            and cut into batches, in a shuffled order.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        probs: Sequence[float],
        batch_size: int,
        num_batches: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        start: int = 0,
        sort_key: Callable[[Row], tuple] | None = None,
        buffer_size: int | None = None,
    ) -> None:
        self.sources, self.probs = list(sources), list(probs)
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self.rank, self.world, self.start = rank, world, start
        self.sort_key, self.buffer_size = sort_key, buffer_size

    def rows(self) -> Iterator[Row]:
        """The mixture's rows: each draw a source by its probability (one source: its stream)."""
        streams = [
            kind_of(s.cfg).stream(s.cfg, s.cfg.train_split, self.rank, self.world, seed=self.seed + 7919 * i)
            for i, s in enumerate(self.sources)
        ]
        if len(streams) == 1:
            for row in streams[0]:
                row.source = self.sources[0].name
                yield row
        for s in source_picks(self.probs, self.seed):
            row = next(streams[s])
            row.source = self.sources[s].name
            yield row

    def row_batches(self) -> Iterator[list[Row]]:
        size = self.batch_size
        rows = self.rows()
        if self.sort_key is None:
            while True:
                yield list(islice(rows, size))
        carried: list[Row] = []
        window = 0
        while True:
            pool = carried + list(islice(rows, self.buffer_size))
            whole = len(pool) - len(pool) % size
            pool, carried = sorted(pool[:whole], key=self.sort_key), pool[whole:]
            batches = [pool[k : k + size] for k in range(0, whole, size)]
            order = torch.randperm(
                len(batches), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + window)
            )
            yield from (batches[i] for i in order.tolist())
            window += 1

    def __iter__(self) -> Iterator[list]:
        n = self.start * self.batch_size
        for batch in islice(self.row_batches(), self.start, self.num_batches):
            records = []
            for row in batch:
                records.append(row_to_record(row, n))
                n += 1
            yield records

    def __len__(self) -> int:
        return self.num_batches
