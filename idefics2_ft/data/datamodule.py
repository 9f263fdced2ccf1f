"""The DataModule: rows -> RecordDataset -> collators -> DataLoaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from itertools import islice
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from idefics2_ft.data.collator import Idefics2Collator
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.grouping import GroupedBatchSampler, record_shapes, row_shape, sort_keys
from idefics2_ft.data.images import pictures_per_image
from idefics2_ft.data.mixture import RecordOrder, Source, SourceRows, probabilities, source_configs
from idefics2_ft.data.records import BadSample, DataError, Row, message_text
from idefics2_ft.data.sources import build_rows, kind_of

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Shuffled indices for a whole run, reproducible from the seed, that can start part-way.

    ``num_samples`` indices are drawn epoch after epoch (a new permutation each epoch, seeded by
    ``seed + epoch``), sharded round-robin across ``num_replicas``. ``start`` skips what a resumed
    run already consumed, so a resumed run sees exactly the batches the uninterrupted one would.
    """

    def __init__(
        self,
        dataset_len: int,
        num_samples: int,
        seed: int,
        rank: int = 0,
        num_replicas: int = 1,
        start: int = 0,
        order: RecordOrder | None = None,
    ) -> None:
        self.dataset_len, self.num_samples, self.seed = dataset_len, num_samples, seed
        self.rank, self.num_replicas, self.start = rank, num_replicas, start
        self.order = order  # a mixture's draws; None: a permutation of the records each epoch

    def __iter__(self) -> Iterator[int]:
        order = self.order if self.order is not None else RecordOrder([self.dataset_len], seed=self.seed)
        stream = order.stream()
        for i in range(self.num_samples * self.num_replicas):
            index = next(stream)
            if i % self.num_replicas == self.rank and i // self.num_replicas >= self.start:
                yield index

    def __len__(self) -> int:
        # The whole run's length, also on resume: Lightning restores its batch index within the
        # epoch and would end the epoch early (and start over) if the length shrank.
        return self.num_samples


STREAM_VAL_ROWS = 1000  # validation records read from a streamed source without data.max_val_samples


class ValCollator:
    """Validation batches: right-padded inputs for ``val/loss`` and left-padded prompts to generate from."""

    def __init__(self, processor: Any, max_length: int | None, on_bad_sample: str, generation_prefix: str = "") -> None:
        # the loss of a truncated answer is still a loss: measured, not skipped
        self.loss = Idefics2Collator(
            processor, max_length, "right", on_bad_sample=on_bad_sample, train_on_truncated=True
        )
        self.gen = Idefics2Collator(
            processor,
            max_length,
            "left",
            add_generation_prompt=True,
            on_bad_sample=on_bad_sample,
            generation_prefix=generation_prefix,
        )

    def __call__(self, records: list) -> dict:
        good = [r for r in records if not isinstance(r, BadSample)]
        loss = self.loss(records)
        batch: dict[str, Any] = {"bad_samples": loss.pop("bad_samples")}
        ok = [r for r in good if not any(b.index == r["index"] for b in batch["bad_samples"])]
        if not ok:
            return batch
        gen = self.gen(ok)
        gen.pop("bad_samples")
        batch.update(
            loss_inputs=loss,
            gen_inputs=gen,
            answers=[r["answers"] for r in ok],
            question_types=[r.get("question_type") for r in ok],
            ids=[r.get("id") for r in ok],  # the data's own: several questions may share one
            keys=[r["index"] for r in ok],  # the record's index in the validation set: unique
            sources=[r.get("source") for r in ok],
            questions=[question_of(r["messages"]) for r in ok],
        )
        return batch


def question_of(messages: list[dict]) -> str:
    """The text of the last user turn (a multiple-choice question lists its options there)."""
    users = [m for m in messages if m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


class Idefics2DataModule(L.LightningDataModule):
    """Train / validation data for one config. The processor is built outside and injected."""

    def __init__(self, data_cfg: DictConfig, processor: Any, seed: int = 0, max_steps: int = 1000, accumulate: int = 1):
        super().__init__()
        self.cfg, self.processor = data_cfg, processor
        # what the resumable sampler needs to lay out (and skip into) the whole run's batches
        self.seed, self.max_steps, self.accumulate = seed, max_steps, accumulate
        self.val_is_train = False
        self.train_set: RecordDataset | None = None
        self.val_set: RecordDataset | None = None
        self.train_keys: list[tuple] | None = None  # data.group_by's sort key per training record
        self.sources: list[Source] = source_configs(data_cfg)
        self.order: RecordOrder | None = None  # a mixture's draws (None: one source)
        self.probs: list[float] = [1.0]
        self.train_stream: list[float] | None = None  # data.streaming: the sources' probabilities
        self.generation_prefix = ""  # an evaluation preset's prefill after "Assistant:" (presets.Preset.prefill)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and self.train_stream is None and stage in (None, "fit"):
            crops = pictures_per_image(self.cfg.do_image_splitting)
            per_crop = self.processor.image_seq_len
            log.info(
                "Images: longest edge %d px, splitting %s -> %d image tokens per image (%d crop(s) of %d).",
                *(self.cfg.longest_edge, "on" if crops > 1 else "off", crops * per_crop, crops, per_crop),
            )
            if self.cfg.streaming:
                self.train_stream = self._stream_probs()
            else:
                self._setup_train()
        if self.val_set is None:
            self.val_set = RecordDataset(*self._val_rows())
            self._check_val_is_not_train()

    def _setup_train(self) -> None:
        if len(self.sources) == 1:
            self.train_set = RecordDataset(build_rows(self.cfg, "train"), self.cfg.max_train_samples)
        else:
            parts = [(s.name, build_rows(s.cfg, "train"), s.cfg.max_train_samples) for s in self.sources]
            rows = SourceRows(parts)
            empty = [s.name for s, n in zip(self.sources, rows.sizes, strict=True) if n == 0]
            if empty:
                raise DataError(
                    f"data.mixture source(s) {empty}: no training records (check the split and max_samples)."
                )
            self.probs = probabilities(self.sources, rows.sizes)
            self.order = RecordOrder(rows.sizes, self.probs, self.seed)
            self.train_set = RecordDataset(rows)
            log.info(
                "Mixture: %s.",
                "; ".join(
                    f"{s.name} {n:,} records, p={p:.3f}"
                    for s, n, p in zip(self.sources, rows.sizes, self.probs, strict=True)
                ),
            )
        if self.cfg.group_by != "none":
            rows = [self.train_set.row(i) for i in range(len(self.train_set))]
            shapes = record_shapes(rows, self.train_collator(), self.cfg.longest_edge, self.cfg.shortest_edge)
            self.train_keys = sort_keys(shapes, self.cfg.group_by, self.cfg.longest_edge)

    def _stream_probs(self) -> list[float]:
        """A streamed mixture's probabilities: the weights, and an equal share of what they leave for the
        sources without one (a stream's size is unknown)."""
        from idefics2_ft.data.streaming import log_shuffle

        log_shuffle(self.cfg)
        probs = probabilities(self.sources, [1] * len(self.sources))
        log.info(
            "Streaming: %s.",
            "; ".join(f"{s.name or s.cfg.path} p={p:.3f}" for s, p in zip(self.sources, probs, strict=True)),
        )
        return probs

    def _val_rows(self):
        parts = []
        for s in self.sources:
            limit = s.cfg.max_val_samples
            if s.cfg.streaming:
                from itertools import islice

                limit = limit or STREAM_VAL_ROWS
                rows: list[Row] = list(islice(kind_of(s.cfg).stream(s.cfg, s.cfg.val_split), limit))
                parts.append((s.name, rows, None))
            else:
                parts.append((s.name, build_rows(s.cfg, "val"), limit))
        if len(parts) == 1 and parts[0][0] is None:
            return parts[0][1], parts[0][2]
        return SourceRows(parts, interleaved=True), None

    def _check_val_is_not_train(self) -> None:
        """A saved dataset with one split serves both sets: validation would score the training data."""
        rows = self.val_set.rows
        parts = rows.parts if isinstance(rows, SourceRows) else [rows]
        names = rows.names if isinstance(rows, SourceRows) else [None]
        same = [
            name or self.cfg.path
            for name, part, source in zip(names, parts, self.sources, strict=True)
            if kind_of(source.cfg).one_split(part)
        ]
        self.val_is_train = bool(same)
        if not self.val_is_train:
            return
        message = (
            f"{', '.join(map(str, same))}: data.path holds one split, so validation reads the training records: "
            "its metrics measure memorisation. Save a DatasetDict with a validation split, hold rows out with "
            "data.train_split='train[200:]' data.val_split='train[:200]', or use data=jsonl with data.val_file."
        )
        if self.cfg.on_bad_sample == "raise":
            raise DataError(message)
        log.warning("%s It is recorded as data/val_is_train=1 in metrics.json.", message)

    def first_batch(self) -> dict[str, Any]:
        """The first ``batch_size`` training records collated, to fail before any weight loads.

        Raises:
            DataError: every one of them is bad (or the first bad one, with ``on_bad_sample=raise``).
        """
        if self.train_stream is not None:
            records = next(iter(self._stream_batches(rank=0, world=1, batches=1, start=0)))
        else:
            records = [self.train_set[i] for i in range(min(self.cfg.batch_size, len(self.train_set)))]
        batch = self.train_collator()(records)
        if "input_ids" not in batch and "chosen_input_ids" not in batch:
            bad = batch["bad_samples"]
            kinds = sorted({b.kind for b in bad})
            raise DataError(
                f"The first {len(bad)} training records are all bad ({', '.join(kinds)}); the first, "
                f"{bad[0].where()}: {bad[0].reason}"
            )
        return batch

    def train_collator(self) -> Idefics2Collator:
        c = self.cfg
        if c.get("pairs", False):  # objective=dpo: batches of pairs, each picture once per pair
            from idefics2_ft.data.pairs import PairCollator

            return PairCollator(self.processor, c.max_length, on_bad_sample=c.on_bad_sample)
        return Idefics2Collator(
            self.processor,
            c.max_length,
            "right",
            on_bad_sample=c.on_bad_sample,
            train_on_truncated=c.train_on_truncated,
        )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = self.max_steps * self.accumulate
        # On resume the trainer's step is already restored: skip what the first run consumed.
        consumed = trainer.global_step * self.accumulate if trainer is not None else 0
        size = self.cfg.batch_size
        if self.train_stream is not None:
            stream = self._stream_batches(rank, world, batches, consumed)
            # read in this process: datasets shards a stream across loader workers by itself, which
            # would break the exact order a resume relies on
            return DataLoader(stream, batch_size=None, collate_fn=self.train_collator(), num_workers=0)
        if self.train_keys is not None:
            batch_sampler = GroupedBatchSampler(
                self.train_keys,
                size,
                batches,
                seed=self.seed,
                rank=rank,
                num_replicas=world,
                start=consumed,
                order=self.order,
            )
            return self._loader(self.train_set, self.train_collator(), batch_sampler=batch_sampler)
        sampler = ResumableSampler(
            len(self.train_set),
            batches * size,
            seed=self.seed,
            rank=rank,
            num_replicas=world,
            start=consumed * size,
            order=self.order,
        )
        return self._loader(self.train_set, self.train_collator(), batch_size=size, sampler=sampler)

    def samples_per_source(self, batches: int, world: int = 1) -> dict[str, int]:
        """How many records each source of a mixture gave to the first ``batches`` batches of every
        rank (bad ones included: they are counted by kind besides). Computed from the draws, which
        are a pure function of the seed, so it holds across resumes and ranks. A streamed mixture
        counts each draw of the sources (grouping reorders them within a buffer: the counts are then
        those of the draws read, not the batches trained, to within one buffer)."""
        if len(self.sources) < 2:
            return {}
        names = [s.name for s in self.sources]
        counts = dict.fromkeys(names, 0)
        size = self.cfg.batch_size
        if self.train_stream is not None:
            from idefics2_ft.data.streaming import source_picks

            for s in islice(source_picks(self.train_stream, self.seed), batches * size):
                counts[names[s]] += world  # every rank draws its own part of each source alike
            return counts
        rows = self.train_set.rows
        if self.train_keys is not None:
            sampler = GroupedBatchSampler(self.train_keys, size, batches, self.seed, 0, world, order=self.order)
            drawn = (i for batch in islice(sampler.global_batches(), batches) for i in batch)
        else:
            drawn = islice(self.order.stream(), batches * size * world)
        for index in drawn:
            counts[names[rows.locate(index)[0]]] += 1
        return counts

    def _stream_batches(self, rank: int, world: int, batches: int, start: int):
        from idefics2_ft.data.streaming import StreamBatches

        c = self.cfg
        sort_key = None
        if c.group_by != "none":
            collator = self.train_collator()

            def sort_key(row: Row) -> tuple:
                return sort_keys(
                    [row_shape(row, collator, c.longest_edge, c.shortest_edge)], c.group_by, c.longest_edge
                )[0]

        return StreamBatches(
            self.sources,
            self.train_stream,
            c.batch_size,
            batches,
            self.seed,
            rank=rank,
            world=world,
            start=start,
            sort_key=sort_key,
            buffer_size=c.buffer_size,
        )

    def _loader(self, dataset, collate_fn, **sampling) -> DataLoader:
        """A DataLoader with the machine's defaults: ``data.num_workers`` (null: ``default_workers``),
        workers kept between passes, and pinned memory when training on CUDA."""
        workers = default_workers(self.trainer) if self.cfg.num_workers is None else self.cfg.num_workers
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        return DataLoader(
            dataset,
            collate_fn=collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=on_gpu,
            **sampling,
        )

    def val_dataloader(self) -> DataLoader:
        from torch.utils.data.distributed import DistributedSampler

        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                self.val_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        if self.cfg.get("pairs", False):  # held-out pairs: the same batches as training's
            collate = self.train_collator()
            if sampler is not None and len(self.val_set) >= trainer.world_size:
                # Each pair once: DistributedSampler would pad the last batches with pairs another rank
                # scores too, and the means over all ranks (PreferenceModule) would count them twice.
                # Its validation step runs no collective, so the ranks may hold one pair more or less.
                sampler = range(trainer.global_rank, len(self.val_set), trainer.world_size)
        else:
            collate = ValCollator(self.processor, self.cfg.max_length, self.cfg.on_bad_sample, self.generation_prefix)
        return self._loader(self.val_set, collate, batch_size=self.cfg.eval_batch_size, sampler=sampler, shuffle=False)


def default_workers(trainer: L.Trainer | None) -> int:
    """Loader workers when there are cores to spare: on a GPU, up to 4 per rank, leaving the rank's
    own process a core; on the CPU none (the step's own threads use every core, and a worker would
    take them from it)."""
    if trainer is None or trainer.strategy.root_device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cores // max(trainer.num_devices, 1)
    return max(0, min(4, per_rank - 1))
