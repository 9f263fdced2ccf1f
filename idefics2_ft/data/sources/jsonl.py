"""Our JSONL: one conversation a line, ``{"images": [...], "messages": [...], "answers": [...]}``."""

from __future__ import annotations

import json
from pathlib import Path

from idefics2_ft.data.records import DataError, Row, is_url, message_text


def jsonl_rows(path: str) -> list[Row]:
    """One record per line; ``images`` are paths relative to the file's folder (or absolute)."""
    folder = Path(path).resolve().parent
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")  # a BOM, as some editors write
            except UnicodeDecodeError as err:
                raise DataError(
                    f"{path}:{line_no}: not UTF-8 (byte {raw[err.start]:#04x} at column {err.start + 1}); "
                    "save the file as UTF-8."
                ) from err
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
            images = [str(folder / p) if isinstance(p, str) and not is_url(p) else p for p in obj.get("images", [])]
            messages = obj.get("messages", [])
            answers = obj.get("answers")
            if answers is None:
                last = [m for m in messages if m.get("role") == "assistant"]
                answers = [message_text(last[-1])] if last else []
            rows.append(
                Row(
                    messages=messages,
                    images=images,
                    answers=list(answers),
                    id=obj.get("id", line_no),
                    question_type=obj.get("question_type"),
                    origin=f"{path}:{line_no}",
                )
            )
    return rows
