"""What flows from a source to the collator: a row (cheap references), and what is wrong with a bad one.

A row holds its images as references and its conversation in the transformers chat format::

    {"role": "system" | "user" | "assistant",
     "content": [{"type": "image"}, {"type": "text", "text": "..."}]}
"""

from __future__ import annotations

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


def is_url(ref: Any) -> bool:
    """An image given as a web address (they are not fetched: images must be local)."""
    return isinstance(ref, str) and ref.startswith(("http://", "https://"))


def check_row(row: Row) -> tuple[str, str] | None:
    """What makes a row untrainable, as ``(kind, reason)``, or None if it is fine (images not opened)."""
    if row.problem:
        return row.problem
    unknown = sorted({str(m.get("role")) for m in row.messages if m.get("role") not in ROLES})
    if unknown:
        return "unknown_role", f"unknown role(s) {unknown}: use one of {', '.join(ROLES)}"
    assistant = [m for m in row.messages if m.get("role") == "assistant"]
    if not assistant:
        return "no_assistant_turn", "no assistant turn"
    if any(not message_text(m).strip() for m in assistant):
        return "empty_answer", "empty assistant answer"
    urls = [ref for ref in row.images if is_url(ref)]
    if urls:
        return "image_url", f"image URLs are not fetched ({urls[0]}): download the image and give its local path"
    placeholders = count_images(row.messages)
    if placeholders > len(row.images):
        return "too_many_placeholders", f"{placeholders} image placeholders but {len(row.images)} images"
    if placeholders < len(row.images):  # the extra images would be dropped without a word
        return (
            "too_many_images",
            f"{len(row.images)} images but {placeholders} image placeholders: add one {{'type': 'image'}} per image",
        )
    return None
