"""The DataModule: rows -> RecordDataset -> collators -> DataLoaders."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Sampler

from idefics2_ft.data.collator import BadSample, DataError, Idefics2Collator
from idefics2_ft.data.sources import RecordDataset, build_rows

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

    def _stream(self) -> Iterator[int]:
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.dataset_len, generator=generator).tolist()
            epoch += 1

    def __iter__(self) -> Iterator[int]:
        stream = self._stream()
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

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None and stage in (None, "fit"):
            self.train_set = RecordDataset(build_rows(self.cfg, "train"), self.cfg.max_train_samples)
            crops = 5 if self.cfg.do_image_splitting else 1
            per_crop = self.processor.image_seq_len
            log.info(
                "Images: longest edge %d px, splitting %s -> %d image tokens per image (%d crop(s) of %d).",
                *(self.cfg.longest_edge, "on" if crops > 1 else "off", crops * per_crop, crops, per_crop),
            )
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
            raise DataError(
                f"The first {self.cfg.batch_size} training records are all bad ({batch['bad_samples'][:2]}...): "
                "check data.* paths and column names."
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
        sampler = ResumableSampler(
            len(self.train_set),
            num_samples=batches * self.cfg.batch_size,
            seed=self.seed,
            rank=rank,
            num_replicas=world,
            start=consumed * self.cfg.batch_size,
        )
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            sampler=sampler,
            collate_fn=self.train_collator(),
            num_workers=self.cfg.num_workers,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader:
        from torch.utils.data.distributed import DistributedSampler

        trainer = self.trainer
        sampler = None
        if trainer is not None and trainer.world_size > 1:
            sampler = DistributedSampler(
                self.val_set, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
            )
        return DataLoader(
            self.val_set,
            batch_size=self.cfg.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            collate_fn=ValCollator(self.processor, self.cfg.max_length, self.cfg.on_bad_sample),
            num_workers=self.cfg.num_workers,
        )
