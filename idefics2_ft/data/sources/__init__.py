"""Sources -> rows. One module per kind of source; ``build_rows`` picks one by ``data.source`` and the path.

A source yields *rows*: cheap references (question, answers, an image reference).
``RecordDataset`` turns a row into a record when it is indexed, so images load lazily, one at a
time, and a bad row becomes a counted ``BadSample`` instead of a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.data.mixture import Source, source_configs
from idefics2_ft.data.records import BadSampleError, DataError, Row, check_row
from idefics2_ft.data.sources.easyvqa import easyvqa_question_type, easyvqa_rows
from idefics2_ft.data.sources.files import JsonRows
from idefics2_ft.data.sources.table import TableRows, open_table

log = logging.getLogger(__name__)

__all__ = [
    "JsonRows",
    "TableRows",
    "build_rows",
    "check_sources",
    "easyvqa_question_type",
    "easyvqa_rows",
    "open_table",
    "read_file",
]
JSON_SUFFIXES = (".jsonl", ".json")


def read_file(path: str, data_cfg: DictConfig) -> Sequence[Row]:
    """One data file: JSON Lines or JSON read row by row, parquet (and CSV) through ``datasets``."""
    if not Path(path).is_file():
        raise DataError(f"{path}: no such file.")
    if Path(path).suffix.lower() in JSON_SUFFIXES:
        return JsonRows(path, data_cfg)
    return TableRows(OmegaConf.merge(data_cfg, {"path": path}), "train")


def build_rows(data_cfg: DictConfig, split_key: str) -> Sequence[Row]:
    """The rows of ``data.train_split`` or ``data.val_split``, as ``data.source`` reads them.

    Args:
        data_cfg: the ``data`` group.
        split_key: ``"train"`` or ``"val"``.

    Returns:
        A sequence of rows (lazy for a Hub dataset: images stay undecoded until read).

    Raises:
        DataError: the source cannot be read as configured, naming the file (and line) and the fix.
    """
    split = data_cfg.train_split if split_key == "train" else data_cfg.val_split
    if data_cfg.source == "easyvqa":
        return easyvqa_rows(split, data_cfg.system_prompt)
    if data_cfg.source == "jsonl":
        return read_file(data_cfg.train_file if split_key == "train" else data_cfg.val_file, data_cfg)
    if data_cfg.source in ("docvqa", "hub"):
        if Path(data_cfg.path).is_file() and Path(data_cfg.path).suffix.lower() in JSON_SUFFIXES:
            rows = JsonRows(data_cfg.path, data_cfg)
            rows.single_split = True
            return rows
        return TableRows(data_cfg, split)
    raise DataError(f"data.source={data_cfg.source!r} is not one of easyvqa, docvqa, jsonl, hub.")


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
    if source.cfg.source == "jsonl":
        key = "train_file" if split_key == "train" else "val_file"
    else:
        key = "train_split" if split_key == "train" else "val_split"
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

        from idefics2_ft.data.streaming import stream_rows

        n = min(limit or STREAM_CHECK_ROWS, cfg.buffer_size or STREAM_CHECK_ROWS)
        yield from islice(stream_rows(cfg, cfg.train_split if split_key == "train" else cfg.val_split), n)
        return
    rows = build_rows(cfg, split_key)
    for index in range(len(rows) if limit is None else min(limit, len(rows))):
        yield rows[index]
