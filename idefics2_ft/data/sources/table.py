"""A ``datasets`` table: a Hub dataset, a ``save_to_disk`` folder, a folder of data files, or a parquet file.

Rows stay in Arrow (memory-mapped) and images undecoded until a row is read; the row's format is detected from
the columns (``data.format=auto``) and converted by ``idefics2_ft.data.formats``.
"""

from __future__ import annotations

import copy
import errno
import re
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from idefics2_ft.data.formats import FORMATS, SAMPLE_ROWS, ImagePaths, chosen_format, row_options, signature, to_row
from idefics2_ft.data.records import DataError, Row

DATA_FILE_TYPES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


SPLIT_SLICE = re.compile(r"^(?P<name>[\w.-]+)\[(?P<start>\d*):(?P<stop>\d*)\]$")


def parse_split(split: str) -> tuple[str, int, int | None]:
    """``"train[200:]"`` -> ``("train", 200, None)``: a slice of rows of a split (hold out validation rows
    from a dataset that has one split, as The Cauldron)."""
    match = SPLIT_SLICE.match(split)
    if not match:
        return split, 0, None
    stop = match["stop"]
    return match["name"], int(match["start"] or 0), int(stop) if stop else None


def _slice(dataset: Any, start: int, stop: int | None, cfg: Any, split: str) -> Any:
    """Rows ``start:stop`` of a split (``split`` as given, ``train[200:]``, names it in the message).

    Raises:
        DataError: the slice leaves no rows of a table (a stream's are counted when it is read).
    """
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        dataset = dataset.skip(start) if start else dataset
        return dataset.take(stop - start) if stop is not None else dataset
    end = len(dataset) if stop is None else min(stop, len(dataset))
    if start >= end:
        raise DataError(no_rows_left(cfg, split, len(dataset)))
    return dataset.select(range(start, end))


def no_rows_left(cfg: Any, split: str, rows: int, stream: bool = False) -> str:
    """The refusal of a slice of a split that leaves no rows (``train[200:]``, The Cauldron's default,
    of a subset of fewer than 200), naming the key that gives it, the split's rows and slices that fit."""
    name, start, stop = parse_split(split)
    keys = [key for key in ("train_split", "val_split") if cfg.get(key) == split]
    given = f"data.{keys[0]}={split!r}" if keys else f"the split {split!r}"
    if stop is not None and stop <= start:
        return f"data.path={cfg.path}: {given} is an empty slice: {name}[a:b] holds rows a to b-1, so b is above a."
    held = f"has {rows:,} row(s)" if not stream else f"streams {rows:,} row(s)"
    if rows >= 2:
        out = max(1, min(200, rows // 10))
        fix = (
            f"Hold fewer rows out: data.train_split={name}[{out}:] data.val_split={name}[:{out}] (the first {out} "
            "for validation), or validate on a split of its own."
        )
    else:
        fix = f"Train on the whole split (data.train_split={name}), or give data with more rows."
    return f"data.path={cfg.path}: {given} leaves no rows: the split {name!r} {held}. {fix}"


def open_table(cfg: Any, split: str, streaming: bool = False) -> tuple[Any, str, bool]:
    """``(dataset, base folder for relative image paths or None, holds one split only)`` of ``data.path``.

    Raises:
        DataError: the path holds no such split (naming the ones it has) or cannot be read, or
            ``datasets`` cannot write its cache (naming ``HF_DATASETS_CACHE``).
    """
    import datasets

    try:
        return _open_table(cfg, split, streaming)
    except OSError as err:
        cache = Path(datasets.config.HF_DATASETS_CACHE).resolve()
        where = Path(err.filename).resolve() if isinstance(err.filename, str) else None
        if (
            err.errno not in (errno.EACCES, errno.EROFS, errno.EPERM)
            or where is None
            or cache not in (where, *where.parents)
        ):
            raise
        raise DataError(
            f"data.path={cfg.path}: datasets could not write its cache ({where}: {err.strerror}). Reading data "
            f"files keeps an Arrow copy in HF_DATASETS_CACHE ({cache}): set HF_DATASETS_CACHE (or HF_HOME) to a "
            "folder you can write."
        ) from None


def _open_table(cfg: Any, split: str, streaming: bool) -> tuple[Any, str, bool]:
    import datasets

    given = split
    split, start, stop = parse_split(split)
    path = cfg.path
    folder = Path(path)
    single = False
    base = None
    if folder.is_dir() and ((folder / "dataset_info.json").is_file() or (folder / "dataset_dict.json").is_file()):
        dataset = datasets.load_from_disk(path)
        single = isinstance(dataset, datasets.Dataset)
        if streaming:
            dataset = (
                dataset.to_iterable_dataset() if single else {k: v.to_iterable_dataset() for k, v in dataset.items()}
            )
    elif folder.is_file():
        kind = DATA_FILE_TYPES.get(folder.suffix.lower())
        if kind is None:
            raise DataError(
                f"data.path={path}: a {folder.suffix or 'suffix-less'} file; data files are {sorted(DATA_FILE_TYPES)}."
            )
        dataset = datasets.load_dataset(kind, data_files={split: str(folder)}, split=split, streaming=streaming)
        single, base = True, folder.resolve().parent
    else:
        subset = cfg.subset
        if folder.is_dir():
            folder, subset = subset_folder(folder, subset)
            path, base = str(folder), folder.resolve()
        try:
            dataset = datasets.load_dataset(path, subset, streaming=streaming)
        except ValueError as err:  # a subset the dataset does not have, and kin
            raise DataError(f"data.path={path} data.subset={cfg.subset}: {str(err).splitlines()[0]}") from err
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict, dict)):
        if split not in dataset:
            raise DataError(
                f"dataset {path!r} has no split {split!r}; its splits are {sorted(dataset)}. "
                "Set data.train_split / data.val_split (or the source's own) to one of them."
            )
        dataset = dataset[split]
    if start or stop is not None:
        dataset = _slice(dataset, start, stop, cfg, given)
    if isinstance(dataset, datasets.IterableDataset):
        # images stay bytes and paths until a record is read; decode(False) alone would leave the
        # Json columns (the content parts of a JSON file's messages) as JSON text too
        dataset = dataset.decode(False).cast(undecoded_media(dataset.features))
    return dataset, base, single


SPLIT_FOLDERS = {"train", "training", "validation", "valid", "val", "dev", "test", "testing", "eval", "evaluation"}


def subset_folder(folder: Path, subset: str | None) -> tuple[Path, str | None]:
    """Where a local folder of data files keeps ``data.subset``: ``(folder to read, subset to ask datasets for)``.

    A Hub dataset downloaded in part (``huggingface-cli download HuggingFaceM4/the_cauldron --include
    "chartqa/*"``) is a folder per subset without the README that names them: ``datasets`` then knows
    one configuration, ``default``, holding every subset's files at once. Without that README the
    subset is its folder. With the README, ``datasets`` reads the subsets as the README names them.

    Raises:
        DataError: the subset has no folder here, or ``data.subset=null`` would merge several subsets'
            folders into one table; naming the subsets and the fix.
    """
    if (folder / "README.md").is_file():
        return folder, subset
    subsets = sorted(
        p.name
        for p in folder.iterdir()
        if p.is_dir()
        and p.name.lower() not in SPLIT_FOLDERS
        and not p.name.startswith(".")
        and any(f.suffix.lower() in DATA_FILE_TYPES for f in p.rglob("*"))
    )
    if subset is not None:
        if (folder / subset).is_dir():
            return folder / subset, None
        raise DataError(
            f"data.path={folder} data.subset={subset}: the folder has no README.md naming its subsets and no "
            f"folder {subset}/ (its subset folders: {subsets or 'none'}). Point data.path at the subset's "
            f"folder with data.subset=null (data.path={folder / (subsets[0] if subsets else subset)} data.subset=null), "
            "or choose one of its folders as data.subset."
        )
    if len(subsets) > 1:
        raise DataError(
            f"data.path={folder} holds the subset folders {subsets} and no README.md naming them: read whole it "
            f"would merge every subset into one table. Choose one with data.subset={subsets[0]} (or "
            f"data.path={folder / subsets[0]}), or mix several with data.mixture."
        )
    return folder, subset


def undecoded_media(features: Any) -> Any:
    """``features`` with its media (images and kin) left undecoded and its ``Json`` values still decoded.

    ``datasets`` reads the content parts of a JSON file's messages (``[{"type": "image"}, {"type":
    "text", ...}]``, dicts with different keys) as a ``Json`` feature: stored as JSON text, decoded
    into dicts on read. Turning decoding off for every feature would leave that text.
    """
    import datasets

    features = copy.deepcopy(features)

    def visit(feature: Any) -> None:
        if isinstance(feature, dict):
            for value in feature.values():
                visit(value)
        elif isinstance(feature, (list, tuple)):
            for value in feature:
                visit(value)
        elif hasattr(feature, "feature"):  # List, LargeList
            visit(feature.feature)
        if hasattr(feature, "decode") and not isinstance(feature, datasets.Json):
            feature.decode = False

    visit(features)
    return datasets.Features(dict(features))  # rebuilt: Features caches which columns it decodes


def json_decoder(features: Any) -> Callable[[dict], dict] | None:
    """What turns a row as Arrow stores it into the row as read, media left as stored (bytes and
    path): it decodes the ``Json`` columns. None when the table has none (the row is then as read)."""
    from datasets.features.features import require_decoding

    lazy = undecoded_media(features)
    if not any(require_decoding(feature) for feature in lazy.values()):
        return None
    return lazy.decode_example


class TableRows(Sequence):
    """Rows of one split of a ``datasets`` table, converted by format when read."""

    def __init__(self, cfg: Any, split: str) -> None:
        dataset, base, self.single_split = open_table(cfg, split)
        if not len(dataset):  # a slice that leaves none is refused by _slice, naming the slice
            raise DataError(f"data.path={cfg.path}: the split {split!r} has no rows; give data that has some.")
        # rows as Arrow gives images as stored (bytes and path), decoded only when a record is read
        self.dataset, self.cfg = dataset.with_format("arrow"), cfg
        self.decode = json_decoder(dataset.features)
        self.origin = f"{cfg.path}[{split}]"
        self.paths = ImagePaths(cfg.get("image_dir") or base)
        sample = [self._item(row) for row in self.dataset[: min(SAMPLE_ROWS, len(dataset))].to_pylist()]
        self.format = chosen_format(cfg, dataset.column_names, sample, self.origin)
        self.expected = signature(self.format, dataset.column_names)
        self.options = row_options(cfg)
        if FORMATS[self.format].mapped:  # its columns are the ones data.*_column name
            needed = [cfg[key] for key in FORMATS[self.format].mapped]
            missing = [c for c in needed if c not in dataset.column_names]
            if missing:
                raise DataError(
                    f"dataset {cfg.path!r} split {split!r} has no column(s) {missing}; it has "
                    f"{dataset.column_names}. Map them with data.question_column / data.answer_column / "
                    f"data.image_column, or set data.format to one of {', '.join(n for n, f in FORMATS.items() if not f.mapped)}."
                )

    def __len__(self) -> int:
        return len(self.dataset)

    def _item(self, stored: dict) -> dict:
        """A row as Arrow gives it (images as stored), its ``Json`` columns decoded."""
        return self.decode(stored) if self.decode is not None else stored

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not 0 <= index < len(self):
            raise IndexError(index)
        item = self._item(self.dataset[int(index)].to_pylist()[0])
        return to_row(item, self.format, self.options, f"{self.origin} row {index}", self.paths, index, self.expected)


def open_stream(cfg: Any, split: str, rank: int = 0, world: int = 1):
    """The split as an ``IterableDataset`` (this rank's part of it), the format and the image paths."""
    from datasets.distributed import split_dataset_by_node

    dataset, base, _ = open_table(cfg, split, streaming=True)
    if world > 1:
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world)
    sample = list(islice(iter(dataset), SAMPLE_ROWS))
    if not sample:
        name, start, stop = parse_split(split)
        if (start or stop is not None) and world == 1:  # the slice leaves nothing: count the rows it starts from
            rows = 0
            if stop is None or stop > start:
                whole, _, _ = open_table(cfg, name, streaming=True)
                rows = sum(1 for _ in islice(iter(whole), start))
            raise DataError(no_rows_left(cfg, split, rows, stream=True))
        raise DataError(f"{cfg.path}[{split}]: the stream is empty.")
    columns = sorted({key for item in sample for key in item})
    fmt = chosen_format(cfg, columns, sample, f"{cfg.path}[{split}]")
    return dataset, (fmt, signature(fmt, columns)), ImagePaths(cfg.get("image_dir") or base)


def stream_rows(cfg: Any, split: str, rank: int = 0, world: int = 1, seed: int | None = None) -> Iterator[Row]:
    """The rows of a streamed split, epoch after epoch when ``seed`` is given (reshuffled each epoch)."""
    dataset, (fmt, expected), paths = open_stream(cfg, split, rank, world)
    if seed is not None and cfg.buffer_size:
        dataset = dataset.shuffle(seed=seed, buffer_size=cfg.buffer_size)
    epoch, n, options = 0, 0, row_options(cfg)
    while True:
        dataset.set_epoch(epoch)
        read = 0
        for item in dataset:
            yield to_row(item, fmt, options, f"{cfg.path}[{split}] row {n} (epoch {epoch})", paths, n, expected)
            read, n = read + 1, n + 1
        if seed is None:
            return
        if not read:
            raise DataError(f"{cfg.path}[{split}]: rank {rank} of {world} reads no record of the stream.")
        epoch += 1
