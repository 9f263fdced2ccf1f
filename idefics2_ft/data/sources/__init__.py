"""Sources -> rows. Each kind of ``data.source`` is one class in its own module, listed once in ``SOURCES``.

A source yields *rows*: cheap references (question, answers, an image reference).
``RecordDataset`` turns a row into a record when it is indexed, so images load lazily, one at a
time, and a bad row becomes a counted ``BadSample`` instead of a crash. What a kind answers (its
rows, splits, fingerprint, Hub dataset, the checks of its keys): ``SourceKind`` in ``base.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from idefics2_ft.data.mixture import Source, source_configs
from idefics2_ft.data.records import BadSampleError, DataError, Row, check_row
from idefics2_ft.data.sources.base import SourceKind, unknown_source
from idefics2_ft.data.sources.easyvqa import EasyVQA, easyvqa_question_type, easyvqa_rows
from idefics2_ft.data.sources.files import JsonRows, read_file
from idefics2_ft.data.sources.hub import Hub, is_hub_id
from idefics2_ft.data.sources.jsonl import Jsonl
from idefics2_ft.data.sources.table import TableRows, open_table

log = logging.getLogger(__name__)

__all__ = [
    "ALIASES",
    "SOURCES",
    "JsonRows",
    "SourceKind",
    "TableRows",
    "build_rows",
    "check_sources",
    "data_fingerprint",
    "easyvqa_question_type",
    "easyvqa_rows",
    "is_hub_id",
    "kind_of",
    "open_table",
    "read_file",
]

# every kind of data.source, by name: the one list (the config's choices are pinned to it by a test)
SOURCES: dict[str, SourceKind] = {kind.name: kind for kind in (EasyVQA(), Jsonl(), Hub())}
# names a config may still give: data=docvqa is a preset of hub now, and older run folders say source: docvqa
ALIASES = {"docvqa": "hub"}


def kind_of(d: Any) -> SourceKind:
    """The kind of ``d.source`` (a source's data config).

    Raises:
        DataError: no such kind, naming the kinds there are.
    """
    name = ALIASES.get(d.source, d.source)
    if name not in SOURCES:
        raise unknown_source(d.source, [*SOURCES, *ALIASES])
    return SOURCES[name]


def build_rows(data_cfg: DictConfig, split_key: str) -> Sequence[Row]:
    """The rows of ``data.train_split`` or ``data.val_split`` (``"train"`` or ``"val"``), as ``data.source`` reads them.

    Returns:
        A sequence of rows (lazy for a Hub dataset: images stay undecoded until read).

    Raises:
        DataError: the source cannot be read as configured, naming the file (and line) and the fix.
    """
    return kind_of(data_cfg).rows(data_cfg, split_key)


def data_fingerprint(data_cfg: DictConfig) -> dict[str, Any]:
    """Per source, what its kind says tells its content apart (``SourceKind.fingerprint``: data files by
    size and a hash of their content, a saved ``datasets`` folder by ``datasets``' own fingerprints, a
    Hub dataset by its id and subset, easy-VQA by the package's version). A mixture: each source's, by name."""
    sources = source_configs(data_cfg)
    if len(sources) > 1:
        return {s.name: kind_of(s.cfg).fingerprint(s.cfg) for s in sources}
    return kind_of(data_cfg).fingerprint(data_cfg)


def check_sources(data_cfg: DictConfig) -> dict[str, int]:
    """Read both splits of every source and check every record before anything trains (stage 1 included).

    Reading parses the files (a bad JSON or non-UTF-8 line, a missing split fail here, with the file
    and line); checking applies ``check_row`` and looks for image files on disk, without opening
    them. A streamed source is checked on the first ``data.buffer_size`` records of each split (or
    1,000), as reading it whole is what streaming avoids. Returns the bad records per ``<split>/<kind>``, or
    ``<split>/<source>/<kind>`` in a mixture.

    Raises:
        BadSampleError: with ``data.on_bad_sample=raise``, at the first bad record, naming where it is.
        DataError: every record checked of a source's split is bad (a mixture would draw nothing but
            skipped records from it, and ``val/score`` would leave it out), naming the source and the
            first record's reason.
    """
    counts: dict[str, int] = {}
    first: dict[str, str] = {}  # kind -> where its first record is, and why it is bad
    for source in source_configs(data_cfg):
        cfg = source.cfg
        for split_key, limit in (("train", cfg.max_train_samples), ("val", cfg.max_val_samples)):
            checked, bad, first_bad = 0, 0, ""
            for index, row in enumerate(_rows_to_check(source, split_key, limit)):
                checked += 1
                problem = check_row(row)
                missing = [ref for ref in row.images if isinstance(ref, str) and not Path(ref).is_file()]
                if problem is None and missing:
                    problem = ("missing_image", f"image not found: {missing[0]}")
                if problem is None:
                    continue
                where = row.origin or f"{split_key} record {index}"
                if source.name:
                    where = f"source {source.name}: {where}"
                if cfg.on_bad_sample == "raise":
                    raise BadSampleError(f"{where}: {problem[1]} (set data.on_bad_sample=skip to skip such records)")
                key = f"{split_key}/{source.key(problem[0])}"
                counts[key] = counts.get(key, 0) + 1
                first.setdefault(key, f"{where}: {problem[1]}")
                bad += 1
                first_bad = first_bad or f"{where}: {problem[1]}"
            if checked and bad == checked:
                raise DataError(_all_bad(source, split_key, checked, first_bad))
    if counts:
        kinds = "; ".join(f"{key} {n} (the first: {first[key]})" for key, n in counts.items())
        log.warning("Data check: %d bad record(s) will be skipped: %s", sum(counts.values()), kinds)
    return counts


def _all_bad(source: Source, split_key: str, checked: int, first_bad: str) -> str:
    """The refusal of a source whose checked records of a split are all bad, with the fix."""
    if source.cfg.streaming:
        records = f"the first {checked:,} {split_key} records read from the stream"
    else:
        records = f"all {checked:,} {split_key} records"
    key = kind_of(source.cfg).split_key(split_key)
    if source.name is None:
        effect = "nothing would train" if split_key == "train" else "nothing would be scored"
        return (
            f"data: {records} are bad, so {effect} (the first, {first_bad}). "
            f"Fix the records as that says, or point data.{key} at other records."
        )
    effect = "its draws would all be skipped" if split_key == "train" else "val/score would leave it out"
    return (
        f"data.mixture source {source.name!r}: {records} are bad, so {effect} (the first, {first_bad}). "
        f"Fix its records as that says, point its {key} at other records, or remove it from data.mixture."
    )


STREAM_CHECK_ROWS = 1000


def _rows_to_check(source: Source, split_key: str, limit: int | None):
    cfg = source.cfg
    if cfg.streaming:  # both splits read as streams: neither downloads whole
        from itertools import islice

        n = min(limit or STREAM_CHECK_ROWS, cfg.buffer_size or STREAM_CHECK_ROWS)
        kind = kind_of(cfg)
        yield from islice(kind.stream(cfg, cfg[kind.split_key(split_key)]), n)
        return
    rows = build_rows(cfg, split_key)
    for index in range(len(rows) if limit is None else min(limit, len(rows))):
        yield rows[index]
