"""What every kind of ``data.source`` answers: the one object the rest of the code asks about a source.

A kind (``easyvqa``, ``jsonl``, ``hub``) is a subclass of ``SourceKind`` in its own module of this
folder, listed once in ``SOURCES`` (``data/sources/__init__.py``). No other module compares
``data.source`` with a string: it asks ``kind_of(cfg)`` for the rows, the splits, the fingerprint,
what the Hub must hold and the problems of the kind's own keys.

``d`` below is a source's data config: ``data.*``, or a mixture entry's keys over it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from idefics2_ft.data.records import DataError, Row


class SourceKind:
    """One kind of source. Subclasses set ``name`` and ``about`` and implement ``rows``."""

    name: str = ""
    about: str = ""  # one line: what it reads (docs, ``idefics2-ft train --help``)
    streams: bool = False  # whether ``data.streaming=true`` can read it

    def split_key(self, split_key: str) -> str:
        """The key that names the ``"train"`` or ``"val"`` split: ``data.train_split`` unless the kind reads files."""
        return "train_split" if split_key == "train" else "val_split"

    def rows(self, d: Any, split_key: str) -> Sequence[Row]:
        """The rows of the ``"train"`` or ``"val"`` split (lazy where the source is large).

        Raises:
            DataError: the split cannot be read as configured, naming the file (and line) and the fix.
        """
        raise NotImplementedError

    def stream(self, d: Any, split: str, rank: int = 0, world: int = 1, seed: int | None = None) -> Iterator[Row]:
        """The rows of ``split`` read as a stream (``data.streaming=true``; only where ``streams``): this
        rank's share, epoch after epoch reshuffled when ``seed`` is given, else one pass in stored order."""
        raise DataError(f"data.streaming=true: source {self.name} cannot be streamed; set data.streaming=false.")

    def for_split(self, d: Any, split: str) -> dict[str, Any]:
        """The keys that make ``split`` (a name ``data.split`` gives ``evaluate``) the validation split.

        Raises:
            DataError: the source has no such split, naming the ones it has.
        """
        return {"val_split": split}

    def fingerprint(self, d: Any) -> dict[str, Any]:
        """What tells this source's content apart from another's (a resume compares it)."""
        raise NotImplementedError

    def hub_dataset(self, d: Any) -> str | None:
        """The Hub dataset id this source reads (prefetch, the offline pre-flight, the model card), if any."""
        return None

    def one_split(self, rows: Sequence[Row]) -> bool:
        """Whether ``rows`` (read for validation) came from a source that holds one split only, so that
        validation would read the training records."""
        return False

    def problems(self, d: Any, where: str) -> list[str]:
        """The problems of the kind's own keys, each with its fix (``where``: ``data`` or a mixture entry)."""
        return []

    def __repr__(self) -> str:
        return f"<data.source {self.name}>"


def unknown_source(name: object, known: Sequence[str]) -> DataError:
    return DataError(f"data.source={name!r} is not one of {', '.join(known)}.")
