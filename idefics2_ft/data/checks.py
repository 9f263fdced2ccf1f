"""The data keys' problems, before anything loads: ``data_problems`` lists each one with its fix.

``validate`` (``idefics2_ft/config/validate.py``) asks this module for the ``data`` group's problems
and lists them with the rest of the config's, all at once. A source's own keys are checked by its
kind (``SourceKind.problems``); what holds for every source (streaming, sample counts) and for the
mixture as a whole is checked here. Reading the records themselves (``check_sources``) comes later,
once the config is known to be sound.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.data.mixture import WEIGHT_SUM_TOLERANCE, entry_config
from idefics2_ft.data.records import DataError
from idefics2_ft.data.sources import ALIASES, SOURCES, kind_of


def data_problems(d: DictConfig) -> list[str]:
    """Every problem of the ``data`` group (one source, or each mixture entry over ``data.*``)."""
    problems: list[str] = []
    if d.longest_edge <= 0 or d.shortest_edge <= 0:
        problems.append("data.longest_edge and data.shortest_edge must be positive pixel counts.")
    if d.num_workers is not None and d.num_workers < 0:
        problems.append(f"data.num_workers={d.num_workers}: must be 0 or more, or null for the machine's default.")
    if d.mixture:
        problems += mixture_problems(d)
    else:
        problems += source_problems(d, "data")
    if d.max_length is not None and d.max_length <= 0:
        problems.append(f"data.max_length={d.max_length}: must be positive, or null for no limit.")
    if d.batch_size != "auto" and not (isinstance(d.batch_size, int) and d.batch_size > 0):
        problems.append(f"data.batch_size={d.batch_size!r}: must be a positive number, or auto.")
    if d.eval_batch_size <= 0:
        problems.append(f"data.eval_batch_size={d.eval_batch_size}: must be positive.")
    if d.buffer_size is not None and d.buffer_size <= 0:
        problems.append(f"data.buffer_size={d.buffer_size}: must be positive, or null.")
    if d.streaming and d.group_by != "none" and not d.buffer_size:
        problems.append(
            f"data.streaming=true with data.group_by={d.group_by} needs data.buffer_size (the records sorted "
            "together: a stream cannot be sorted whole): data.buffer_size=1000, or data.group_by=none."
        )
    return problems


def source_problems(d: Any, where: str) -> list[str]:
    """One source's keys (``data`` itself, or a mixture entry over it), named as ``where`` says."""
    try:
        kind = kind_of(d)
    except DataError as err:
        return [f"{where}: {err}"]
    problems = kind.problems(d, where)
    if d.streaming and not kind.streams:
        problems.append(
            f"data.streaming=true reads {where}.path (a Hub dataset or data files), not source {d.source}: "
            f"give {where}.path, or set data.streaming=false."
        )
    if d.max_train_samples is not None and d.max_train_samples <= 0:
        problems.append(f"{where}.max_train_samples={d.max_train_samples}: must be positive, or null for every record.")
    return problems


def mixture_problems(d: DictConfig) -> list[str]:
    """The mixture's entries: names, weights, and each source's keys (an entry's keys over ``data.*``).

    The entries' ``source``, ``format`` and ``metric`` values are checked against their choices by
    ``validate``, with every other key that takes one of a few.
    """
    problems: list[str] = []
    unnamed = [i for i, e in enumerate(d.mixture) if OmegaConf.is_missing(e, "name")]
    if unnamed:
        return [
            f"data.mixture[{i}] has no name: give each source one (name: docvqa), for its metric keys." for i in unnamed
        ]
    names = [e.name for e in d.mixture]
    doubles = sorted({n for n in names if names.count(n) > 1})
    if doubles:
        problems.append(f"data.mixture: the source name(s) {doubles} are used twice; each source needs its own name.")
    bad_names = [n for n in names if not n or "/" in n]
    if bad_names:
        problems.append(f"data.mixture: name(s) {bad_names}: a name is a word without '/' (it is in metric keys).")
    base = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items() if k != "mixture"}
    for i, entry in enumerate(d.mixture):
        where = f"data.mixture[{i}] ({entry.name})"
        if entry.weight is not None and not entry.weight > 0:
            problems.append(f"{where}.weight={entry.weight}: a weight is a positive sampling probability.")
        if entry.weight is not None and entry.max_samples is not None:
            problems.append(
                f"{where}: give a weight (the probability of drawing from it) or max_samples (its records, "
                "drawn in proportion to their number), not both."
            )
        if entry.source is None or entry.source in SOURCES or entry.source in ALIASES:  # else: validate names it
            problems += source_problems(entry_config(base, entry), where)
    weights = [e.weight for e in d.mixture if e.weight is not None and e.weight > 0]
    if weights and len(weights) == len(d.mixture) and abs(sum(weights) - 1) > WEIGHT_SUM_TOLERANCE:
        normalised = ", ".join(f"{e.name}: {e.weight / sum(weights):.3f}" for e in d.mixture)
        problems.append(
            f"data.mixture weights sum to {sum(weights):g}, not 1: they are sampling probabilities "
            f"(normalised: {normalised})."
        )
    elif weights and len(weights) < len(d.mixture) and sum(weights) >= 1:
        problems.append(
            f"data.mixture weights sum to {sum(weights):g}, leaving nothing for the sources without a weight."
        )
    return problems
