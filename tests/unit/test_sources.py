"""Sources -> records: easy-VQA, DocVQA-shaped and column-mapped `datasets` data, JSONL."""

import json

import datasets
import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config import DataConfig
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.records import BadSample
from idefics2_ft.data.sources import build_rows


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def _png(color):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def docvqa_folder(tmp_path):
    """A local dataset with DocVQA's published columns (saved with save_to_disk)."""
    features = datasets.Features(
        {
            "questionId": datasets.Value("int64"),
            "question": datasets.Value("string"),
            "question_types": datasets.Sequence(datasets.Value("string")),
            "image": datasets.Image(),
            "docId": datasets.Value("int64"),
            "ucsf_document_id": datasets.Value("string"),
            "ucsf_document_page_no": datasets.Value("string"),
            "answers": datasets.Sequence(datasets.Value("string")),
        }
    )
    rows = {
        "questionId": [7, 8],
        "question": ["What is the total?", "Who signed?"],
        "question_types": [["table/list"], ["handwritten"]],
        "image": [{"bytes": _png("white"), "path": None}, {"bytes": _png("gray"), "path": None}],
        "docId": [1, 2],
        "ucsf_document_id": ["a", "b"],
        "ucsf_document_page_no": ["1", "2"],
        "answers": [["$12.50", "12.50"], ["J. Smith"]],
    }
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows, features=features),
            "validation": datasets.Dataset.from_dict(rows, features=features),
        }
    )
    ds.save_to_disk(str(tmp_path / "docvqa"))
    return str(tmp_path / "docvqa")


def test_docvqa_trains_on_the_first_answer_and_keeps_all_for_anls(docvqa_folder):
    from tests.helpers import compose_config

    cfg = compose_config(["data=docvqa", f"data.path={docvqa_folder}", "run_dir=/tmp/unused"])
    dataset = RecordDataset(build_rows(cfg.data, "val"))
    record = dataset[0]
    assert record["messages"][-1]["content"][0]["text"] == "$12.50"
    assert record["answers"] == ["$12.50", "12.50"]
    assert record["id"] == 7 and record["question_type"] == "table/list"
    assert record["images"][0].size == (32, 32)
    assert record["messages"][0]["content"][0] == {"type": "image"}


def test_any_dataset_by_column_mapping(tmp_path):
    ds = datasets.Dataset.from_dict(
        {"q": ["Color?"], "a": ["white"], "picture": [{"bytes": _png("white"), "path": None}]},
        features=datasets.Features(
            {"q": datasets.Value("string"), "a": datasets.Value("string"), "picture": datasets.Image()}
        ),
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "mine"))
    cfg = data_cfg(
        source="hub",
        path=str(tmp_path / "mine"),
        question_column="q",
        answer_column="a",
        image_column="picture",
        system_prompt="Answer in one word.",
    )
    record = RecordDataset(build_rows(cfg, "train"))[0]
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    assert record["answers"] == ["white"]
    with pytest.raises(ValueError, match=r"no column\(s\) \['question'\].*data.question_column"):
        build_rows(
            data_cfg(source="hub", path=str(tmp_path / "mine"), answer_column="a", image_column="picture"), "train"
        )


def test_jsonl_images_are_relative_to_the_file_and_load_lazily(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "img" / "b.png")
    record = {
        "images": ["img/b.png"],
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "blue"}]},
        ],
    }
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    rows = build_rows(data_cfg(source="jsonl", train_file=str(path), val_file=str(path)), "train")
    assert rows[0].images == [str(tmp_path / "img" / "b.png")]  # a path: nothing opened yet
    loaded = RecordDataset(rows)[0]
    assert loaded["images"][0].getpixel((0, 0)) == (0, 0, 255) and loaded["answers"] == ["blue"]
    (tmp_path / "img" / "b.png").unlink()
    assert isinstance(RecordDataset(rows)[0], BadSample)


def test_easyvqa_rows_and_limits():
    cfg = data_cfg(source="easyvqa", train_split="train", val_split="test", max_val_samples=5)
    dataset = RecordDataset(build_rows(cfg, "val"), cfg.max_val_samples)
    assert len(dataset) == 5
    assert dataset[0]["question_type"] in {"yes/no", "shape", "color"}
    with pytest.raises(ValueError, match="easy-VQA ships 'train' and 'test'"):
        build_rows(data_cfg(source="easyvqa", val_split="validation"), "val")


@pytest.mark.parametrize("streaming", [False, True])
def test_a_cauldron_subset_smaller_than_its_held_out_rows_is_refused_naming_slices_that_fit(tmp_path, streaming):
    # data=cauldron holds the first 200 rows out (train[200:] / train[:200]); this subset has 4
    from idefics2_ft.data.records import DataError
    from idefics2_ft.data.sources import check_sources
    from idefics2_ft.demo.formats import write_cauldron
    from tests.helpers import compose_config

    folder = write_cauldron(tmp_path / "cauldron", subsets=("chartqa",), rows=4)
    cfg = compose_config(["data=cauldron", f"data.path={folder}", "data.subset=chartqa", f"data.streaming={streaming}"])
    held = "streams" if streaming else "has"
    message = (
        rf"data.train_split='train\[200:\]' leaves no rows: the split 'train' {held} 4 row\(s\). Hold fewer rows "
        r"out: data.train_split=train\[1:\] data.val_split=train\[:1\]"
    )
    with pytest.raises(DataError, match=message):  # before: IndexError: Index 4 out of range for dataset of size 4
        check_sources(cfg.data)
    if not streaming:
        with pytest.raises(DataError, match=message):
            build_rows(cfg.data, "train")
    fixed = OmegaConf.merge(cfg.data, {"train_split": "train[1:]", "val_split": "train[:1]"})
    assert check_sources(fixed) == {}
