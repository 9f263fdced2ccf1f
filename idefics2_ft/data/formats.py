"""The row formats people hold, each one ``Format`` in one table, ``FORMATS``: detected from the
columns, converted per row into one ``Row``.

A format is its name, the columns that tell it apart (``Layout``), a few words on its columns (for
the messages that list the formats), the function that turns one row into messages, images and
the problem that makes it bad, and the kinds of bad record it reports. A *pair* format
(``pairs=True``) reads preference pairs (a chosen and a rejected side, ``Row.rejected``) for
``objective=dpo``; the others read one conversation a row for supervised fine-tuning, and each run
refuses the other's data where its format is chosen (``chosen_format``, by ``data.pairs``). ``detect_format``,
``chosen_format``, ``to_row``, the messages that list the formats, and the tests that pin
``DataFormat`` (``idefics2_ft/config/choices.py``), the demo's copies and ``docs/your-data.md``
all read the table, so a format is added in one place. Examples of each, and the message for each
mistake: ``docs/your-data.md``.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
import numbers
import re
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

from idefics2_ft.data.records import IMAGE_TOKEN, DataError, Row, is_url, message_text, qa_messages, sides_problem

log = logging.getLogger(__name__)

_LOGGED: set[tuple[str, str]] = set()  # each table's detected format is logged once
MARKER = IMAGE_TOKEN  # LLaVA's, LLaMA-Factory's and ms-swift's image marker in a string is Idefics2's image token
SAMPLE_ROWS = 32  # the first rows of a file, table or stream that its format is detected from
# LLaVA / ShareGPT speakers, as Idefics2's roles
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
# the keys under which an image part carries its image (axolotl's and transformers' chat parts)
IMAGE_KEYS = ("image", "path", "url", "base64")


class Converted(NamedTuple):
    """One row read by its format's converter.

    ``problem`` is what makes the row bad: ``(kind, reason)``, or a kind alone (its reason is the
    format's ``problems[kind]``). ``answers`` are the reference answers where the format names
    them (qa); None: the ``answers`` column, or else the last assistant turn. A pair format's row
    has ``messages``, the chosen side's conversation, and ``rejected``, the rejected side's, with
    ``rejected_images`` where that side shows images of its own.
    """

    messages: list[dict]
    images: list
    problem: tuple[str, str] | str | None = None
    answers: list[str] | None = None
    rejected: list[dict] | None = None
    rejected_images: list | None = None


Converter = Callable[[dict, Any], Converted]


@dataclass(frozen=True)
class Layout:
    """Columns that tell a format apart: a table has all of them, and its first rows pass ``test``
    (when given). The first column is the one every row of such a table holds."""

    columns: tuple[str, ...]
    test: Callable[[Sequence[dict]], bool] | None = None

    def fits(self, columns: set[str], sample: Sequence[dict]) -> bool:
        return all(c in columns for c in self.columns) and (self.test is None or self.test(sample))


@dataclass(frozen=True)
class Format:
    """One row format: how a table of it is told apart, and how one of its rows is read.

    ``mapped`` names the ``data.*`` keys that say which columns a table uses, for a format whose
    columns are the user's (qa): its one layout is those columns, and its converter checks them.
    ``generic``: its columns are common ones (``messages``; a question, answer and image), so a
    table that also has a specific format's columns (``conversations``; ``texts`` and ``images``)
    reads as that one. ``pairs``: its rows are preference pairs (``objective=dpo`` reads them, and
    only them).
    """

    name: str
    columns: str  # its columns in a few words, for the message that lists the formats (and the docs)
    convert: Converter
    layouts: tuple[Layout, ...] = ()
    mapped: tuple[str, ...] = ()
    problems: Mapping[str, str] = field(default_factory=dict)  # the bad-record kinds it reports, and why
    generic: bool = False
    pairs: bool = False

    def layouts_for(self, cfg: Any) -> tuple[Layout, ...]:
        """Its layouts, a format of ``mapped`` columns with the column names ``cfg`` gives."""
        return (Layout(self.mapped_columns(cfg)),) if self.mapped else self.layouts

    def mapped_columns(self, cfg: Any) -> tuple[str, ...]:
        return tuple(getattr(cfg, key) for key in self.mapped)

    def described(self, cfg: Any) -> str:
        """``trl (messages, images)``; a format of mapped columns with the names they have now."""
        if self.mapped:
            return f"{self.name} ({', '.join(f'data.{key}={getattr(cfg, key)}' for key in self.mapped)})"
        return f"{self.name} ({self.columns})"

    def signature(self, columns: Sequence[str]) -> tuple[str, ...]:
        """The column every row of a table of this format holds: its first layout's that the table
        has, or else each layout's (a message names them all); none for mapped columns."""
        keys = tuple(dict.fromkeys(layout.columns[0] for layout in self.layouts))
        present = [key for key in keys if key in columns]
        return tuple(present[:1]) or keys

    def problem(self, problem: tuple[str, str] | str) -> tuple[str, str]:
        """A converter's problem as ``(kind, reason)``."""
        return (problem, self.problems[problem]) if isinstance(problem, str) else problem


def _marked_messages(sample: Sequence[dict]) -> bool:
    """Whether the first rows' ``messages`` are LLaMA-Factory's: more of them hold string content with
    ``<image>`` markers than content as lists of parts (TRL's), so that a stray row of the other form
    does not decide for the whole table (it is read, or counted, as a row of its own)."""
    marked = parts = 0
    for item in sample:
        turns = item.get("messages")
        contents = [m.get("content") for m in turns if isinstance(m, dict)] if isinstance(turns, list) else []
        if any(isinstance(c, list) for c in contents):
            parts += 1
        elif any(isinstance(c, str) and MARKER in c for c in contents):
            marked += 1
    return marked > parts


class ImagePaths:
    """An image reference as it is read (``image_reference``: addresses and base64 decoded), a relative
    path under ``data.image_dir`` or the data file's folder. For every image of every format: the
    ``images`` / ``image`` columns' and the images image parts carry.

    Raises:
        binascii.Error: base64 (or a ``data:`` address) that does not decode.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None

    def __call__(self, ref: Any) -> Any:
        if isinstance(ref, dict) and ref.get("bytes") is None and isinstance(ref.get("path"), str):
            return self(ref["path"])
        ref = image_reference(ref)
        if isinstance(ref, str) and ref and self.root is not None and not is_url(ref) and not Path(ref).is_absolute():
            return str(self.root / ref)
        return ref


# what an image file starts with (PNG, JPEG, GIF, WebP, BMP, TIFF): tells a base64 image from a path
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"RIFF", b"BM", b"II*\x00", b"MM\x00*")
_BASE64 = re.compile(r"[A-Za-z0-9+/\s]+={0,2}\s*")


def image_reference(value: Any) -> Any:
    """An image reference as it is read: a ``data:`` address decoded to bytes, a ``file://`` address as
    its path, a string of base64 that holds an image (its first bytes say which) decoded; anything
    else as it is: a path, bytes, a ``datasets`` image dict, a PIL image, or a web address (which the
    row check refuses, naming the fix). Base64 may be wrapped over lines (whitespace is skipped).

    Raises:
        binascii.Error: base64 that does not decode.
    """
    if not isinstance(value, str):
        return value
    if value.startswith("data:"):
        header, _, payload = value.partition(",")
        return decode_base64(payload) if header.endswith(";base64") else urllib.parse.unquote_to_bytes(payload)
    if value.startswith("file://"):
        path = value.removeprefix("file://")
        return urllib.parse.unquote(path.removeprefix("localhost") if path.startswith("localhost/") else path)
    if len(value) >= 64 and _BASE64.fullmatch(value):
        compact = "".join(value[:200].split())[:16]
        try:
            head = base64.b64decode(compact)
        except binascii.Error:
            return value
        if head.startswith(_IMAGE_MAGIC):
            return decode_base64(value)
    return value


def decode_base64(text: str) -> bytes:
    """Base64 as bytes, whitespace skipped (MIME wraps it at 76 characters a line).

    Raises:
        binascii.Error: it does not decode.
    """
    return base64.b64decode("".join(text.split()), validate=True)


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


def carried_image(part: dict) -> Any:
    """The image an image part carries, or None (the image is then the row's ``images``).

    ``{"type": "image", "path" | "image" | "url" | "base64": ...}`` (axolotl's, transformers') and
    ``{"type": "image_url", "image_url": {"url": ...}}`` or ``{"type": "image_url", "value": ...}``
    (OpenAI's, LLaMA-Factory's). The ``base64`` key's value is decoded to bytes; anything else is
    kept as it is, and read as the ``images`` column's are (``ImagePaths``: ``data:`` and ``file://``
    addresses, base64, relative paths). A part whose key holds an empty string carries ``""``: an empty
    image path, which the row check counts.

    Raises:
        binascii.Error: base64 that does not decode.
    """
    if part.get("type") == "image_url":
        value = part.get("image_url") if part.get("image_url") is not None else part.get("value")
        if isinstance(value, dict):
            value = value.get("url")
        if value == "":
            return ""
        if not _given(value):
            raise ValueError("an 'image_url' part with no address (give image_url.url, or value)")
        key = "url"
    else:
        key = next((k for k in IMAGE_KEYS if _given(part.get(k))), None)
        if key is None:
            return "" if any(part.get(k) == "" for k in IMAGE_KEYS) else None
        value = part[key]
    if key == "base64" and isinstance(value, str) and not value.startswith("data:"):
        return decode_base64(value)
    return value


def _given(value: Any) -> bool:
    """A value a part's key holds (a ``datasets`` column fills unused keys with None)."""
    return value is not None and not (isinstance(value, (str, bytes)) and not value)


def _clean_parts(content: list) -> tuple[list[dict], list]:
    """Content parts as a ``datasets`` column holds them (every key in every part, None where unused),
    and what each image part carries (None where it carries nothing)."""
    parts, carried = [], []
    for part in content:
        if not isinstance(part, dict):
            raise ValueError(f"a content part is {type(part).__name__}, not a dict")
        kind = part.get("type")
        if kind in ("image", "image_url"):
            parts.append({"type": "image"})
            carried.append(carried_image(part))
        elif kind == "text":
            parts.append(_text(as_text(part.get("text")) or ""))
        else:
            raise ValueError(f"a content part of type {kind!r} (parts are 'image', 'image_url' or 'text')")
    return parts, carried


def _images_first(messages: list[dict], n_images: int) -> list[dict]:
    """Image parts at the start of the first user turn (The Cauldron's, and TRL's for string content)."""
    for message in messages:
        if message["role"] == "user":
            message["content"] = [{"type": "image"} for _ in range(n_images)] + message["content"]
            return messages
    if n_images:
        raise ValueError("images but no user turn to put them in")
    return messages


def _marker_messages(turns: list[tuple[str, str]], n_images: int) -> tuple[list[dict], tuple[str, str] | None]:
    """Messages from ``(role, text)`` turns whose text places the images with ``<image>`` markers."""
    markers = sum(text.count(MARKER) for _, text in turns)
    messages = [{"role": role, "content": split_markers(text)} for role, text in turns]
    if markers != n_images:
        reason = f"{markers} {MARKER} marker(s) but {n_images} image(s): give one marker per image"
        return messages, ("images_mismatch", reason)
    return messages, None


def _row_images(item: dict) -> list:
    """``images``, or one ``image`` (TRL's trainer reads a single-image column too)."""
    return as_list(item.get("images")) or as_list(item.get("image"))


def trl_messages(item: dict, cfg: Any = None) -> Converted:
    """TRL's ``messages`` and ``images`` (or one ``image``). Content is parts (image parts take the
    row's images in order, or carry their own), or strings (then markers place the images, or they
    go first)."""
    images = _row_images(item)
    raw = item.get("messages")
    if not isinstance(raw, list):
        raise ValueError("'messages' is not a list of turns")
    if all(isinstance(m.get("content"), str) for m in raw):
        turns = [(m.get("role"), m["content"]) for m in raw]
        if any(MARKER in text for _, text in turns):
            messages, problem = _marker_messages(turns, len(images))
            return Converted(messages, images, problem)
        messages = [{"role": role, "content": [_text(text)]} for role, text in turns]
        return Converted(_images_first(messages, len(images)), images)
    messages, carried = [], []
    try:
        for m in raw:
            content = m.get("content")
            parts, held = ([_text(content)], []) if isinstance(content, str) else _clean_parts(content or [])
            messages.append({"role": m.get("role"), "content": parts})
            carried += held
    except binascii.Error as err:
        return Converted([], images, ("unreadable_image", f"an image part's base64 does not decode ({err})"))
    if images:  # an image part with an empty key (a table's filler) carries nothing beside 'images'
        carried = [None if ref == "" else ref for ref in carried]
    given = [ref for ref in carried if ref is not None]
    if not given:
        return Converted(messages, images)
    if images:
        reason = (
            f"{len(given)} image part(s) carry their image and 'images' holds {len(images)} more: give each "
            "image once, in its part or in 'images'"
        )
        return Converted(messages, images, ("images_mismatch", reason))
    if len(given) < len(carried):
        reason = (
            f"{len(given)} of {len(carried)} image parts carry their image ({', '.join(IMAGE_KEYS)} or image_url) "
            "and the others do not: give every image in its part, or all of them in 'images'"
        )
        return Converted(messages, given, ("images_mismatch", reason))
    return Converted(messages, given)


def cauldron_messages(item: dict, cfg: Any = None) -> Converted:
    """The Cauldron: ``texts`` of ``{user, assistant}`` pairs, the images before the first user turn."""
    images = as_list(item.get("images"))
    texts = item.get("texts")
    if not texts:
        return Converted([], images, "empty_texts")
    messages = []
    for turn in texts:
        messages.append({"role": "user", "content": [_text(as_text(turn.get("user")) or "")]})
        messages.append({"role": "assistant", "content": [_text(as_text(turn.get("assistant")) or "")]})
    return Converted(_images_first(messages, len(images)), images)


def llava_messages(item: dict, cfg: Any = None) -> Converted:
    """LLaVA / ShareGPT ``conversations`` (``from``, ``value``; or ``role``, ``content``, as LLaMA-Factory's
    ``role_tag`` / ``content_tag`` let a file name them) or ``messages`` with ``<image>`` markers."""
    images = _row_images(item)
    if "conversations" in item and item["conversations"] is not None:
        turns = _speaker_turns(item["conversations"])
        if isinstance(turns, tuple):
            return Converted([], images, turns)
    elif isinstance(item.get("messages"), list):
        turns = [(m.get("role"), m.get("content") or "") for m in item["messages"]]
        if not all(isinstance(text, str) for _, text in turns):
            raise ValueError("messages with content parts in a llava table (they are read as format=trl)")
    else:
        raise ValueError("neither 'conversations' nor 'messages'")
    messages, problem = _marker_messages(turns, len(images))
    return Converted(messages, images, problem)


def qa_row(item: dict, cfg: Any) -> Converted:
    """A question, its answer(s) and image(s) in the columns ``data.*_column`` name; trained on the
    first answer, all of them kept for the metric."""
    missing = [c for c in (cfg.question_column, cfg.answer_column, cfg.image_column) if c not in item]
    if missing:
        return Converted([], [], ("format_mismatch", f"no column(s) {missing} (format qa)"), answers=[])
    answers, problem = answer_texts(item[cfg.answer_column], cfg.answer_column)
    try:
        question = as_text(item[cfg.question_column]) or ""
    except TypeError as err:
        problem = ("unreadable_text", f"column {cfg.question_column!r} holds {err}: give the question as text")
    images = as_list(item[cfg.image_column])
    if problem is not None and problem[0] == "missing_answer":
        # a test split's question (DocVQA test has no public answers): never trained on, but an evaluation
        # may answer it for a submission file (presets.EvalRows), so the question and images stay
        return Converted(qa_messages(question, "", None, len(images)), images, problem, answers=[])
    if problem is not None:
        return Converted([], [], problem, answers=[])
    return Converted(qa_messages(question, answers[0], None, len(images)), images, answers=answers)


# ---------------------------------------------------------------- preference pairs
def _as_turns(value: Any, role: str, column: str) -> list[dict]:
    """A prompt or a side as a list of turns: a list as it is, one turn (a dict) as a list of it, a
    string as one turn of ``role``; None as none."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, dict):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(turn, dict) for turn in value):
        return list(value)
    raise ValueError(f"{column!r} is {type(value).__name__}, not text, a turn or a list of turns")


def _pair(chosen: Converted, rejected: Converted, own_images: bool = False) -> Converted:
    """A pair from its two sides, each read as one conversation: the chosen side's problem, else the
    rejected side's (named so), else what makes the two sides untrainable together (an empty or
    identical side). ``own_images``: the rejected side shows images of its own (``rejected.images``)."""
    problem = chosen.problem
    if problem is None and rejected.problem is not None:
        kind, reason = rejected.problem if isinstance(rejected.problem, tuple) else (rejected.problem, None)
        problem = (kind, f"the rejected side: {reason}") if reason else kind
    rejected_images = rejected.images if own_images else None
    if problem is None:
        problem = sides_problem(chosen.messages, rejected.messages, chosen.images, rejected_images)
    return Converted(
        chosen.messages, chosen.images, problem, rejected=rejected.messages, rejected_images=rejected_images
    )


def _without_prompt(turns: list[dict], prompt: list[dict]) -> list[dict]:
    """A side given as the whole conversation (its prompt turns, then the answer; UltraFeedback's
    ``chosen``) as its answer turns alone."""
    return turns[len(prompt) :] if prompt and len(turns) > len(prompt) and turns[: len(prompt)] == prompt else turns


def trl_pairs(item: dict, cfg: Any = None) -> Converted:
    """TRL's preference form: ``prompt``, ``chosen``, ``rejected`` and ``images`` (or one ``image``).
    Conversational (lists of turns, content as parts or strings) or plain strings (the prompt is then
    the user turn, each side its answer); each side is read as ``trl_messages`` reads a conversation."""
    prompt = _as_turns(item.get("prompt"), "user", "prompt")
    images = {"images": item.get("images"), "image": item.get("image")}
    chosen, rejected = (
        trl_messages(
            {"messages": prompt + _without_prompt(_as_turns(item.get(key), "assistant", key), prompt), **images}
        )
        for key in ("chosen", "rejected")
    )
    return _pair(chosen, rejected)


def rlaifv_pairs(item: dict, cfg: Any = None) -> Converted:
    """RLAIF-V's own columns: ``question``, ``chosen`` and ``rejected`` answers (strings) and one
    ``image`` (before the question)."""
    question = as_text(item.get("question")) or ""
    sides = []
    for key in ("chosen", "rejected"):
        answer = as_text(item.get(key))
        turns = [{"role": "user", "content": question}]
        turns += [{"role": "assistant", "content": answer}] if answer is not None else []
        sides.append(trl_messages({"messages": turns, "images": as_list(item.get("image"))}))
    return _pair(*sides)


def _speaker_turns(turns: list[dict]) -> list[tuple[str, str]] | tuple[str, str]:
    """LLaMA-Factory's turns (``from``/``value`` or ``role``/``content``) as ``(role, text)``, or the
    problem of a turn whose speaker is not a known one."""
    out = []
    for turn in turns:
        speaker = turn.get("from") if turn.get("from") is not None else turn.get("role")
        if speaker not in SPEAKERS:
            key = "from" if turn.get("from") is not None or turn.get("role") is None else "role"
            return ("unknown_role", f"speaker {key}={speaker!r} (use one of {', '.join(sorted(SPEAKERS))})")
        text = turn.get("value") if turn.get("value") is not None else turn.get("content")
        out.append((SPEAKERS[speaker], as_text(text) or ""))
    return out


def llamafactory_pairs(item: dict, cfg: Any = None) -> Converted:
    """LLaMA-Factory's ranking form: the prompt's turns in ``conversations`` (``from``, ``value``) or
    ``messages`` (``role``, ``content``), one turn each in ``chosen`` and ``rejected``, an optional
    ``system``, and ``images`` placed by ``<image>`` markers (one per image, as LLaMA-Factory asks)."""
    images = _row_images(item)
    column = "conversations" if item.get("conversations") is not None else "messages"
    system = as_text(item.get("system"))
    sides = []
    for key in ("chosen", "rejected"):
        turns = _speaker_turns(_as_turns(item.get(column), "user", column) + _as_turns(item.get(key), "assistant", key))
        if isinstance(turns, tuple):
            return Converted([], images, turns)
        messages, problem = _marker_messages([("system", system)] * bool(system) + turns, len(images))
        sides.append(Converted(messages, images, problem))
    return _pair(*sides)


def _one_turn_sides(sample: Sequence[dict]) -> bool:
    """Whether the first rows' ``chosen`` is one turn (LLaMA-Factory's), not a list of them."""
    return any(isinstance(item.get("chosen"), dict) for item in sample)


def swift_pairs(item: dict, cfg: Any = None) -> Converted:
    """ms-swift's form: ``messages`` ending in the chosen answer and ``images`` (``<image>`` markers
    place them, or they go before the first user turn, as ms-swift adds them); the rejected side is
    ``rejected_response`` (its answer after the same prompt) or ``rejected_messages`` (its whole
    conversation, or its answer turn alone), shown ``rejected_images`` where they are given."""
    turns = item.get("messages")
    if not isinstance(turns, list):
        raise ValueError("'messages' is not a list of turns")
    images = _row_images(item)
    chosen = trl_messages({"messages": turns, "images": images})
    prompt = turns[:-1] if turns and turns[-1].get("role") == "assistant" else turns
    if item.get("rejected_messages") is not None:
        rejected_turns = _as_turns(item["rejected_messages"], "assistant", "rejected_messages")
        if all(turn.get("role") == "assistant" for turn in rejected_turns):  # the answer alone
            rejected_turns = prompt + rejected_turns
    else:
        rejected_turns = prompt + _as_turns(item.get("rejected_response"), "assistant", "rejected_response")
    own = item.get("rejected_images")
    own_images = own is not None and as_list(own) != images
    rejected = trl_messages({"messages": rejected_turns, "images": as_list(own) if own_images else images})
    return _pair(chosen, rejected, own_images)


_IMAGES_MISMATCH = "the images are not one per <image> marker or image part"

_PAIR_PROBLEMS = {
    "identical_sides": "the chosen and rejected sides are the same conversation, showing the same images",
    "empty_side": "a side has no answer, or an empty one",
    "images_mismatch": _IMAGES_MISMATCH,
}

# The formats, in the order the messages and docs list them. A table reads as the first whose columns it
# has: the pair formats first (their columns hold an SFT format's: messages, conversations, a question
# and an image), then the other specific formats, then the generic ones.
FORMATS: dict[str, Format] = {
    form.name: form
    for form in (
        Format(
            "trl",
            "messages, images",
            trl_messages,
            layouts=(Layout(("messages",), lambda sample: not _marked_messages(sample)),),
            problems={
                "images_mismatch": _IMAGES_MISMATCH,
                "unreadable_image": "an image part's base64 does not decode",
            },
            generic=True,
        ),
        Format(
            "cauldron",
            "images, texts",
            cauldron_messages,
            layouts=(Layout(("texts", "images")),),
            problems={"empty_texts": "the Cauldron row's 'texts' list is empty"},
        ),
        Format(
            "llava",
            f"conversations or messages with {MARKER} markers, image or images",
            llava_messages,
            layouts=(Layout(("conversations",)), Layout(("messages",), _marked_messages)),
            problems={"images_mismatch": _IMAGES_MISMATCH, "unknown_role": "a turn's speaker is not a known role"},
        ),
        Format(
            "qa",
            "a question, its answer(s) and an image, in the columns data.*_column name",
            qa_row,
            mapped=("question_column", "answer_column", "image_column"),
            problems={
                "missing_answer": "the answer column holds no answer",
                "unreadable_text": "the question or answer is neither text nor a number",
            },
            generic=True,
        ),
        Format(
            "trl_pairs",
            "prompt, chosen, rejected: lists of turns or strings; images or image",
            trl_pairs,
            layouts=(Layout(("prompt", "chosen", "rejected")),),
            problems={**_PAIR_PROBLEMS, "unreadable_image": "an image part's base64 does not decode"},
            pairs=True,
        ),
        Format(
            "rlaifv",
            "question, chosen, rejected, image: RLAIF-V's columns",
            rlaifv_pairs,
            layouts=(Layout(("question", "chosen", "rejected", "image")),),
            problems=_PAIR_PROBLEMS,
            pairs=True,
        ),
        Format(
            "llamafactory_pairs",
            f"conversations or messages, one chosen and one rejected turn, images with {MARKER} markers",
            llamafactory_pairs,
            layouts=(
                Layout(("conversations", "chosen", "rejected")),
                Layout(("messages", "chosen", "rejected"), _one_turn_sides),
            ),
            problems={**_PAIR_PROBLEMS, "unknown_role": "a turn's speaker is not a known role"},
            pairs=True,
        ),
        Format(
            "swift_pairs",
            "messages ending in the chosen answer, rejected_response or rejected_messages, images, rejected_images",
            swift_pairs,
            layouts=(Layout(("messages", "rejected_response")), Layout(("messages", "rejected_messages"))),
            problems={**_PAIR_PROBLEMS, "unreadable_image": "an image part's base64 does not decode"},
            pairs=True,
        ),
    )
}


def detect_format(columns: Sequence[str], sample: Sequence[dict], cfg: Any, where: str) -> str:
    """The format of a table from its columns (and its first rows: ``messages`` with ``<image>``
    markers are llava's); ``cfg`` names the columns of a format of mapped columns (qa).

    Raises:
        DataError: no format has these columns; the message names them, the formats and the key to set.
    """
    cols = set(columns)
    for form in sorted(FORMATS.values(), key=lambda form: (form.generic, not form.pairs)):
        if any(layout.fits(cols, sample) for layout in form.layouts_for(cfg)):
            return form.name
    for form in FORMATS.values():  # some of a mapped format's columns: the keys that map the others
        wanted = form.mapped_columns(cfg)
        present = [c for c in wanted if c in cols]
        if present:
            missing = [c for c in wanted if c not in cols]
            others = ", ".join(name for name in FORMATS if name != form.name)
            raise DataError(
                f"{where}: read as format {form.name} (it has {present}), it has no column(s) {missing}; its "
                f"columns are {sorted(cols)}. Map them with {_keys(form)}, or set data.format to one of {others}."
            )
    listed = ", ".join(form.described(cfg) for form in FORMATS.values())
    mapped = "".join(f", or map the {form.name} columns with {_keys(form)}" for form in FORMATS.values() if form.mapped)
    raise DataError(
        f"{where}: cannot tell the format from its columns {sorted(cols)}. The formats read are: {listed}. "
        f"Set data.format{mapped}."
    )


def _keys(form: Format) -> str:
    return " / ".join(f"data.{key}" for key in form.mapped)


def signature(fmt: str, columns: Sequence[str]) -> tuple[str, ...]:
    """The column every row of a table of ``fmt`` holds (llava: ``conversations``, or LLaMA-Factory's
    ``messages``); none for qa, whose converter checks its columns."""
    return FORMATS[fmt].signature(columns)


def to_row(
    item: dict, fmt: str, cfg: Any, origin: str, paths: ImagePaths, index: int, expected: tuple[str, ...] | None = None
) -> Row:
    """One row of ``fmt`` as a ``Row``; a row that is not of this format (or is bad) carries its problem.

    ``cfg`` is the source's data config (columns, system prompt); ``expected`` the column that the
    table's rows hold (``signature``), so that a row of another format is told apart.
    """
    form = FORMATS[fmt]
    expected = expected or form.signature(())
    if expected and not any(item.get(key) is not None for key in expected):
        present = sorted(k for k, v in item.items() if v is not None)
        return Row(
            messages=[],
            origin=origin,
            problem=("format_mismatch", f"has {present}, not the {fmt} format of the rest ({', '.join(expected)})"),
        )
    try:
        converted = form.convert(item, cfg)
    except (AttributeError, TypeError, ValueError) as err:
        return Row(messages=[], origin=origin, problem=("format_mismatch", f"not a {fmt} row: {err}"))
    messages, images, problem, answers = converted.messages, converted.images, converted.problem, converted.answers
    rejected, rejected_images = converted.rejected, converted.rejected_images
    if cfg.system_prompt:
        messages, rejected = (_with_system(m, cfg.system_prompt) for m in (messages, rejected))
    if answers is None:
        answers, unreadable = answer_texts(item.get("answers"), "answers")
        if unreadable is not None and unreadable[0] != "missing_answer":
            return Row(messages=[], origin=origin, problem=unreadable)
    if not answers:  # no reference answers given: the last assistant turn is the reference
        last = [m for m in messages if m.get("role") == "assistant"]
        answers = [message_text(last[-1])] if last else []
    qtype = item.get(cfg.type_column or "question_type")
    try:
        images = [paths(ref) for ref in images]
        rejected_images = None if rejected_images is None else [paths(ref) for ref in rejected_images]
    except binascii.Error as err:
        return Row(
            messages=[], origin=origin, problem=("unreadable_image", f"an image's base64 does not decode ({err})")
        )
    return Row(
        messages=messages,
        images=images,
        answers=as_list(answers),
        id=_row_id(item, cfg, index),
        question_type=qtype[0] if isinstance(qtype, list) and qtype else qtype,
        origin=origin,
        problem=form.problem(problem) if problem else None,
        rejected=rejected,
        rejected_images=rejected_images,
    )


def _with_system(messages: list[dict] | None, prompt: str) -> list[dict] | None:
    """``data.system_prompt`` as the first turn of a conversation that has none."""
    if not messages or any(m.get("role") == "system" for m in messages):
        return messages
    return [{"role": "system", "content": [_text(prompt)]}, *messages]


def _row_id(item: dict, cfg: Any, index: int) -> Any:
    if cfg.id_column and item.get(cfg.id_column) is not None:
        return item[cfg.id_column]
    return item["id"] if item.get("id") is not None else index


def row_options(cfg: Any) -> SimpleNamespace:
    """The keys ``to_row`` reads, as plain attributes (an OmegaConf lookup costs ~40 µs: per row, it showed)."""
    keys = ("question_column", "answer_column", "image_column", "id_column", "type_column", "system_prompt")
    return SimpleNamespace(**{key: cfg.get(key) for key in keys})


def chosen_format(cfg: Any, columns: Sequence[str], sample: Sequence[dict], where: str) -> str:
    """``data.format``, or the detected one when it is ``auto``; logged once per table.

    Raises:
        DataError: ``data.format`` names a format whose columns the table has none of (the message
            names the format its columns read as, where there is one).
    """
    given = cfg.format != "auto"
    fmt = cfg.format if given else detect_format(columns, sample, cfg, where)
    if fmt not in FORMATS:
        raise DataError(f"{where}: data.format={fmt} is not one of auto, {', '.join(FORMATS)}.")
    form = FORMATS[fmt]
    needed = form.mapped_columns(cfg) or form.signature(columns)
    if given and not set(needed) & set(columns):
        try:
            hint = f"; its columns read as format={detect_format(columns, sample, cfg, where)}: set that, or auto"
        except DataError:
            hint = ""
        raise DataError(
            f"{where}: data.format={fmt} reads the column(s) {list(needed)}, and its columns are {sorted(columns)}{hint}."
        )
    if form.pairs != bool(cfg.get("pairs", False)):
        raise DataError(_objective_mismatch(form, columns, sample, cfg, where))
    if (where, fmt) not in _LOGGED:
        _LOGGED.add((where, fmt))
        why = "data.format" if given else f"detected from its columns {sorted(columns)}"
        log.info("Data: %s reads as format=%s (%s).", where, fmt, why)
    return fmt


def _objective_mismatch(form: Format, columns: Sequence[str], sample: Sequence[dict], cfg: Any, where: str) -> str:
    """The refusal of preference pairs given to supervised fine-tuning, or of one answer a row given to
    preference tuning (``data.pairs``, set from ``objective``): the columns, the format and the fix."""
    cols = sorted(columns)
    if form.pairs:
        sft = [f.name for f in FORMATS.values() if not f.pairs and _reads_as_sft(f, cols, sample, cfg)]
        other = f", or set data.format={sft[0]} to train on its chosen conversations alone" if sft else ""
        return (
            f"{where}: its columns {cols} are preference pairs (format={form.name}: {form.columns}), and "
            f"objective=sft trains on one answer a row. Train on pairs with objective=dpo{other}."
        )
    pairs = ", ".join(name for name, f in FORMATS.items() if f.pairs)
    half = [side for side in ("chosen", "rejected") if side in cols]
    note = ""
    if len(half) == 1:
        missing = "rejected" if half == ["chosen"] else "chosen"
        note = f" It has a {half[0]!r} column and no {missing!r}: a pair gives both sides."
    return (
        f"{where}: objective=dpo trains on preference pairs, and its columns {cols} read as format={form.name}, "
        f"one answer a row.{note} Give pairs in one of the pair formats ({pairs}: docs/your-data.md#preference-pairs), "
        "or train on it with objective=sft."
    )


def _reads_as_sft(form: Format, columns: Sequence[str], sample: Sequence[dict], cfg: Any) -> bool:
    """Whether an SFT format reads a pair table's first row as a conversation that ends in an answer
    (ms-swift's ``messages`` do; LLaMA-Factory's ``conversations``, the prompt alone, do not)."""
    if not sample or not any(layout.fits(set(columns), sample) for layout in form.layouts_for(cfg)):
        return False
    try:
        converted = form.convert(sample[0], row_options(cfg))
    except (AttributeError, TypeError, ValueError):
        return False
    return converted.problem is None and bool(converted.messages) and converted.messages[-1].get("role") == "assistant"
