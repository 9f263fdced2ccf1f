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

from idefics2_ft.data.collator import BadSample, BadSampleError, DataError, count_images, message_text

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
    origin: str | None = None  # where it came from, for messages: "file.jsonl:12", "dataset[split] row 7"


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
        raise DataError(f"data.train_split / data.val_split={split!r}: easy-VQA ships 'train' and 'test'.")
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    return [
        Row(
            messages=qa_messages(q, a, system_prompt),
            images=[paths[i]],
            answers=[a],
            id=f"{split}-{n}",
            question_type=easyvqa_question_type(a),
            origin=f"easy-vqa[{split}] question {n}",
        )
        for n, (q, a, i) in enumerate(zip(questions, answers, image_ids, strict=True))
    ]


def jsonl_rows(path: str) -> list[Row]:
    """One record per line; ``images`` are paths relative to the file's folder (or absolute)."""
    folder = Path(path).resolve().parent
    rows = []
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
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
                    origin=f"{path}:{line_no}",
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
        self.single_split = False  # a folder holding one split serves whichever split is asked for
        if Path(path).is_dir() and (Path(path) / "dataset_info.json").is_file():
            dataset = datasets.load_from_disk(path)
            self.single_split = True
        elif Path(path).is_dir() and (Path(path) / "dataset_dict.json").is_file():
            dataset = datasets.load_from_disk(path)
        else:
            dataset = datasets.load_dataset(path, data_cfg.name, split=split)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise DataError(
                    f"dataset {path!r} has no split {split!r}; its splits are {sorted(dataset)}. "
                    "Set data.train_split / data.val_split to one of them."
                )
            dataset = dataset[split]
        needed = [data_cfg.question_column, data_cfg.answer_column, data_cfg.image_column]
        missing = [c for c in needed if c not in dataset.column_names]
        if missing:
            raise DataError(
                f"dataset {path!r} split {split!r} has no column(s) {missing}; it has {dataset.column_names}. "
                "Map them with data.question_column / data.answer_column / data.image_column."
            )
        self.dataset = dataset.cast_column(data_cfg.image_column, datasets.Image(decode=False))
        self.cfg = data_cfg
        self.origin = f"{path}[{split}]"

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
            origin=f"{self.origin} row {index}",
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
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """A faithful 8-bit RGB image from any mode Pillow opens.

    ``convert("RGB")`` clips 16- and 32-bit grayscale (``I;16``, ``I``) to 0..255, which turns a
    16-bit scan almost white, and drops transparency onto whatever colour hides under it. Here
    integer images are scaled from their bit depth, float images from [0, 1], and transparent
    pixels are laid on white (the paper a document is printed on).
    """
    import numpy as np

    mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        peak = values.max(initial=0)
        # I;16 is 16-bit; "I" holds 32-bit integers: scaled from the smallest depth that fits them
        # (8-bit values stored as "I" stay as they are)
        top = (
            65535.0 if mode.startswith("I;16") else 255.0 if peak <= 255 else 65535.0 if peak <= 65535 else 2.0**31 - 1
        )
        return Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "LAB":  # Pillow's convert("RGB") misreads LAB; a colour transform does it right
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        return ImageCms.applyTransform(image, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    if mode in ("La", "RGBa"):  # premultiplied alpha: un-premultiply first
        image, mode = image.convert("LA" if mode == "La" else "RGBA"), "LA" if mode == "La" else "RGBA"
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if mode == "RGB" else image.convert("RGB")


ROLES = ("system", "user", "assistant")


def check_row(row: Row) -> tuple[str, str] | None:
    """What makes a row untrainable, as ``(kind, reason)``, or None if it is fine (images not opened)."""
    unknown = sorted({str(m.get("role")) for m in row.messages if m.get("role") not in ROLES})
    if unknown:
        return "unknown_role", f"unknown role(s) {unknown}: use one of {', '.join(ROLES)}"
    assistant = [m for m in row.messages if m.get("role") == "assistant"]
    if not assistant:
        return "no_assistant_turn", "no assistant turn"
    if any(not message_text(m).strip() for m in assistant):
        return "empty_answer", "empty assistant answer"
    placeholders = count_images(row.messages)
    if placeholders > len(row.images):
        return "too_many_placeholders", f"{placeholders} image placeholders but {len(row.images)} images"
    if placeholders < len(row.images):  # the extra images would be dropped without a word
        return (
            "too_many_images",
            f"{len(row.images)} images but {placeholders} image placeholders: add one {{'type': 'image'}} per image",
        )
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
        origin = row.origin or f"record {index}"
        problem = check_row(row)
        if problem:
            return BadSample(index, problem[1], problem[0], origin)
        try:
            images = [load_image(ref) for ref in row.images]
        except FileNotFoundError as err:
            return BadSample(index, f"image not found: {err.filename}", "missing_image", origin)
        except Exception as err:  # PIL raises many types for a corrupt file
            return BadSample(index, f"unreadable image: {type(err).__name__}: {err}", "unreadable_image", origin)
        return {
            "index": index,
            "origin": origin,
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
    raise DataError(f"data.source={data_cfg.source!r} is not one of easyvqa, docvqa, jsonl, hub.")


def check_sources(data_cfg: DictConfig) -> dict[str, int]:
    """Read both splits and check every record before anything trains (stage 1 included).

    Reading parses the files (a bad JSON or non-UTF-8 line, a missing split fail here, with the file
    and line); checking applies ``check_row`` and looks for image files on disk, without opening
    them. Returns the bad records per ``<split>/<kind>``.

    Raises:
        BadSampleError: with ``data.on_bad_sample=raise``, at the first bad record, naming where it is.
    """
    counts: dict[str, int] = {}
    for split_key, limit in (("train", data_cfg.max_train_samples), ("val", data_cfg.max_val_samples)):
        rows = build_rows(data_cfg, split_key)
        for index in range(len(rows) if limit is None else min(limit, len(rows))):
            row = rows[index]
            problem = check_row(row)
            missing = [ref for ref in row.images if isinstance(ref, str) and not Path(ref).is_file()]
            if problem is None and missing:
                problem = ("missing_image", f"image not found: {missing[0]}")
            if problem is None:
                continue
            if data_cfg.on_bad_sample == "raise":
                where = row.origin or f"{split_key} record {index}"
                raise BadSampleError(f"{where}: {problem[1]} (set data.on_bad_sample=skip to skip such records)")
            key = f"{split_key}/{problem[0]}"
            counts[key] = counts.get(key, 0) + 1
    if counts:
        log.warning("Data check: %d bad record(s) will be skipped: %s", sum(counts.values()), counts)
    return counts
