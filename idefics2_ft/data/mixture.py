"""Several sources in one run: ``data.mixture``, each source's config, and the order records are drawn in.

A mixture is sampled, not concatenated: each draw picks a source by its probability, then that
source's next record from its own shuffled order (a new permutation each time it runs out). The
order is a pure function of the seed, so a resumed run skips into it exactly and ranks take
disjoint positions of it. What an epoch means for a mixture: ``docs/your-data.md#mixtures``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, count

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.data.records import DataError, Row

# the keys of a mixture entry that are the entry's own (everything else overrides data.*)
ENTRY_ONLY = ("name", "weight", "max_samples")
WEIGHT_SUM_TOLERANCE = 0.01


@dataclass(frozen=True)
class Source:
    """One source of a run: its name (None for a run of one source), its data config, its weight."""

    name: str | None
    cfg: DictConfig  # data.* with the entry's keys over it
    weight: float | None = None

    def key(self, suffix: str) -> str:
        """``suffix`` under this source's name in metric keys: ``docvqa/anls``, or ``anls`` alone."""
        return f"{self.name}/{suffix}" if self.name else suffix


def source_configs(data_cfg: DictConfig) -> list[Source]:
    """The run's sources: ``data`` itself, or one per ``data.mixture`` entry (``entry_config``)."""
    if not data_cfg.get("mixture"):
        return [Source(None, data_cfg)]
    base = OmegaConf.to_container(data_cfg, resolve=True)
    base.pop("mixture")
    return [Source(entry.name, entry_config(base, entry), entry.get("weight")) for entry in data_cfg.mixture]


def entry_config(base: dict, entry: DictConfig) -> DictConfig:
    """One mixture entry's data config: its keys (those it gives) over ``data.*`` (``base``, without the mixture).

    An entry with a ``path`` and no ``source`` reads it as ``source=hub`` does (a Hub id, a folder or
    a file); its ``max_samples`` is its ``max_train_samples``. The one place an entry is merged: the
    checks (``data/checks.py``) and the run read the same config.
    """
    own = {k: v for k, v in OmegaConf.to_container(entry, resolve=True).items() if v is not None}
    overrides = {k: v for k, v in own.items() if k not in ENTRY_ONLY}
    if "path" in own and "source" not in own:
        overrides["source"] = "hub"
    if "max_samples" in own:
        overrides["max_train_samples"] = own["max_samples"]
    return OmegaConf.create({**base, **overrides, "mixture": None})


def probabilities(sources: Sequence[Source], sizes: Sequence[int]) -> list[float]:
    """Each source's sampling probability: its ``weight``; sources without one share what the weights
    leave, in proportion to their sizes (all of them: the sources in proportion to their sizes).

    Raises:
        DataError: a weight that is not positive, weights over 1, or weights that do not sum to 1.
    """
    weights = [s.weight for s in sources]
    for s in sources:
        if s.weight is not None and not (math.isfinite(s.weight) and s.weight > 0):
            raise DataError(f"data.mixture source {s.name!r}: weight={s.weight} must be a positive probability.")
    given = sum(w for w in weights if w is not None)
    rest = [i for i, w in enumerate(weights) if w is None]
    if not rest:
        if abs(given - 1.0) > WEIGHT_SUM_TOLERANCE:
            normalised = ", ".join(f"{s.name}: {s.weight / given:.3f}" for s in sources)
            raise DataError(
                f"data.mixture weights sum to {given:g}, not 1: they are sampling probabilities. "
                f"Normalised they are {normalised}."
            )
        return [w / given for w in weights]
    if given >= 1.0:
        unweighted = ", ".join(str(sources[i].name) for i in rest)
        raise DataError(
            f"data.mixture weights sum to {given:g}, leaving nothing for {unweighted} (no weight): "
            "lower the weights or give every source one."
        )
    total = sum(sizes[i] for i in rest)
    out = [0.0 if w is None else w for w in weights]
    for i in rest:
        out[i] = (1.0 - given) * sizes[i] / total if total else 0.0
    return out


class RecordOrder:
    """The order records are drawn in, epoch after epoch, as global indices into the sources laid end to end.

    One source: each epoch a permutation seeded by ``seed + epoch`` (as before mixtures). Several:
    an epoch is as many draws as the sources have records together; each draw picks a source by
    ``probs``, then the next record of that source's own permutation stream.
    """

    def __init__(self, sizes: Sequence[int], probs: Sequence[float] | None = None, seed: int = 0) -> None:
        if not sizes or sum(sizes) == 0:
            raise DataError("no training records: every source is empty (check data.max_train_samples and the splits).")
        self.sizes, self.seed = list(sizes), seed
        self.probs = list(probs) if probs is not None else [1.0]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    def __len__(self) -> int:
        return sum(self.sizes)

    def epochs(self) -> Iterator[list[int]]:
        """Each epoch's draws, in order."""
        if len(self.sizes) == 1:
            yield from epoch_permutations(self.sizes[0], self.seed)
        streams = [
            chain.from_iterable(epoch_permutations(n, self.seed * 7919 + 104729 * (i + 1))) if n else iter(())
            for i, n in enumerate(self.sizes)
        ]
        import torch

        chooser = torch.Generator().manual_seed(self.seed)
        weights = torch.tensor(self.probs, dtype=torch.float64)
        while True:
            picks = torch.multinomial(weights, len(self), replacement=True, generator=chooser).tolist()
            yield [self.offsets[s] + next(streams[s]) for s in picks]

    def stream(self) -> Iterator[int]:
        """The draws of every epoch, one after another."""
        for epoch in self.epochs():
            yield from epoch


def epoch_permutations(n: int, seed: int) -> Iterator[list[int]]:
    """A permutation of ``range(n)`` per epoch, seeded by ``seed + epoch``."""
    import torch

    for epoch in count():
        yield torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


class SourceRows(Sequence):
    """The rows of several sources, each row tagged with its source's name.

    Laid end to end (training: the draws index them), or ``interleaved`` one of each source in turn
    (validation: ``trainer.limit_val_batches`` then still reads every source).
    """

    def __init__(
        self, parts: Sequence[tuple[str | None, Sequence[Row], int | None]], interleaved: bool = False
    ) -> None:
        self.names = [name for name, _, _ in parts]
        self.parts = [rows for _, rows, _ in parts]
        self.sizes = [len(rows) if limit is None else min(limit, len(rows)) for _, rows, limit in parts]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.turns: list[tuple[int, int]] | None = None
        if interleaved:
            self.turns = [
                (p, k) for k in range(max(self.sizes, default=0)) for p in range(len(parts)) if k < self.sizes[p]
            ]

    def __len__(self) -> int:
        return sum(self.sizes)

    def locate(self, index: int) -> tuple[int, int]:
        """``(source number, index within it)`` of a global index."""
        if not 0 <= index < len(self):
            raise IndexError(index)
        if self.turns is not None:
            return self.turns[index]
        part = max(i for i, off in enumerate(self.offsets) if off <= index and self.sizes[i])
        return part, index - self.offsets[part]

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        part, local = self.locate(int(index))
        row = self.parts[part][local]
        row.source = self.names[part]
        return row
