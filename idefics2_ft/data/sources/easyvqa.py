"""easy-VQA, shipped in the ``easy-vqa`` package: 64-px pictures of one coloured shape, questions about them."""

from __future__ import annotations

from idefics2_ft.data.records import DataError, Row, qa_messages

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
