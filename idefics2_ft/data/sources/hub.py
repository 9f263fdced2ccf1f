"""A Hub dataset (or a local ``datasets`` folder) with question, answer(s) and image columns; DocVQA too."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig

from idefics2_ft.data.records import DataError, Row, qa_messages


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
