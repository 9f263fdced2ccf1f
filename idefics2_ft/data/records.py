"""What flows from a source to the collator: a row (cheap references), and what is wrong with a bad one.

A row holds its images as references and its conversation in the transformers chat format::

    {"role": "system" | "user" | "assistant",
     "content": [{"type": "image"}, {"type": "text", "text": "..."}]}

A preference *pair* is a row with ``rejected`` set: ``messages`` is the chosen side's conversation
and ``rejected`` the rejected side's (for most formats the same prompt turns, then the rejected
answer); each side's last turn is its answer. ``rejected_images`` is None when the rejected side
shows the chosen side's images, or the rejected side's own (ms-swift's ``rejected_images``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Row:
    """One source row: images as references (path, bytes, dict or PIL image) and the conversation."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # all references, for validation metrics
    id: Any = None
    question_type: str | None = None
    origin: str | None = None  # where it came from, for messages: "file.jsonl:12", "dataset[split] row 7"
    source: str | None = None  # its source's name in a mixture (data.mixture[].name)
    problem: tuple[str, str] | None = None  # (kind, reason) found while reading it: it cannot be trained on
    # a preference pair: the rejected side's whole conversation (``messages`` is the chosen side's)
    rejected: list[dict] | None = None
    rejected_images: list[Any] | None = None  # None: the rejected side shows ``images``; else its own


def qa_messages(question: str, answer: str, system_prompt: str | None = None, n_images: int = 1) -> list[dict]:
    """A single-turn visual question: images first, then the question; the answer as the assistant turn."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    user = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


@dataclass  # not frozen: Lightning rebuilds dataclasses when it moves a batch to the device
class BadSample:
    """A record that cannot be trained on, with its dataset index and the reason."""

    index: int
    reason: str
    kind: str = "other"  # a short key for counting: missing_image, empty_answer, too_long, ...
    origin: str | None = None  # where the record came from: "train.jsonl:12", "easy-vqa[test] question 7"
    source: str | None = None  # its source's name in a mixture

    def where(self) -> str:
        where = self.origin or f"record {self.index}"
        return f"source {self.source}: {where}" if self.source else where


class DataError(ValueError):
    """The data cannot be read as configured: the message names the file (and line) and the fix."""


class BadSampleError(DataError):
    """Raised for a bad record when ``data.on_bad_sample=raise``."""


def message_text(message: dict) -> str:
    """The text of one message (its text parts joined; images left out)."""
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def count_images(messages: list[dict]) -> int:
    """How many ``{"type": "image"}`` placeholders the messages hold."""
    return sum(
        1 for m in messages if isinstance(m.get("content"), list) for c in m["content"] if c.get("type") == "image"
    )


ROLES = ("system", "user", "assistant")
# Idefics2's image token as text: the processor and the collator expand each one into an image's tokens
IMAGE_TOKEN = "<image>"
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(ref: Any) -> bool:
    """An image given as an address of a scheme other than ``file://`` (``https://``, ``s3://``,
    ``ftp://``, ...): they are not fetched, images must be local."""
    return isinstance(ref, str) and _URL.match(ref) is not None and not ref.startswith("file://")


def is_empty_image(ref: Any) -> bool:
    """An image reference that names nothing: None, ``""``, or a ``datasets`` image dict with neither
    bytes nor a path."""
    if isinstance(ref, dict):
        return not ref.get("bytes") and not ref.get("path")
    return ref is None or (isinstance(ref, (str, bytes)) and not ref)


def check_row(row: Row) -> tuple[str, str] | None:
    """What makes a row untrainable, as ``(kind, reason)``, or None if it is fine (images not opened).
    A pair is checked on both sides: ``empty_side`` and ``identical_sides`` before the rest."""
    if row.problem:
        return row.problem
    unknown = sorted({str(m.get("role")) for m in row.messages if m.get("role") not in ROLES})
    if unknown:
        return "unknown_role", f"unknown role(s) {unknown}: use one of {', '.join(ROLES)}"
    if row.rejected is not None:
        problem = sides_problem(row.messages, row.rejected, row.images, row.rejected_images)
        if problem:
            return problem
    assistant = [m for m in row.messages if m.get("role") == "assistant"]
    if not assistant:
        return "no_assistant_turn", "no assistant turn"
    if any(not message_text(m).strip() for m in assistant):
        return "empty_answer", "empty assistant answer"
    problem = _marker_problem(row.messages) or _refs_problem(row.images)
    problem = problem or _images_problem(row.messages, row.images)
    if problem is None and row.rejected is not None:
        images = row.images if row.rejected_images is None else row.rejected_images
        side = "the rejected side: "
        problem = _marker_problem(row.rejected, side) or _refs_problem(images, side)
        problem = problem or _images_problem(row.rejected, images, side)
    return problem


def _marker_problem(messages: list[dict], side: str = "") -> tuple[str, str] | None:
    """A literal ``<image>`` in a turn's text (``marker_in_text``): the collator would expand it into
    an image's tokens with no image behind them, and the model stops the run mid-fit (``Image
    features and image tokens do not match``)."""
    for number, message in enumerate(messages, 1):
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        for part in parts:
            text = part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None
            if isinstance(text, str) and IMAGE_TOKEN in text:
                return "marker_in_text", (
                    f"{side}turn {number} ({message.get('role')}) holds a literal {IMAGE_TOKEN} in its text "
                    f"({_snippet(text)}), which Idefics2 would read as an image with no picture behind it. "
                    f"Remove it from the text: an image is placed by an {{'type': 'image'}} part (or goes before "
                    f"the question); strings that place their images with {IMAGE_TOKEN} markers, one per image, "
                    "are read as such when every turn's content is a string (format=llava, or trl)"
                )
    return None


def _refs_problem(images: list, side: str = "") -> tuple[str, str] | None:
    """An image given as a web address (``image_url``) or as nothing at all (``missing_image``)."""
    urls = [ref for ref in images if is_url(ref)]
    if urls:
        return "image_url", f"{side}image URLs are not fetched ({urls[0]}): download the image and give its local path"
    empty = [number for number, ref in enumerate(images, 1) if is_empty_image(ref)]
    if empty:
        return "missing_image", (
            f"{side}empty image path (image {empty[0]} of {len(images)} is {images[empty[0] - 1]!r}): give each "
            "image's path, or leave the image and its placeholder out"
        )
    return None


def _images_problem(messages: list[dict], images: list, side: str = "") -> tuple[str, str] | None:
    placeholders = count_images(messages)
    if placeholders > len(images):
        return "too_many_placeholders", f"{side}{placeholders} image placeholders but {len(images)} images"
    if placeholders < len(images):  # the extra images would be dropped without a word
        return (
            "too_many_images",
            f"{side}{len(images)} images but {placeholders} image placeholders: add one {{'type': 'image'}} per image",
        )
    return None


def final_answer(messages: list[dict]) -> str | None:
    """The text of a conversation's last turn when it is an assistant's (a side's answer), else None."""
    if not messages or messages[-1].get("role") != "assistant":
        return None
    return message_text(messages[-1])


def sides_problem(
    chosen: list[dict], rejected: list[dict], images: list, rejected_images: list | None
) -> tuple[str, str] | None:
    """What makes a pair's two sides untrainable together: a side's unknown role, a side without an
    answer (``empty_side``), or two sides that are the same conversation showing the same images
    (``identical_sides``: its loss would teach nothing)."""
    unknown = sorted({str(m.get("role")) for m in rejected if m.get("role") not in ROLES})
    if unknown:
        return "unknown_role", f"the rejected side has unknown role(s) {unknown}: use one of {', '.join(ROLES)}"
    answers = {}
    for side, messages in (("chosen", chosen), ("rejected", rejected)):
        answer = final_answer(messages)
        if answer is None or not answer.strip():
            what = "no answer (its last turn is not the assistant's)" if answer is None else "an empty answer"
            return "empty_side", f"the {side} side has {what}: a pair needs both answers"
        answers[side] = answer.strip()
    same = answers["chosen"] == answers["rejected"] and chosen[:-1] == rejected[:-1]
    if same and (rejected_images is None or list(rejected_images) == list(images)):
        return "identical_sides", f"the chosen and rejected sides are the same ({_short(answers['chosen'])})"
    return None


def _short(text: str) -> str:
    return repr(text) if len(text) <= 40 else repr(text[:37] + "...")


def _snippet(text: str) -> str:
    """The text around its first ``<image>``, quoted."""
    at = text.index(IMAGE_TOKEN)
    start, end = max(0, at - 20), at + len(IMAGE_TOKEN) + 20
    return repr(("..." if start else "") + text[start:end] + ("..." if end < len(text) else ""))
