"""The gallery of answers a report and the trackers show: half of the picks among the wrong answers."""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Iterable, Sequence
from typing import Any

from idefics2_ft.data.images import load_image
from idefics2_ft.data.records import message_text
from idefics2_ft.metrics import right_columns

GALLERY_SIZE = 16
THUMBNAIL_PX = 160


def png_data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def thumbnail(ref: Any, size: int = THUMBNAIL_PX) -> str:
    """An image reference (path, bytes, PIL image, ``datasets`` dict) as an inline PNG, ``size`` px wide at most."""
    image = load_image(ref).copy()
    image.thumbnail((size, size))
    if image.width < size // 2:  # tiny pictures (easy-VQA's 64 px) are shown larger, pixel for pixel
        factor = size // image.width
        image = image.resize((image.width * factor, image.height * factor), resample=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return png_data_uri(buffer.getvalue())


def pick_gallery(predictions: Sequence[dict], size: int = GALLERY_SIZE, seed: int = 0) -> list[dict]:
    """Up to ``size`` predictions: half among the wrong ones (all of them if fewer), the rest right; in order."""
    rng = random.Random(seed)
    wrong = [p for p in predictions if not is_right(p)]
    right = [p for p in predictions if is_right(p)]
    n_wrong = min(len(wrong), size // 2)
    n_right = min(len(right), size - n_wrong)
    n_wrong = min(len(wrong), size - n_right)  # fewer right ones than half: more of the wrong ones
    chosen = {id(p) for p in rng.sample(wrong, n_wrong) + rng.sample(right, n_right)}
    return [p for p in predictions if id(p) in chosen]


def is_right(p: dict) -> bool:
    """An exact answer (a full score in a column the metrics table marks ``marks_right``: ``accuracy``),
    or a full score by the source's metric ("Answer: B" names option B)."""
    return any(p[column] >= 1.0 for column in right_columns()) or p.get("score", 0.0) >= 1.0


def _question(row) -> str:
    users = [m for m in row.messages if m.get("role") == "user"]
    return message_text(users[-1]) if users else ""


def gallery_cards(predictions: Sequence[dict], rows: Iterable, size: int = GALLERY_SIZE) -> list[dict]:
    """The gallery's picks with their record (None if not found) and their text: question,
    prediction, references, right or wrong, question type."""
    by_id = {f"{row.source}/{row.id}" if row.source else str(row.id): row for row in rows}
    cards = []
    for p in pick_gallery(predictions, size):
        row = by_id.get(str(p["id"]))
        references = p.get("references", p.get("answers", []))
        cards.append(
            {
                "p": p,
                "row": row,
                "question": _question(row) if row is not None else "?",
                "prediction": str(p["prediction"]),
                "reference": " | ".join(map(str, references)),
                "right": is_right(p),
                "type": str(p.get("question_type") or ""),
            }
        )
    return cards


def gallery_items(predictions: Sequence[dict], rows: Iterable, size: int = GALLERY_SIZE) -> list[dict]:
    """The gallery's picks as plain values for a tracker: the first image (a thumbnail, or None),
    question, prediction, references, right or wrong, question type."""
    items = []
    for card in gallery_cards(predictions, rows, size):
        row, image = card.pop("row"), None
        card.pop("p")
        if row is not None and row.images:
            try:
                image = load_image(row.images[0]).convert("RGB").copy()
                image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            except Exception:  # an unreadable image leaves its cell empty
                image = None
        items.append({"image": image, **card})
    return items
