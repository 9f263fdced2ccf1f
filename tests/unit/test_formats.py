"""Every format read as it is stored (save_to_disk, parquet, JSON, JSONL), detected, and masked token by
token; bad rows of each format counted by kind (skip) or named with their source and row (raise)."""

from __future__ import annotations

import io
import json
import logging

import datasets
import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config.schema import DataConfig
from idefics2_ft.data import BadSample, BadSampleError, DataError, Idefics2Collator, RecordDataset
from idefics2_ft.data.collator import IGNORE_INDEX
from idefics2_ft.data.images import load_image
from idefics2_ft.data.sources import build_rows, check_sources
from idefics2_ft.demo import formats

ROWS = 8


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """One copy of each format in each way it is stored, written with ``datasets`` or as files."""
    root = tmp_path_factory.mktemp("formats")
    out = {
        "cauldron (Hub layout, parquet)": (
            data_cfg(
                source="hub",
                path=str(formats.write_cauldron(root / "cauldron", rows=ROWS)),
                subset="ai2d",
                train_split="train",
                val_split="train[:2]",
            ),
            "cauldron",
        ),
        "trl (save_to_disk, parts)": (
            data_cfg(source="hub", path=str(formats.write_trl(root / "trl", rows=ROWS)), val_split="test"),
            "trl",
        ),
        "trl (parquet files, string content)": (
            data_cfg(
                source="hub", path=str(formats.write_trl(root / "trlpq", ROWS, "parquet", True)), val_split="test"
            ),
            "trl",
        ),
        "llava (JSON array, relative paths)": (
            data_cfg(source="hub", path=str(formats.write_llava(root / "llava", rows=ROWS))),
            "llava",
        ),
        "llama-factory (JSONL, markers)": (
            data_cfg(
                source="jsonl",
                train_file=str(formats.write_llamafactory(root / "lf", rows=ROWS)),
                val_file=str(formats.write_llamafactory(root / "lf", rows=ROWS, split="test")),
            ),
            "llava",
        ),
    }
    # a single parquet file of the Cauldron's columns, given to data.path
    single = root / "cauldron" / "docvqa" / "train-00000-of-00001.parquet"
    out["cauldron (one parquet file)"] = (data_cfg(source="hub", path=str(single)), "cauldron")
    # DocVQA-style question/answer columns in a saved dataset
    qa = datasets.Dataset.from_dict(
        {
            "question": ["What color?"] * 3,
            "answers": [["red", "Red"]] * 3,
            "image": [{"bytes": (root / "llava" / "images").glob("*.png").__next__().read_bytes(), "path": None}] * 3,
        },
        features=datasets.Features(
            {
                "question": datasets.Value("string"),
                "answers": datasets.List(datasets.Value("string")),
                "image": datasets.Image(),
            }
        ),
    )
    datasets.DatasetDict({"train": qa, "validation": qa}).save_to_disk(str(root / "qa"))
    out["qa (save_to_disk)"] = (data_cfg(source="hub", path=str(root / "qa")), "qa")
    return out


CASES = [
    "cauldron (Hub layout, parquet)",
    "cauldron (one parquet file)",
    "trl (save_to_disk, parts)",
    "trl (parquet files, string content)",
    "llava (JSON array, relative paths)",
    "llama-factory (JSONL, markers)",
    "qa (save_to_disk)",
]


@pytest.mark.parametrize("case", CASES)
def test_each_format_is_detected_and_logged(case, stored, caplog):
    cfg, expected = stored[case]
    with caplog.at_level(logging.INFO):
        rows = build_rows(cfg, "train")
    assert rows.format == expected
    assert len(rows) >= 3


@pytest.mark.parametrize("case", CASES)
def test_each_format_learns_only_the_answer_token_by_token(case, stored, processor):
    cfg, _ = stored[case]
    rows = build_rows(cfg, "train")
    record = RecordDataset(rows)[0]
    assert isinstance(record, dict), record
    assert record["images"] and all(isinstance(im, Image.Image) for im in record["images"])
    # the images are the first user turn's, before its text (as Idefics2 was trained)
    user = next(m for m in record["messages"] if m["role"] == "user")
    assert user["content"][0] == {"type": "image"}
    answer = record["messages"][-1]["content"][0]["text"]
    batch = Idefics2Collator(processor)([record])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    learned = [i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    tok = processor.tokenizer
    expected = tok(" " + answer, add_special_tokens=False)["input_ids"]
    # the answer's tokens and the closing <end_of_utterance>, nothing of the question or the images
    assert tok.decode(learned) == tok.decode(expected + [tok.convert_tokens_to_ids("<end_of_utterance>")])
    assert processor.image_token_id not in learned


def test_a_cauldron_row_with_several_turns_learns_every_answer(processor, red):
    from idefics2_ft.data.formats import ImagePaths, to_row

    item = {
        "images": [{"bytes": _png(red), "path": None}],
        "texts": [
            {"user": "Colour?", "assistant": "red", "source": "x"},
            {"user": "Shape?", "assistant": "square", "source": "x"},
        ],
    }
    row = to_row(item, "cauldron", data_cfg(), "row 0", ImagePaths(None), 0)
    assert [m["role"] for m in row.messages] == ["user", "assistant", "user", "assistant"]
    assert row.messages[0]["content"][0] == {"type": "image"}
    assert all(part != {"type": "image"} for part in row.messages[2]["content"])  # only in the first turn
    record = RecordDataset([row])[0]
    batch = Idefics2Collator(processor)([record])
    learned = [
        processor.tokenizer.convert_ids_to_tokens(i)
        for i, lab in zip(batch["input_ids"][0].tolist(), batch["labels"][0].tolist(), strict=True)
        if lab != IGNORE_INDEX
    ]
    assert learned == ["▁red", "<end_of_utterance>", "▁square", "<end_of_utterance>"]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_images_as_bytes_relative_and_absolute_paths_and_datasets_images(tmp_path, red):
    from idefics2_ft.data.formats import ImagePaths

    red.save(tmp_path / "r.png")
    paths = ImagePaths(tmp_path)
    for ref in (_png(red), "r.png", str(tmp_path / "r.png"), {"bytes": None, "path": "r.png"}, {"bytes": _png(red)}):
        assert load_image(paths(ref)).getpixel((0, 0)) == (255, 0, 0), ref


def test_a_phone_photo_is_turned_as_its_exif_says(tmp_path):
    # a 40x20 picture stored sideways, tagged "rotate 90° clockwise to view" (orientation 6)
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # a red band on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif.tobytes(), quality=95)
    shown = load_image(str(tmp_path / "photo.jpg"))
    assert shown.size == (20, 40)  # upright: taller than wide
    r, g, b = shown.getpixel((10, 2))  # the band is now along the top
    assert r > 200 and g < 60


# ---------------------------------------------------------------- bad rows, by format
def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _llava(value, speaker="human", image="r.png"):
    return {"image": image, "conversations": [{"from": speaker, "value": value}, {"from": "gpt", "value": "red"}]}


def _trl(*user_parts):
    return {
        "images": ["r.png"],
        "messages": [{"role": "user", "content": list(user_parts)}, {"role": "assistant", "content": "red"}],
    }


BAD = {
    "a TRL part of an unknown type": (
        [_trl({"type": "image"}, {"type": "text", "text": "Colour?"}), _trl({"type": "video"})],
        "format_mismatch",
    ),
    "a TRL row with more images than image parts": (
        [_trl({"type": "image"}, {"type": "text", "text": "Colour?"}), _trl({"type": "text", "text": "Colour?"})],
        "too_many_images",
    ),
    # case: (rows of a JSONL file, the kind counted)
    "a row of another format than the rest": (
        [_llava("<image>\nColour?"), {"messages": [{"role": "user", "content": "hi"}]}],
        "format_mismatch",
    ),
    "a LLaVA turn from 'bot'": (
        [_llava("<image>\nColour?"), _llava("<image>\nColour?", speaker="bot")],
        "unknown_role",
    ),
    "more markers than images": ([_llava("<image>\nColour?"), _llava("<image><image>\nColour?")], "images_mismatch"),
    "fewer markers than images": ([_llava("<image>\nColour?"), _llava("Colour?")], "images_mismatch"),
}


@pytest.mark.parametrize("case", list(BAD))
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_bad_rows_are_counted_by_kind_or_named(case, mode, tmp_path, red):
    red.save(tmp_path / "r.png")
    rows, kind = BAD[case]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path, on_bad_sample=mode)
    if mode == "raise":
        with pytest.raises(BadSampleError, match=rf"{tmp_path / 'd.jsonl'}:2: .*on_bad_sample=skip"):
            check_sources(cfg)
        return
    assert check_sources(cfg) == {f"train/{kind}": 1, f"val/{kind}": 1}
    record = RecordDataset(build_rows(cfg, "train"))[1]
    assert isinstance(record, BadSample) and record.kind == kind


def test_an_empty_cauldron_texts_list_is_a_counted_bad_record(tmp_path, red):
    features = formats.cauldron_features()
    table = datasets.Dataset.from_dict(
        {
            "images": [[{"bytes": _png(red), "path": None}]] * 2,
            "texts": [[{"user": "Q?", "assistant": "A", "source": "s"}], []],
        },
        features=features,
    )
    datasets.DatasetDict({"train": table, "validation": table}).save_to_disk(str(tmp_path / "c"))
    cfg = data_cfg(source="hub", path=str(tmp_path / "c"))
    assert check_sources(cfg) == {"train/empty_texts": 1, "val/empty_texts": 1}
    with pytest.raises(BadSampleError, match=r"c\[train\] row 1: the Cauldron row's 'texts' list is empty"):
        check_sources(data_cfg(source="hub", path=str(tmp_path / "c"), on_bad_sample="raise"))


def test_an_unknown_shape_fails_before_loading_naming_its_columns_and_the_formats(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(
        DataError,
        match=r"odd.jsonl: cannot tell the format from its columns \['completion', 'prompt'\]"
        r".*trl \(messages, images\).*cauldron.*llava.*qa.*Set data.format",
    ):
        build_rows(data_cfg(source="jsonl", train_file=path, val_file=path), "train")


def test_a_split_a_source_does_not_have_is_named_with_the_splits_it_has(stored):
    cfg, _ = stored["trl (save_to_disk, parts)"]
    with pytest.raises(DataError, match=r"has no split 'validation'; its splits are \['test', 'train'\]"):
        build_rows(OmegaConf.merge(cfg, {"val_split": "validation"}), "val")


# ---------------------------------------------------------------- one stray row does not decide a table's format
def _parts_row(color="red"):
    return {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": color}]},
        ],
        "images": ["r.png"],
    }


def _marked_row(color="red"):  # LLaMA-Factory's / ms-swift's: string content, <image> markers
    return {
        "messages": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": color}],
        "images": ["r.png"],
    }


def test_one_marked_row_among_trl_rows_does_not_turn_the_file_into_llava(tmp_path, red):
    # 12 TRL rows and one LLaMA-Factory row on line 6: read as trl, which reads the marked row too
    red.save(tmp_path / "r.png")
    rows = [_parts_row() for _ in range(12)]
    rows.insert(5, _marked_row())
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    built = build_rows(cfg, "train")
    assert built.format == "trl"
    assert check_sources(cfg) == {}  # before: llava, and the 12 TRL rows refused as format_mismatch
    assert built[5].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]


def test_one_trl_row_among_marked_rows_is_the_one_counted(tmp_path, red):
    red.save(tmp_path / "r.png")
    rows = [_marked_row() for _ in range(12)]
    rows.insert(5, _parts_row())
    path = _jsonl(tmp_path / "d.jsonl", rows)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert build_rows(cfg, "train").format == "llava"
    assert check_sources(cfg) == {"train/format_mismatch": 1, "val/format_mismatch": 1}
    with pytest.raises(BadSampleError, match=r"d.jsonl:6: not a llava row: messages with content parts"):
        check_sources(OmegaConf.merge(cfg, {"on_bad_sample": "raise"}))


def test_sharegpt_conversations_with_role_and_content_keys_are_read(tmp_path, red):
    # LLaMA-Factory's sharegpt with role_tag=role, content_tag=content (a JSON array, as it ships)
    red.save(tmp_path / "r.png")
    rows = [
        {
            "conversations": [{"role": "user", "content": "<image>Colour?"}, {"role": "assistant", "content": "red"}],
            "images": ["r.png"],
        }
    ] * 3
    (tmp_path / "d.json").write_text(json.dumps(rows))
    cfg = data_cfg(source="jsonl", train_file=str(tmp_path / "d.json"), val_file=str(tmp_path / "d.json"))
    built = build_rows(cfg, "train")
    assert built.format == "llava"
    assert check_sources(cfg) == {}  # before: every row unknown_role, "speaker from=None"
    assert built[0].messages == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert RecordDataset(built)[0]["images"][0].getpixel((0, 0)) == (255, 0, 0)
