"""Sources -> conversation records.

A source yields *rows*: cheap references (question, answers, an image reference). ``RecordDataset``
turns a row into a record when it is indexed, so images load lazily, one at a time, and a bad row
becomes a counted ``BadSample`` instead of a crash.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import Dataset

from idefics2_ft.data.collator import BadSample, count_images, message_text

log = logging.getLogger(__name__)

EASYVQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


@dataclass
class Row:
    """One source row: images as references (path, bytes, dict or PIL image) and the conversation."""

    messages: list[dict]
    images: list[Any] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # all references, for validation metrics
    id: Any = None
    question_type: str | None = None


def qa_messages(question: str, answer: str, system_prompt: str | None = None, n_images: int = 1) -> list[dict]:
    """A single-turn visual question: images first, then the question; the answer as the assistant turn."""
    messages = []
    if system_prompt:
        messages.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    user = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": question}]
    messages.append({"role": "user", "content": user})
    messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def easyvqa_question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in EASYVQA_SHAPES else "color"


def easyvqa_rows(split: str, system_prompt: str | None = None) -> list[Row]:
    """The ``easy-vqa`` package's questions (splits ``train`` and ``test``, as shipped)."""
    import easy_vqa

    if split not in ("train", "test"):
        raise ValueError(f"data.train_split / data.val_split={split!r}: easy-VQA ships 'train' and 'test'.")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [
        Row(
            messages=qa_messages(q, a, system_prompt),
            images=[paths[i]],
            answers=[a],
            id=f"{split}-{n}",
            question_type=easyvqa_question_type(a),
        )
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def jsonl_rows(path: str) -> list[Row]:
    """One record per line; ``images`` are paths relative to the file's folder (or absolute)."""
    folder = Path(path).resolve().parent
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg}).") from err
            images = [str(folder / p) if isinstance(p, str) else p for p in obj.get("images", [])]
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
                )
            )
    return rows


class HubRows(Sequence):
    """Rows of a Hub (or local ``datasets``) dataset with question / answer(s) / image columns.

    Images stay undecoded until a row is read. DocVQA is this with its own column names.
    """

    def __init__(self, data_cfg: DictConfig, split: str) -> None:
        import datasets

        path = data_cfg.path
        if Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(path)
        elif Path(path).is_dir() and (Path(path) / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(path)[split]
        else:
            dataset = datasets.load_dataset(path, data_cfg.name, split=split)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        needed = [data_cfg.question_column, data_cfg.answer_column, data_cfg.image_column]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise ValueError(
                f"dataset {path!r} split {split!r} has no column(s) {missing}; it has {dataset.column_names}. "
                "Map them with data.question_column / data.answer_column / data.image_column."
            )
        self.dataset = dataset.cast_column(data_cfg.image_column, datasets.Image(decode=False))
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Row:  # type: ignore[override]
        item = self.dataset[int(index)]
        c = self.cfg
        answers = item[c.answer_column]
        answers = [answers] if isinstance(answers, str) else list(answers or [])
        image = item[c.image_column]
        images = image if isinstance(image, list) else [image]
        qtype = item.get(c.type_column) if c.type_column else None
        if isinstance(qtype, list):
            qtype = qtype[0] if qtype else None
        return Row(
            # train on the first reference answer; all of them are kept for ANLS
            messages=qa_messages(item[c.question_column], answers[0] if answers else "", c.system_prompt, len(images)),
            images=images,
            answers=answers,
            id=item.get(c.id_column) if c.id_column else index,
            question_type=qtype,
        )


def load_image(ref: Any) -> Image.Image:
    """Open an image reference: a PIL image, a path, bytes, or a ``datasets`` image dict."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, dict):
        if ref.get("bytes"):
            ref = ref["bytes"]
        elif ref.get("path"):
            ref = ref["path"]
        else:
            raise ValueError("image dict holds neither bytes nor a path")
    if isinstance(ref, (bytes, bytearray)):
        ref = io.BytesIO(ref)
    image = Image.open(ref)
    image.load()
    return image.convert("RGB")


def check_row(row: Row) -> tuple[str, str] | None:
    """What makes a row untrainable, as ``(kind, reason)``, or None if it is fine (images not opened)."""
    assistant = [m for m in row.messages if m.get("role") == "assistant"]
    if not assistant:
        return "no_assistant_turn", "no assistant turn"
    if any(not message_text(m).strip() for m in assistant):
        return "empty_answer", "empty assistant answer"
    placeholders = count_images(row.messages)
    if placeholders > len(row.images):
        return "too_many_placeholders", f"{placeholders} image placeholders but {len(row.images)} images"
    return None


class RecordDataset(Dataset):
    """Rows -> records, opening images only when a record is read.

    A row that cannot be a record becomes a ``BadSample`` (the collator skips and counts it, or
    raises, by ``data.on_bad_sample``).
    """

    def __init__(self, rows: Sequence[Row], limit: int | None = None, transform: Callable | None = None) -> None:
        self.rows = rows
        self.length = len(rows) if limit is None else min(limit, len(rows))
        self.transform = transform

    def __len__(self) -> int:
        return self.length

    def row(self, index: int) -> Row:
        return self.rows[index]

    def __getitem__(self, index: int) -> dict | BadSample:
        row = self.rows[index]
        problem = check_row(row)
        if problem:
            return BadSample(index, problem[1], problem[0])
        try:
            images = [load_image(ref) for ref in row.images]
        except FileNotFoundError as err:
            return BadSample(index, f"image not found: {err.filename}", "missing_image")
        except Exception as err:  # PIL raises many types for a corrupt file
            return BadSample(index, f"unreadable image: {type(err).__name__}: {err}", "unreadable_image")
        return {
            "index": index,
            "images": images,
            "messages": row.messages,
            "answers": row.answers,
            "id": row.id,
            "question_type": row.question_type,
        }


def build_rows(data_cfg: DictConfig, split_key: str) -> Sequence[Row]:
    """The rows of ``data.train_split`` (``split_key="train"``) or ``data.val_split`` (``"val"``)."""
    split = data_cfg.train_split if split_key == "train" else data_cfg.val_split
    if data_cfg.source == "easyvqa":
        return easyvqa_rows(split, data_cfg.system_prompt)
    if data_cfg.source == "jsonl":
        return jsonl_rows(data_cfg.train_file if split_key == "train" else data_cfg.val_file)
    if data_cfg.source in ("docvqa", "hub"):
        return HubRows(data_cfg, split)
    raise ValueError(f"data.source={data_cfg.source!r} is not one of easyvqa, docvqa, jsonl, hub.")
