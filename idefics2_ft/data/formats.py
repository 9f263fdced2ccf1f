"""The row formats people hold, read into one ``Row``: detected from the columns, converted per row.

- ``qa``: a question, its answer(s) and an image, in columns named by ``data.*_column`` (DocVQA);
- ``trl``: ``messages`` (content as a list of parts, or a string) and ``images``, TRL's
  conversational format; our JSONL is this, with ``answers`` besides;
- ``cauldron``: ``images`` and ``texts: [{user, assistant, source}]``, The Cauldron's; the images
  belong to the first user turn, as Idefics2 was trained;
- ``llava``: ``image`` or ``images`` and ``conversations: [{from, value}]`` with ``<image>`` markers
  (LLaVA, ShareGPT), or ``messages`` with string content and markers (LLaMA-Factory's variant).

Examples of each, and the message for each mistake: ``docs/your-data.md``.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from idefics2_ft.data.records import DataError, Row, is_url, message_text, qa_messages

log = logging.getLogger(__name__)

FORMATS = ("qa", "trl", "cauldron", "llava")
_LOGGED: set[tuple[str, str]] = set()  # each table's detected format is logged once
MARKER = "<image>"
# LLaVA / ShareGPT speakers, as Idefics2's roles
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# the columns that tell each format apart (any one of the alternatives)
SIGNATURES = {
    "cauldron": ("texts",),
    "llava": ("conversations",),
    "trl": ("messages",),
}


def detect_format(columns: Sequence[str], sample: Sequence[dict], qa_columns: Sequence[str], where: str) -> str:
    """The format of a table from its columns (and, for ``messages``, whether its text holds ``<image>`` markers).

    Raises:
        DataError: no format has these columns; the message names them, the formats and the key to set.
    """
    cols = set(columns)
    if "texts" in cols and "images" in cols:
        return "cauldron"
    if "conversations" in cols:
        return "llava"
    if "messages" in cols:
        strings = [m.get("content") for item in sample for m in (item.get("messages") or []) if isinstance(m, dict)]
        if any(isinstance(c, str) and MARKER in c for c in strings):
            return "llava"
        return "trl"
    if all(c in cols for c in qa_columns):
        return "qa"
    question, answer, image = qa_columns
    present = [c for c in qa_columns if c in cols]
    if present:
        missing = [c for c in qa_columns if c not in cols]
        raise DataError(
            f"{where}: read as format qa (it has {present}), it has no column(s) {missing}; its columns are "
            f"{sorted(cols)}. Map them with data.question_column / data.answer_column / data.image_column, "
            "or set data.format to one of trl, cauldron, llava."
        )
    raise DataError(
        f"{where}: cannot tell the format from its columns {sorted(cols)}. The formats read are: "
        "trl (messages, images), cauldron (images, texts), llava (conversations or messages with <image> "
        f"markers, image or images), qa (data.question_column={question}, data.answer_column={answer}, "
        f"data.image_column={image}). Set data.format, or map the qa columns with data.question_column / "
        "data.answer_column / data.image_column."
    )


class ImagePaths:
    """Where an image given as a relative path lies: under ``data.image_dir`` or the data file's folder."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None

    def __call__(self, ref: Any) -> Any:
        if isinstance(ref, dict) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
            return self(ref["path"])
        if isinstance(ref, str) and self.root is not None and not is_url(ref) and not Path(ref).is_absolute():
            return str(self.root / ref)
        return ref


def as_list(value: Any) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def as_text(value: Any) -> str | None:
    """A stored question or answer as text: a string as it is, a number as it reads (``3``, ``2.5``; an
    integral float such as ``3.0``, as a pandas or parquet column of numbers with a gap holds ``3``, as
    ``"3"``); None where there is none (None, NaN).

    Raises:
        TypeError: the value is neither text nor a number (the message says what it is).
    """
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        if math.isnan(number):
            return None
        return str(int(number)) if number.is_integer() else str(value)
    raise TypeError(f"{type(value).__name__} {_short(value)}, not text or a number")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def answer_texts(value: Any, column: str) -> tuple[list[str], tuple[str, str] | None]:
    """The reference answers a column holds (one, or a list), as text; and the problem of a row whose
    column holds no answer (None, NaN, an empty list: ``missing_answer``) or a value that is not one
    (``unreadable_text``), naming the column."""
    texts = []
    for item in as_list(value):
        try:
            text = as_text(item)
        except TypeError as err:
            return [], ("unreadable_text", f"column {column!r} holds {err}: give the answer as text or a number")
        if text is not None:
            texts.append(text)
    if not texts:
        held = "an empty list" if isinstance(value, (list, tuple)) and not value else repr(value)
        return [], ("missing_answer", f"column {column!r} holds no answer ({held}): fill it in, or leave the row out")
    return texts, None


def split_markers(text: str) -> list[dict]:
    """``"<image>\\nWhat is it?"`` -> an image part, then the text (the newline after a marker goes with it)."""
    parts: list[dict] = []
    pieces = text.split(MARKER)
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
            piece = piece.lstrip("\n")
        if i < len(pieces) - 1:
            piece = piece.rstrip("\n")
        if piece:
            parts.append(_text(piece))
    return parts


def _clean_parts(content: list) -> list[dict]:
    """Content parts as a ``datasets`` column holds them (every key in every part, None where unused)."""
    parts = []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"a content part is {type(part).__name__}, not a dict")
        kind = part.get("type")
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append(_text(as_text(part.get("text")) or ""))
        else:
            raise ValueError(f"a content part of type {kind!r} (parts are 'image' or 'text')")
    return parts


def _images_first(messages: list[dict], n_images: int) -> list[dict]:
    """Image parts at the start of the first user turn (The Cauldron's, and TRL's for string content)."""
    for message in messages:
        if message["role"] == "user":
            message["content"] = [{"type": "image"} for _ in range(n_images)] + message["content"]
            return messages
    if n_images:
        raise ValueError("images but no user turn to put them in")
    return messages


def _marker_messages(turns: list[tuple[str, str]], n_images: int) -> tuple[list[dict], str | None]:
    """Messages from ``(role, text)`` turns whose text places the images with ``<image>`` markers."""
    markers = sum(text.count(MARKER) for _, text in turns)
    messages = [{"role": role, "content": split_markers(text)} for role, text in turns]
    if markers != n_images:
        return messages, f"{markers} {MARKER} marker(s) but {n_images} image(s): give one marker per image"
    return messages, None


def trl_messages(item: dict) -> tuple[list[dict], list, str | None]:
    """TRL's ``messages`` (parts, or strings: then markers place the images, or they go first) and ``images``."""
    images = as_list(item.get("images"))
    raw = item.get("messages")
    if not isinstance(raw, list):
        raise ValueError("'messages' is not a list of turns")
    if all(isinstance(m.get("content"), str) for m in raw):
        turns = [(m.get("role"), m["content"]) for m in raw]
        if any(MARKER in text for _, text in turns):
            messages, problem = _marker_messages(turns, len(images))
            return messages, images, problem
        messages = [{"role": role, "content": [_text(text)]} for role, text in turns]
        return _images_first(messages, len(images)), images, None
    messages = []
    for m in raw:
        content = m.get("content")
        parts = [_text(content)] if isinstance(content, str) else _clean_parts(content or [])
        messages.append({"role": m.get("role"), "content": parts})
    return messages, images, None


def cauldron_messages(item: dict) -> tuple[list[dict], list, str | None]:
    """The Cauldron: ``texts`` of ``{user, assistant}`` pairs, the images before the first user turn."""
    images = as_list(item.get("images"))
    texts = item.get("texts")
    if not texts:
        return [], images, "empty_texts"
    messages = []
    for turn in texts:
        messages.append({"role": "user", "content": [_text(as_text(turn.get("user")) or "")]})
        messages.append({"role": "assistant", "content": [_text(as_text(turn.get("assistant")) or "")]})
    return _images_first(messages, len(images)), images, None


def llava_messages(item: dict) -> tuple[list[dict], list, str | None]:
    """LLaVA / ShareGPT ``conversations`` (``from``, ``value``) or ``messages`` with ``<image>`` markers."""
    images = as_list(item.get("images")) or as_list(item.get("image"))
    if "conversations" in item and item["conversations"] is not None:
        turns = []
        for turn in item["conversations"]:
            speaker = turn.get("from")
            if speaker not in SPEAKERS:
                known = ", ".join(sorted(SPEAKERS))
                return [], images, f"unknown_role:speaker from={speaker!r} (use one of {known})"
            turns.append((SPEAKERS[speaker], as_text(turn.get("value")) or ""))
    elif isinstance(item.get("messages"), list):
        turns = [(m.get("role"), m.get("content") or "") for m in item["messages"]]
        if not all(isinstance(text, str) for _, text in turns):
            raise ValueError("messages with content parts in a llava table (they are read as format=trl)")
    else:
        raise ValueError("neither 'conversations' nor 'messages'")
    messages, problem = _marker_messages(turns, len(images))
    return messages, images, problem


CONVERTERS: dict[str, Callable[[dict], tuple[list[dict], list, str | None]]] = {
    "trl": trl_messages,
    "cauldron": cauldron_messages,
    "llava": llava_messages,
}

# a converter's problem string: "kind:reason", or a bare kind, or a reason (kind: images_mismatch)
PROBLEM_REASONS = {"empty_texts": "the Cauldron row's 'texts' list is empty"}


def _problem(text: str) -> tuple[str, str]:
    if text in PROBLEM_REASONS:
        return text, PROBLEM_REASONS[text]
    kind, sep, reason = text.partition(":")
    if sep and kind.isidentifier():
        return kind, reason
    return "images_mismatch", text


def signature(fmt: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The column every row of a table of ``fmt`` holds (llava: ``conversations``, or LLaMA-Factory's ``messages``)."""
    if fmt == "llava" and "conversations" not in columns:
        return ("messages",)
    return SIGNATURES.get(fmt, ())


def to_row(
    item: dict, fmt: str, cfg: Any, origin: str, paths: ImagePaths, index: int, expected: tuple[str, ...] | None = None
) -> Row:
    """One row of ``fmt`` as a ``Row``; a row that is not of this format (or is bad) carries its problem.

    ``cfg`` is the source's data config (columns, system prompt); ``expected`` the column that the
    table's rows hold (``signature``), so that a row of another format is told apart.
    """
    if fmt == "qa":
        return _qa_row(item, cfg, origin, paths, index)
    expected = expected or SIGNATURES[fmt]
    if not any(item.get(key) is not None for key in expected):
        present = sorted(k for k, v in item.items() if v is not None)
        return Row(
            messages=[],
            origin=origin,
            problem=("format_mismatch", f"has {present}, not the {fmt} format of the rest ({', '.join(expected)})"),
        )
    try:
        messages, images, problem = CONVERTERS[fmt](item)
    except (AttributeError, TypeError, ValueError) as err:
        return Row(messages=[], origin=origin, problem=("format_mismatch", f"not a {fmt} row: {err}"))
    if cfg.system_prompt and messages and not any(m.get("role") == "system" for m in messages):
        messages = [{"role": "system", "content": [_text(cfg.system_prompt)]}, *messages]
    answers, unreadable = answer_texts(item.get("answers"), "answers")
    if unreadable is not None and unreadable[0] != "missing_answer":
        return Row(messages=[], origin=origin, problem=unreadable)
    if not answers:  # no reference answers given: the last assistant turn is the reference
        last = [m for m in messages if m.get("role") == "assistant"]
        answers = [message_text(last[-1])] if last else []
    qtype = item.get(cfg.type_column or "question_type")
    return Row(
        messages=messages,
        images=[paths(ref) for ref in images],
        answers=as_list(answers),
        id=_row_id(item, cfg, index),
        question_type=qtype[0] if isinstance(qtype, list) and qtype else qtype,
        origin=origin,
        problem=_problem(problem) if problem else None,
    )


def _row_id(item: dict, cfg: Any, index: int) -> Any:
    if cfg.id_column and item.get(cfg.id_column) is not None:
        return item[cfg.id_column]
    return item["id"] if item.get("id") is not None else index


def _qa_row(item: dict, cfg: Any, origin: str, paths: ImagePaths, index: int) -> Row:
    missing = [c for c in (cfg.question_column, cfg.answer_column, cfg.image_column) if c not in item]
    if missing:
        return Row(messages=[], origin=origin, problem=("format_mismatch", f"no column(s) {missing} (format qa)"))
    answers, problem = answer_texts(item[cfg.answer_column], cfg.answer_column)
    try:
        question = as_text(item[cfg.question_column]) or ""
    except TypeError as err:
        problem = ("unreadable_text", f"column {cfg.question_column!r} holds {err}: give the question as text")
    if problem is not None:
        return Row(messages=[], origin=origin, problem=problem)
    images = as_list(item[cfg.image_column])
    qtype = item.get(cfg.type_column) if cfg.type_column else None
    return Row(
        # train on the first reference answer; all of them are kept for the metric
        messages=qa_messages(question, answers[0], cfg.system_prompt, len(images)),
        images=[paths(ref) for ref in images],
        answers=answers,
        id=_row_id(item, cfg, index),
        question_type=qtype[0] if isinstance(qtype, list) and qtype else qtype,
        origin=origin,
    )


def row_options(cfg: Any) -> SimpleNamespace:
    """The keys ``to_row`` reads, as plain attributes (an OmegaConf lookup costs ~40 µs: per row, it showed)."""
    keys = ("question_column", "answer_column", "image_column", "id_column", "type_column", "system_prompt")
    return SimpleNamespace(**{key: cfg.get(key) for key in keys})


def chosen_format(cfg: Any, columns: Sequence[str], sample: Sequence[dict], where: str) -> str:
    """``data.format``, or the detected one when it is ``auto``; logged once per table."""
    qa_columns = (cfg.question_column, cfg.answer_column, cfg.image_column)
    given = cfg.format != "auto"
    fmt = cfg.format if given else detect_format(columns, sample, qa_columns, where)
    needed = qa_columns if fmt == "qa" else signature(fmt, columns)
    if given and not set(needed) & set(columns):
        try:
            hint = (
                f"; its columns read as format={detect_format(columns, sample, qa_columns, where)}: set that, or auto"
            )
        except DataError:
            hint = ""
        raise DataError(
            f"{where}: data.format={fmt} reads the column(s) {list(needed)}, and its columns are {sorted(columns)}{hint}."
        )
    if (where, fmt) not in _LOGGED:
        _LOGGED.add((where, fmt))
        why = "data.format" if given else f"detected from its columns {sorted(columns)}"
        log.info("Data: %s reads as format=%s (%s).", where, fmt, why)
    return fmt
