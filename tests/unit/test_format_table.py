"""The one table of formats (``idefics2_ft.data.formats.FORMATS``): what else names the formats stays
in step with it (the config's choices, the demo's copies, the docs, the messages), and the files other
projects write that it reads: TRL's single ``image`` column, and image parts that carry their image
(axolotl's ``path`` / ``image`` / ``url`` / ``base64``, OpenAI's and LLaMA-Factory's ``image_url``)."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from typing import get_args

import datasets
import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config.choices import DataFormat
from idefics2_ft.config.schema import DataConfig
from idefics2_ft.data import BadSample, BadSampleError, DataError, RecordDataset
from idefics2_ft.data.formats import FORMATS
from idefics2_ft.data.sources import build_rows, check_sources
from idefics2_ft.demo import formats as demo

DOCS = Path(__file__).resolve().parents[2] / "docs"


def data_cfg(**values):
    return OmegaConf.merge(OmegaConf.structured(DataConfig), values)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------- the table and what names the formats
def test_the_config_choices_are_the_tables_formats():
    assert get_args(DataFormat) == ("auto", *FORMATS)


def test_every_format_has_a_demo_copy_but_the_one_of_mapped_columns():
    assert set(demo.WRITERS) <= set(FORMATS)
    assert set(FORMATS) - set(demo.WRITERS) == {name for name, form in FORMATS.items() if form.mapped}


def test_the_docs_table_lists_the_tables_formats_in_its_order():
    text = (DOCS / "your-data.md").read_text()
    table = text.split("| format | columns |", 1)[1].split("\n\n", 1)[0]
    assert re.findall(r"^\| `(\w+)` \|", table, re.MULTILINE) == list(FORMATS)


def test_every_format_is_told_apart_and_says_why_a_row_is_bad():
    for name, form in FORMATS.items():
        assert form.name == name
        assert bool(form.layouts) != bool(form.mapped), name  # fixed columns, or the user's
        assert form.columns and all(form.problems.values()), name


def test_the_message_for_an_unknown_shape_lists_every_format(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "x", "completion": "y"}])
    with pytest.raises(DataError) as err:
        build_rows(data_cfg(source="jsonl", train_file=path, val_file=path), "train")
    listed = re.findall(r"(\w+) \(", str(err.value).split("The formats read are: ")[1])
    assert listed == list(FORMATS)


# ---------------------------------------------------------------- TRL with one `image` column
def _user_turn(*parts: dict) -> list[dict]:
    return [
        {"role": "user", "content": [*parts, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]


def test_a_trl_dataset_with_one_image_column_reads_it_as_the_rows_image(tmp_path, red):
    # as TRL's own vision examples hold it: `image` (one per row) and `messages` with an image part
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": _png(red), "path": None}] * 3, "messages": [_user_turn({"type": "image"})] * 3}
    ).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table, "test": table}).save_to_disk(str(tmp_path / "trl"))
    cfg = data_cfg(source="hub", path=str(tmp_path / "trl"), val_split="test")

    rows = build_rows(cfg, "train")
    assert rows.format == "trl"
    assert check_sources(cfg) == {}  # before: every row "1 image placeholders but 0 images"
    record = RecordDataset(rows)[0]
    assert record["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
    ]
    assert len(record["images"]) == 1 and record["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_a_trl_jsonl_with_one_image_path_reads_it_relative_to_the_file(tmp_path, red):
    red.save(tmp_path / "r.png")
    path = _jsonl(tmp_path / "d.jsonl", [{"image": "r.png", "messages": _user_turn({"type": "image"})}] * 2)
    rows = build_rows(data_cfg(source="jsonl", train_file=path, val_file=path), "train")
    assert rows.format == "trl" and rows[0].images == [str(tmp_path / "r.png")]


# ---------------------------------------------------------------- image parts that carry their image
def _carrying(tmp_path: Path, red: Image.Image) -> dict[str, dict]:
    red.save(tmp_path / "r.png")
    b64 = base64.b64encode(_png(red)).decode()
    return {
        "axolotl path, relative": {"type": "image", "path": "r.png"},
        "axolotl path, absolute": {"type": "image", "path": str(tmp_path / "r.png")},
        "transformers image key": {"type": "image", "image": "r.png"},
        "file:// url": {"type": "image", "url": f"file://{tmp_path / 'r.png'}"},
        "base64": {"type": "image", "base64": b64},
        "OpenAI image_url, data address": {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64}"}},
        "LLaMA-Factory image_url value": {"type": "image_url", "value": "r.png"},
    }


CARRYING = [
    "axolotl path, relative",
    "axolotl path, absolute",
    "transformers image key",
    "file:// url",
    "base64",
    "OpenAI image_url, data address",
    "LLaMA-Factory image_url value",
]


@pytest.mark.parametrize("case", CARRYING)
def test_an_image_part_that_carries_its_image_is_read(case, tmp_path, red):
    part = _carrying(tmp_path, red)[case]
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": _user_turn(part)}] * 2)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    rows = build_rows(cfg, "train")
    assert rows.format == "trl"
    assert check_sources(cfg) == {}  # before: the image was dropped, "1 image placeholders but 0 images"
    assert rows[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    if case.startswith("axolotl path") or "value" in case or "image key" in case:
        assert rows[0].images == [str(tmp_path / "r.png")]  # relative ones under the file's folder
    record = RecordDataset(rows)[0]
    assert len(record["images"]) == 1 and record["images"][0].getpixel((0, 0)) == (255, 0, 0)


def test_image_parts_in_a_parquet_table_where_every_part_has_every_key(tmp_path, red):
    # datasets fills the keys a part does not use with None: {"type": "text", "path": None, "text": ...}
    red.save(tmp_path / "r.png")
    datasets.Dataset.from_dict({"messages": [_user_turn({"type": "image", "path": "r.png"})] * 2}).to_parquet(
        str(tmp_path / "train.parquet")
    )
    rows = build_rows(data_cfg(source="hub", path=str(tmp_path / "train.parquet")), "train")
    assert rows[0].messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Colour?"}]
    assert rows[0].images == [str(tmp_path / "r.png")]
    assert RecordDataset(rows)[1]["images"][0].getpixel((0, 0)) == (255, 0, 0)


REFUSED = {
    # case: (the bad row's image part(s) and columns, the kind counted, the reason's text)
    "a web address in a part": (
        {"messages": _user_turn({"type": "image", "url": "https://example.com/r.png"})},
        "image_url",
        "image URLs are not fetched (https://example.com/r.png): download the image and give its local path",
    ),
    "a web address in an image_url part": (
        {"messages": _user_turn({"type": "image_url", "image_url": {"url": "https://example.com/r.png"}})},
        "image_url",
        "image URLs are not fetched (https://example.com/r.png): download the image and give its local path",
    ),
    "base64 that does not decode": (
        {"messages": _user_turn({"type": "image", "base64": "not base64!"})},
        "unreadable_image",
        "an image part's base64 does not decode",
    ),
    "an image in its part and in images": (
        {"messages": _user_turn({"type": "image", "path": "r.png"}), "images": ["r.png"]},
        "images_mismatch",
        "1 image part(s) carry their image and 'images' holds 1 more: give each image once",
    ),
    "some parts carry their image, some do not": (
        {"messages": _user_turn({"type": "image", "path": "r.png"}, {"type": "image"})},
        "images_mismatch",
        "1 of 2 image parts carry their image (image, path, url, base64 or image_url) and the others do not",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_an_image_part_that_cannot_be_read_is_refused_naming_the_fix(case, tmp_path, red):
    red.save(tmp_path / "r.png")
    bad, kind, reason = REFUSED[case]
    good = {"messages": _user_turn({"type": "image", "path": "r.png"})}
    path = _jsonl(tmp_path / "d.jsonl", [good, bad])
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert check_sources(cfg) == {f"train/{kind}": 1, f"val/{kind}": 1}
    record = RecordDataset(build_rows(cfg, "train"))[1]
    assert isinstance(record, BadSample) and record.kind == kind and reason in record.reason
    with pytest.raises(BadSampleError, match=rf"d.jsonl:2: {re.escape(reason)}"):
        check_sources(OmegaConf.merge(cfg, {"on_bad_sample": "raise"}))


# ---------------------------------------------------------------- images given as addresses, in a part or in `images`
def _addresses(tmp_path: Path, red: Image.Image) -> dict[str, str]:
    red.save(tmp_path / "r.png")
    (tmp_path / "my pics").mkdir()
    red.save(tmp_path / "my pics" / "r.png")
    b64 = base64.b64encode(_png(red)).decode()
    return {
        "data: address": f"data:image/png;base64,{b64}",
        "file:// address": f"file://{tmp_path / 'r.png'}",
        "file:// address, percent-encoded": f"file://{tmp_path}/my%20pics/r.png",
        "plain base64": b64,
        "base64 wrapped at 76 characters (MIME)": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
    }


ADDRESSES = [
    "data: address",
    "file:// address",
    "file:// address, percent-encoded",
    "plain base64",
    "base64 wrapped at 76 characters (MIME)",
]


@pytest.mark.parametrize("where", ["images column", "image column", "image part"])
@pytest.mark.parametrize("case", ADDRESSES)
def test_an_image_address_reads_the_same_in_the_images_column_and_in_a_part(case, where, tmp_path, red):
    address = _addresses(tmp_path, red)[case]
    if where == "image part":
        key = "base64" if "base64" in case else "url"
        row = {"messages": _user_turn({"type": "image", key: address})}
    else:  # before: "image not found: <the file's folder>/data:image/png;base64,..."
        column = where.split()[0]  # images: a list of them; image: one
        row = {"messages": _user_turn({"type": "image"}), column: [address] if column == "images" else address}
    path = _jsonl(tmp_path / "d.jsonl", [row] * 2)
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert check_sources(cfg) == {}
    record = RecordDataset(build_rows(cfg, "train"))[0]
    assert len(record["images"]) == 1 and record["images"][0].getpixel((0, 0)) == (255, 0, 0)


ADDRESS_REFUSED = {
    # case: (the bad row, the kind counted, the reason's text)
    "an ftp:// address in a part": (
        {"messages": _user_turn({"type": "image", "url": "ftp://example.com/r.png"})},
        "image_url",
        "image URLs are not fetched (ftp://example.com/r.png): download the image and give its local path",
    ),
    "an s3:// address in images": (
        {"messages": _user_turn({"type": "image"}), "images": ["s3://bucket/r.png"]},
        "image_url",
        "image URLs are not fetched (s3://bucket/r.png): download the image and give its local path",
    ),
    "an https:// address in images": (
        {"messages": _user_turn({"type": "image"}), "images": ["https://example.com/r.png"]},
        "image_url",
        "image URLs are not fetched (https://example.com/r.png): download the image and give its local path",
    ),
    "an empty path in a part": (  # before: 1 image placeholders but 0 images
        {"messages": _user_turn({"type": "image", "path": ""})},
        "missing_image",
        "empty image path (image 1 of 1 is '')",
    ),
    "an empty image_url in a part": (  # before: format_mismatch, "an 'image_url' part with no address"
        {"messages": _user_turn({"type": "image_url", "image_url": {"url": ""}})},
        "missing_image",
        "empty image path (image 1 of 1 is '')",
    ),
    "an empty path in images": (  # before: IsADirectoryError on the file's folder
        {"messages": _user_turn({"type": "image"}), "images": [""]},
        "missing_image",
        "empty image path (image 1 of 1 is '')",
    ),
    "a data: address that does not decode": (
        {"messages": _user_turn({"type": "image"}), "images": ["data:image/png;base64,not base64!"]},
        "unreadable_image",
        "an image's base64 does not decode",
    ),
}


@pytest.mark.parametrize("case", list(ADDRESS_REFUSED))
def test_an_image_address_that_cannot_be_read_is_a_counted_bad_record(case, tmp_path, red):
    red.save(tmp_path / "r.png")
    bad, kind, reason = ADDRESS_REFUSED[case]
    good = {"messages": _user_turn({"type": "image", "path": "r.png"})}
    path = _jsonl(tmp_path / "d.jsonl", [good, bad])
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert check_sources(cfg) == {f"train/{kind}": 1, f"val/{kind}": 1}
    record = RecordDataset(build_rows(cfg, "train"))[1]
    assert isinstance(record, BadSample) and record.kind == kind and reason in record.reason
    with pytest.raises(BadSampleError, match=rf"d.jsonl:2: {re.escape(reason)}"):
        check_sources(OmegaConf.merge(cfg, {"on_bad_sample": "raise"}))


def test_an_empty_image_key_beside_the_images_column_carries_nothing(tmp_path, red):
    # a writer that fills a part's unused keys with "" (as datasets fills them with None)
    red.save(tmp_path / "r.png")
    path = _jsonl(tmp_path / "d.jsonl", [{"messages": _user_turn({"type": "image", "path": ""}), "images": ["r.png"]}])
    rows = build_rows(data_cfg(source="jsonl", train_file=path, val_file=path), "train")
    assert rows[0].problem is None and rows[0].images == [str(tmp_path / "r.png")]
