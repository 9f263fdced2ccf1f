"""The DataModule: rows -> RecordDataset -> collators -> DataLoaders."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from typing import Any

import lightning as L
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from idefics2_ft.data.collator import Idefics2Collator
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.grouping import GroupedBatchSampler, index_stream, record_shapes, sort_keys
from idefics2_ft.data.images import pictures_per_image
from idefics2_ft.data.records import BadSample, DataError
from idefics2_ft.data.sources import build_rows

log = logging.getLogger(__name__)


class ResumableSampler(Sampler[int]):
    """Shuffled indices for a whole run, reproducible from the seed, that can start part-way.

    ``num_samples`` indices are drawn epoch after epoch (a new permutation each epoch, seeded by
    ``seed + epoch``), sharded round-robin across ``num_replicas``. ``start`` skips what a resumed
    run already consumed, so a resumed run sees exactly the batches the uninterrupted one would.
    """

    def __init__(
        self, dataset_len: int, num_samples: int, seed: int, rank: int = 0, num_replicas: int = 1, start: int = 0
    ) -> None:
        self.dataset_len, self.num_samples, self.seed = dataset_len, num_samples, seed
        self.rank, self.num_replicas, self.start = rank, num_replicas, start

    def __iter__(self) -> Iterator[int]:
        stream = index_stream(self.dataset_len, self.seed)
        for i in range(self.num_samples * self.num_replicas):
            index = next(stream)
            if i % self.num_replicas == self.rank and i // self.num_replicas >= self.start:
                yield index

    def __len__(self) -> int:
        # The whole run's length, also on resume: Lightning restores its batch index within the
        # epoch and would end the epoch early (and start over) if the length shrank.
        return self.num_samples


class ValCollator:
    """Validation batches: right-padded inputs for ``val/loss`` and left-padded prompts to generate from."""

    def __init__(self, processor: Any, max_length: int | None, on_bad_sample: str) -> None:
        # the loss of a truncated answer is still a loss: measured, not skipped
        self.loss = Idefics2Collator(
            processor, max_length, "right", on_bad_sample=on_bad_sample, train_on_truncated=True
        )
        self.gen = Idefics2Collator(
            processor, max_length, "left", add_generation_prompt=True, on_bad_sample=on_bad_sample
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
            ids=[r.get("id") for r in ok],
        )
        return batch


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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = RecordDataset(build_rows(self.cfg, "train"), self.cfg.max_train_samples)
            crops = pictures_per_image(self.cfg.do_image_splitting)
            per_crop = self.processor.image_seq_len
            log.info(
                "Images: longest edge %d px, splitting %s -> %d image tokens per image (%d crop(s) of %d).",
                *(self.cfg.longest_edge, "on" if crops > 1 else "off", crops * per_crop, crops, per_crop),
            )
            if self.cfg.group_by != "none":
                rows = [self.train_set.row(i) for i in range(len(self.train_set))]
                shapes = record_shapes(rows, self.train_collator(), self.cfg.longest_edge, self.cfg.shortest_edge)
                self.train_keys = sort_keys(shapes, self.cfg.group_by, self.cfg.longest_edge)
        if self.val_set is None:
            self.val_set = RecordDataset(build_rows(self.cfg, "val"), self.cfg.max_val_samples)
            self._check_val_is_not_train()

    def _check_val_is_not_train(self) -> None:
        """A saved dataset with one split serves both sets: validation would score the training data."""
        rows = self.val_set.rows
        self.val_is_train = bool(getattr(rows, "single_split", False)) and self.cfg.source == "hub"
        if not self.val_is_train:
            return
        message = (
            f"data.path={self.cfg.path} holds one split, so validation reads the training records: its metrics "
            "measure memorisation. Save a DatasetDict with a validation split (or use data=jsonl with "
            "data.val_file)."
        )
        if self.cfg.on_bad_sample == "raise":
            raise DataError(message)
        log.warning("%s It is recorded as data/val_is_train=1 in metrics.json.", message)

    def first_batch(self) -> dict[str, Any]:
        """The first ``batch_size`` training records collated, to fail before any weight loads.

        Raises:
            DataError: every one of them is bad (or the first bad one, with ``on_bad_sample=raise``).
        """
        records = [self.train_set[i] for i in range(min(self.cfg.batch_size, len(self.train_set)))]
        batch = self.train_collator()(records)
        if "input_ids" not in batch:
            bad = batch["bad_samples"]
            kinds = sorted({b.kind for b in bad})
            raise DataError(
                f"The first {len(bad)} training records are all bad ({', '.join(kinds)}); the first, "
                f"{bad[0].where()}: {bad[0].reason}"
            )
        return batch

    def train_collator(self) -> Idefics2Collator:
        c = self.cfg
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
        if self.train_keys is not None:
            batch_sampler = GroupedBatchSampler(
                self.train_keys, size, batches, seed=self.seed, rank=rank, num_replicas=world, start=consumed
            )
            return self._loader(self.train_set, self.train_collator(), batch_sampler=batch_sampler)
        sampler = ResumableSampler(
            len(self.train_set), batches * size, seed=self.seed, rank=rank, num_replicas=world, start=consumed * size
        )
        return self._loader(self.train_set, self.train_collator(), batch_size=size, sampler=sampler)

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
        collate = ValCollator(self.processor, self.cfg.max_length, self.cfg.on_bad_sample)
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
