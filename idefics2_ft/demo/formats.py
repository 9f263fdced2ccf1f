"""Small local copies of the data formats people hold, written from easy-VQA's pictures and questions.

Each writer lays its rows out as the real thing does, so that the reading code is the one a user's
data meets: The Cauldron's parquet repository (one configuration per subset, ``images`` and
``texts``), TRL's ``messages`` + ``images`` (``save_to_disk`` and parquet), LLaVA's JSON array with
``<image>`` markers and relative image paths, and LLaMA-Factory's JSONL; and the preference pairs of
TRL, RLAIF-V, LLaMA-Factory and ms-swift (the rejected side a wrong answer). Used by the tests, the
``cauldron_qlora`` CPU run and ``make bench-mixed``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

SHAPES = ("circle", "rectangle", "triangle")
SIDES = {"circle": "0", "rectangle": "4", "triangle": "3"}


def easyvqa_items(split: str = "train", limit: int | None = None) -> list[dict]:
    """easy-VQA's questions as ``{question, answer, image (path), shape, color}``, one per image."""
    import easy_vqa

    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()
    by_image: dict[int, dict] = {}
    for q, a, i in zip(questions, answers, image_ids, strict=True):
        item = by_image.setdefault(i, {"image": paths[i], "questions": []})
        item["questions"].append((q, a))
        if a in SHAPES:
            item["shape"] = a
        elif a not in ("yes", "no"):
            item["color"] = a
    items = [
        {"image": v["image"], "question": v["questions"][0][0], "answer": v["questions"][0][1], **v}
        for _, v in sorted(by_image.items())
        if "shape" in v and "color" in v
    ]
    return items[:limit] if limit is not None else items


def _png(path: str) -> bytes:
    return Path(path).read_bytes()


# ---------------------------------------------------------------- The Cauldron
def cauldron_texts(subset: str, item: dict) -> list[dict]:
    """One row's ``texts`` in the subset's style (a question and its answer; ai2d lists choices)."""
    if subset == "ai2d":
        letter = "ABC"[SHAPES.index(item["shape"])]
        choices = "\n".join(f"{'ABC'[i]}. {s}" for i, s in enumerate(SHAPES))
        user = f"Question: What shape is in the image?\nChoices:\n{choices}\nAnswer with the letter."
        return [{"user": user, "assistant": f"Answer: {letter}", "source": "AI2D"}]
    if subset == "chartqa":
        return [
            {"user": "How many corners does the shape have?", "assistant": SIDES[item["shape"]], "source": "ChartQA"}
        ]
    if subset == "textvqa":
        return [{"user": "What color is the shape?", "assistant": item["color"], "source": "TextVQA"}]
    q, a = item["questions"][0]
    return [{"user": q, "assistant": a, "source": subset}]


def cauldron_features():
    """The Cauldron's columns, as its parquet files declare them: ``images`` and ``texts``."""
    import datasets

    turn = {"user": datasets.Value("string"), "assistant": datasets.Value("string"), "source": datasets.Value("string")}
    return datasets.Features({"images": datasets.List(datasets.Image()), "texts": datasets.List(turn)})


def write_cauldron(
    folder: str | Path, subsets: tuple[str, ...] = ("docvqa", "chartqa", "ai2d", "textvqa"), rows: int = 48
) -> Path:
    """A local copy of HuggingFaceM4/the_cauldron's layout: ``<subset>/train-*.parquet`` and a README
    whose ``configs`` name each subset, so ``load_dataset(folder, subset)`` reads it as the Hub copy."""
    import datasets

    folder = Path(folder)
    features = datasets.Features(
        {
            "images": datasets.List(datasets.Image()),
            "texts": datasets.List(
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ),
        }
    )
    items = easyvqa_items("train")
    configs = []
    for k, subset in enumerate(subsets):
        chosen = [items[(k * rows + i) % len(items)] for i in range(rows)]
        table = datasets.Dataset.from_dict(
            {
                "images": [[{"bytes": _png(it["image"]), "path": None}] for it in chosen],
                "texts": [cauldron_texts(subset, it) for it in chosen],
            },
            features=features,
        )
        (folder / subset).mkdir(parents=True, exist_ok=True)
        table.to_parquet(str(folder / subset / "train-00000-of-00001.parquet"))
        configs.append(f"- config_name: {subset}\n  data_files:\n  - split: train\n    path: {subset}/train-*")
    # the demo's fixtures: files it names itself, in a folder the caller made for them
    (folder / "README.md").write_text("---\nconfigs:\n" + "\n".join(configs) + "\n---\n# A local Cauldron copy\n")
    return folder


# ---------------------------------------------------------------- TRL
def trl_rows(items: list[dict], string_content: bool = False) -> dict[str, list]:
    """TRL's conversational columns: ``messages`` (content parts, or strings) and ``images`` (bytes)."""
    messages = []
    for it in items:
        if string_content:
            user = {"role": "user", "content": it["question"]}
            answer = {"role": "assistant", "content": it["answer"]}
        else:
            user = {
                "role": "user",
                "content": [{"type": "image", "text": None}, {"type": "text", "text": it["question"]}],
            }
            answer = {"role": "assistant", "content": [{"type": "text", "text": it["answer"]}]}
        messages.append([user, answer])
    return {"messages": messages, "images": [[{"bytes": _png(it["image"]), "path": None}] for it in items]}


def write_trl(folder: str | Path, rows: int = 48, kind: str = "save_to_disk", string_content: bool = False) -> Path:
    """A TRL dataset with ``train`` and ``test`` splits: a ``save_to_disk`` folder, or parquet files."""
    import datasets

    folder = Path(folder)
    splits = {
        "train": datasets.Dataset.from_dict(trl_rows(easyvqa_items("train", rows), string_content)),
        "test": datasets.Dataset.from_dict(trl_rows(easyvqa_items("test", max(rows // 4, 4)), string_content)),
    }
    splits = {k: v.cast_column("images", datasets.List(datasets.Image())) for k, v in splits.items()}
    if kind == "save_to_disk":
        datasets.DatasetDict(splits).save_to_disk(str(folder))
    else:
        folder.mkdir(parents=True, exist_ok=True)
        for name, split in splits.items():
            split.to_parquet(str(folder / f"{name}.parquet"))
    return folder


# ---------------------------------------------------------------- LLaVA / ShareGPT, LLaMA-Factory
def _copy_images(items: list[dict], folder: Path) -> list[str]:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for it in items:
        name = f"images/{Path(it['image']).name}"
        shutil.copyfile(it["image"], folder / name)
        names.append(name)
    return names


def write_llava(folder: str | Path, rows: int = 48, split: str = "train") -> Path:
    """LLaVA's JSON array: ``image`` relative to the file, ``conversations`` with a ``<image>`` marker."""
    folder = Path(folder)
    items = easyvqa_items(split, rows)
    names = _copy_images(items, folder)
    data = [
        {
            "id": f"{split}-{i}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"<image>\n{it['question']}"},
                {"from": "gpt", "value": it["answer"]},
            ],
        }
        for i, (it, name) in enumerate(zip(items, names, strict=True))
    ]
    path = folder / f"llava_{split}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def write_llamafactory(folder: str | Path, rows: int = 48, split: str = "train") -> Path:
    """LLaMA-Factory's sharegpt variant as JSONL: ``messages`` with string content and markers, ``images``."""
    folder = Path(folder)
    items = easyvqa_items(split, rows)
    names = _copy_images(items, folder)
    path = folder / f"llamafactory_{split}.jsonl"
    with open(path, "w") as f:
        for it, name in zip(items, names, strict=True):
            row = {
                "messages": [
                    {"role": "user", "content": f"<image>{it['question']}"},
                    {"role": "assistant", "content": it["answer"]},
                ],
                "images": [name],
            }
            f.write(json.dumps(row) + "\n")
    return path


# ---------------------------------------------------------------- preference pairs
COLORS = ("black", "blue", "brown", "gray", "green", "red", "teal", "yellow")


def wrong_answer(answer: str) -> str:
    """An easy-VQA answer that is wrong for the question ``answer`` answers: the next shape or colour,
    or the other of yes and no (the rejected side of the demo's pairs)."""
    for values in (SHAPES, COLORS, ("yes", "no")):
        if answer in values:
            return values[(values.index(answer) + 1) % len(values)]
    return "no" if answer != "no" else "yes"


def trl_pair_rows(items: list[dict]) -> dict[str, list]:
    """TRL's conversational preference columns: ``prompt`` (the user turn, an image part and the
    question), ``chosen`` and ``rejected`` (one assistant turn each) and ``images`` (bytes)."""
    prompts, chosen, rejected = [], [], []
    for it in items:
        prompts.append([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it["question"]}]}])
        chosen.append([{"role": "assistant", "content": [{"type": "text", "text": it["answer"]}]}])
        rejected.append([{"role": "assistant", "content": [{"type": "text", "text": wrong_answer(it["answer"])}]}])
    images = [[{"bytes": _png(it["image"]), "path": None}] for it in items]
    return {"prompt": prompts, "chosen": chosen, "rejected": rejected, "images": images}


def write_trl_pairs(folder: str | Path, rows: int = 48) -> Path:
    """A TRL preference dataset saved with ``save_to_disk`` (``train`` and ``test``), ``images`` as
    ``datasets`` images, as TRL's vision DPO example (RLAIF-V formatted for TRL) holds it."""
    import datasets

    folder = Path(folder)
    splits = {
        "train": datasets.Dataset.from_dict(trl_pair_rows(easyvqa_items("train", rows))),
        "test": datasets.Dataset.from_dict(trl_pair_rows(easyvqa_items("test", max(rows // 4, 4)))),
    }
    splits = {k: v.cast_column("images", datasets.List(datasets.Image())) for k, v in splits.items()}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return folder


def write_rlaifv(folder: str | Path, rows: int = 48) -> Path:
    """RLAIF-V's own columns as its parquet files hold them (``question``, ``chosen``, ``rejected``, one
    ``image``, and its bookkeeping columns), ``train.parquet`` and ``test.parquet`` in one folder."""
    import datasets

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", rows), ("test", max(rows // 4, 4))):
        items = easyvqa_items(split, n)
        table = datasets.Dataset.from_dict(
            {
                "ds_name": ["easyvqa"] * len(items),
                "image": [{"bytes": _png(it["image"]), "path": None} for it in items],
                "question": [it["question"] for it in items],
                "chosen": [it["answer"] for it in items],
                "rejected": [wrong_answer(it["answer"]) for it in items],
                "origin_dataset": ["easy-vqa"] * len(items),
                "origin_split": [split] * len(items),
                "idx": [str(i) for i in range(len(items))],
                "image_path": [Path(it["image"]).name for it in items],
            }
        ).cast_column("image", datasets.Image())
        table.to_parquet(str(folder / f"{split}.parquet"))
    return folder


def write_llamafactory_pairs(folder: str | Path, rows: int = 48, split: str = "train") -> Path:
    """LLaMA-Factory's ranking form as its ``dpo_en_demo.json`` lays it out (a JSON array;
    ``conversations``, one ``chosen`` and one ``rejected`` turn), with ``images`` and ``<image>`` markers."""
    folder = Path(folder)
    items = easyvqa_items(split, rows)
    names = _copy_images(items, folder)
    data = [
        {
            "conversations": [{"from": "human", "value": f"<image>{it['question']}"}],
            "chosen": {"from": "gpt", "value": it["answer"]},
            "rejected": {"from": "gpt", "value": wrong_answer(it["answer"])},
            "images": [name],
        }
        for it, name in zip(items, names, strict=True)
    ]
    path = folder / f"llamafactory_pairs_{split}.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def write_swift_pairs(folder: str | Path, rows: int = 48, split: str = "train") -> Path:
    """ms-swift's RLHF JSONL: ``messages`` ending in the chosen answer, ``rejected_response`` and
    ``images``; every fourth row instead ``rejected_messages`` with ``rejected_images``, the same
    question and answer shown another picture (another shape in another colour)."""
    folder = Path(folder)
    items = easyvqa_items(split, rows)
    names = _copy_images(items, folder)
    path = folder / f"swift_pairs_{split}.jsonl"
    with open(path, "w") as f:
        for i, (it, name) in enumerate(zip(items, names, strict=True)):
            prompt = [{"role": "user", "content": f"<image>{it['question']}"}]
            row: dict = {"messages": [*prompt, {"role": "assistant", "content": it["answer"]}], "images": [name]}
            other = next((j for j in range(1, len(items)) if _unlike(items[(i + j) % len(items)], it)), 0)
            if i % 4 == 3 and other:
                row["rejected_messages"] = row["messages"]
                row["rejected_images"] = [names[(i + other) % len(items)]]
            else:
                row["rejected_response"] = wrong_answer(it["answer"])
            f.write(json.dumps(row) + "\n")
    return path


def _unlike(picture: dict, item: dict) -> bool:
    """Another shape in another colour: the picture for which ``item``'s answer is wrong."""
    return picture["shape"] != item["shape"] and picture["color"] != item["color"]


# The writers of each format's copies, by its name in ``idefics2_ft.data.formats.FORMATS`` (the tests check
# that every format has one). qa, whose columns are the user's (``data.*_column``), has none here: any
# question/answer table is one, and ``tests/unit/test_formats.py`` saves one.
WRITERS = {
    "trl": (write_trl,),
    "cauldron": (write_cauldron,),
    "llava": (write_llava, write_llamafactory),
    "trl_pairs": (write_trl_pairs,),
    "rlaifv": (write_rlaifv,),
    "llamafactory_pairs": (write_llamafactory_pairs,),
    "swift_pairs": (write_swift_pairs,),
}
