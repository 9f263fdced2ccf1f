"""easy-VQA, shipped in the ``easy-vqa`` package: 64-px pictures of one coloured shape, questions about them."""

from __future__ import annotations

from typing import Any

from idefics2_ft.data.records import DataError, Row, qa_messages
from idefics2_ft.data.sources.base import SourceKind

EASYVQA_SHAPES = frozenset({"circle", "rectangle", "triangle"})


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


class EasyVQA(SourceKind):
    """``data.source=easyvqa``: the package's splits ``train`` and ``test``; nothing to configure."""

    name = "easyvqa"
    about = "easy-VQA, shipped in the easy-vqa package (splits train and test)"
    SPLITS = ("train", "test")

    def rows(self, d: Any, split_key: str) -> list[Row]:
        return easyvqa_rows(d[self.split_key(split_key)], d.system_prompt)

    def for_split(self, d: Any, split: str) -> dict[str, Any]:
        if split not in self.SPLITS:
            raise DataError(f"data.split={split}: easy-VQA ships the splits {' and '.join(self.SPLITS)}.")
        return {"val_split": split}

    def fingerprint(self, d: Any) -> dict[str, Any]:
        from importlib.metadata import version

        return {"easy-vqa": version("easy-vqa")}
