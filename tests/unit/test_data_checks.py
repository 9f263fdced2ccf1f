"""Data that would be quietly wrong is counted and named, or refused with where it is and the fix."""

import json

import datasets
import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from idefics2_ft.config import ConfigError, DataConfig, validate
from idefics2_ft.data import Idefics2Collator, Idefics2DataModule, check_sources
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.images import to_rgb
from idefics2_ft.data.records import BadSampleError
from idefics2_ft.data.sources import build_rows
from idefics2_ft.tasks.train import train
from tests.helpers import compose_config


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def user(*parts):
    return {"role": "user", "content": list(parts)}


def answer(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


IMG = {"type": "image"}


def q(text):
    return {"type": "text", "text": text}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture
def pictures(tmp_path):
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "red.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "blue.png")
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    return tmp_path


def test_16_bit_and_transparent_images_become_faithful_8_bit_rgb(tmp_path):
    gray16 = Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16))  # a mid-gray 16-bit scan
    gray16.save(tmp_path / "scan.png")
    opened = Image.open(tmp_path / "scan.png")
    assert opened.mode.startswith("I")  # Pillow opens it as 16/32-bit integers
    assert opened.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # what convert("RGB") makes of it
    assert to_rgb(opened).getpixel((0, 0)) == (128, 128, 128)
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent: the page under it shows
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)
    floats = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")
    assert to_rgb(floats).getpixel((0, 0)) == (128, 128, 128)


def test_images_without_placeholders_and_unknown_roles_are_named(pictures):
    path = write_jsonl(
        pictures / "d.jsonl",
        [
            {"images": ["red.png"], "messages": [user(q("What color?")), answer("red")]},  # 1 image, 0 placeholders
            {"images": ["red.png", "blue.png"], "messages": [user(IMG, q("Same?")), answer("no")]},
            {"images": ["red.png"], "messages": [user(IMG, q("Color?")), {"role": "bot", "content": "red"}]},
        ],
    )
    items = [RecordDataset(build_rows(data_cfg(source="jsonl", train_file=path), "train"))[i] for i in range(3)]
    assert [b.kind for b in items] == ["too_many_images", "too_many_images", "unknown_role"]
    assert "'bot'" in items[2].reason and items[2].origin.endswith("d.jsonl:3")


def test_a_non_utf8_line_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"messages": []}\n{"messages": [], "x": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not UTF-8"):
        build_rows(data_cfg(source="jsonl", train_file=str(path)), "train")


def test_raise_mode_names_the_file_and_line(pictures, processor):
    path = write_jsonl(
        pictures / "d.jsonl",
        [
            {"images": ["red.png"], "messages": [user(IMG, q("Color?")), answer("red")]},
            {"images": ["gone.png"], "messages": [user(IMG, q("Color?")), answer("red")]},
        ],
    )
    dataset = RecordDataset(build_rows(data_cfg(source="jsonl", train_file=path), "train"))
    with pytest.raises(BadSampleError, match=r"d\.jsonl:2: image not found"):
        Idefics2Collator(processor, on_bad_sample="raise")([dataset[0], dataset[1]])


def test_a_missing_split_lists_the_splits(tmp_path):
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"q": ["a"], "a": ["b"], "img": [None]})})
    ds.save_to_disk(str(tmp_path / "dd"))
    cfg = data_cfg(source="hub", path=str(tmp_path / "dd"), val_split="validation")
    with pytest.raises(ValueError, match=r"no split 'validation'; its splits are \['train'\]"):
        build_rows(cfg, "val")


def test_one_saved_split_as_both_sets_is_named_or_refused(tmp_path, processor):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(buf, format="PNG")
    rows = {"q": ["What?"], "a": ["x"], "img": [{"bytes": buf.getvalue(), "path": None}]}
    datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {"q": datasets.Value("string"), "a": datasets.Value("string"), "img": datasets.Image()}
        ),
    ).save_to_disk(str(tmp_path / "one"))
    common = dict(source="hub", path=str(tmp_path / "one"), question_column="q", answer_column="a", image_column="img")
    module = Idefics2DataModule(data_cfg(**common), processor)
    module.setup("fit")
    assert module.val_is_train
    with pytest.raises(ValueError, match="holds one split"):
        Idefics2DataModule(data_cfg(**common, on_bad_sample="raise"), processor).setup("fit")


def test_an_answer_cut_by_max_length_is_skipped_unless_asked(processor, red):
    record = {"images": [red], "messages": [user(IMG, q("Describe it.")), answer("a small red square " * 6)]}
    full = Idefics2Collator(processor)([record])["input_ids"].shape[1]
    cut = full - 5  # inside the answer, before its <end_of_utterance>
    skipped = Idefics2Collator(processor, max_length=cut)([record])
    assert "input_ids" not in skipped and skipped["bad_samples"][0].kind == "answer_truncated"
    kept = Idefics2Collator(processor, max_length=cut, train_on_truncated=True)([record])
    assert kept["input_ids"].shape[1] == cut


def test_sources_are_checked_before_stage_1_trains(pictures, tiny_run_cfg, tmp_path, monkeypatch):
    from idefics2_ft.tasks import train as train_module

    train_file = write_jsonl(
        pictures / "train.jsonl", [{"images": ["red.png"], "messages": [user(IMG, q("C?")), answer("red")]}]
    )
    (pictures / "val.jsonl").write_text('{"messages": [}\n')  # a broken validation file
    monkeypatch.setattr(train_module, "resolve_base", lambda cfg: (_ for _ in ()).throw(AssertionError("stage 1 ran")))
    cfg = tiny_run_cfg("data=jsonl", f"data.train_file={train_file}", f"data.val_file={pictures / 'val.jsonl'}")
    with pytest.raises(ValueError, match=r"val\.jsonl:1: not valid JSON"):
        train_module.train(cfg)


def test_check_sources_counts_or_raises(pictures):
    path = write_jsonl(
        pictures / "d.jsonl",
        [
            {"images": ["red.png"], "messages": [user(IMG, q("C?")), answer("red")]},
            {"images": ["gone.png"], "messages": [user(IMG, q("C?")), answer("red")]},
            {"images": [], "messages": [user(q("C?"))]},
        ],
    )
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path)
    assert check_sources(cfg) == {
        "train/missing_image": 1,
        "train/no_assistant_turn": 1,
        "val/missing_image": 1,
        "val/no_assistant_turn": 1,
    }
    cfg.on_bad_sample = "raise"
    with pytest.raises(BadSampleError, match=r"d\.jsonl:2: image not found"):
        check_sources(cfg)


def test_stage_1_skips_or_names_a_corrupt_image(pictures, tiny_run_cfg, tmp_path):
    from idefics2_ft.demo import ensure_tiny_base

    records = [
        {"images": ["red.png"], "messages": [user(IMG, q("Color?")), answer("red")]},
        {"images": ["broken.png"], "messages": [user(IMG, q("Color?")), answer("blue")]},
    ]
    path = write_jsonl(pictures / "d.jsonl", records)
    stage1 = ("data=jsonl", f"data.train_file={path}", f"data.val_file={path}", "model.tiny.vision_pretrain_steps=2")
    base = ensure_tiny_base(tiny_run_cfg(*stage1, f"model.tiny.cache_dir={tmp_path / 'c1'}"))
    assert json.loads((base / "stage1.json").read_text())["stage1/skipped_images"] == 1
    with pytest.raises(BadSampleError, match=r"stage 1: image .*broken\.png"):
        ensure_tiny_base(tiny_run_cfg(*stage1, "data.on_bad_sample=raise", f"model.tiny.cache_dir={tmp_path / 'c2'}"))


def test_a_typo_after_hydras_plus_hint_is_refused_with_the_nearest_key(tmp_path):
    cfg = compose_config([f"run_dir={tmp_path}", "+trainer.max_step=3"])
    with pytest.raises(ConfigError, match=r"trainer\.max_step is not a config key.*did you mean trainer\.max_steps\?"):
        validate(cfg)


def test_bad_records_are_counted_once_however_often_they_are_read(pictures, tiny_run_cfg):
    records = [{"images": ["red.png"], "messages": [user(IMG, q("Color?")), answer("red")]}] * 3
    records.append({"images": ["gone.png"], "messages": [user(IMG, q("Color?")), answer("red")]})
    path = write_jsonl(pictures / "d.jsonl", records)
    # 4 records, 6 steps of 2: each record is read three times
    metrics = train(
        tiny_run_cfg(
            "data=jsonl",
            f"data.train_file={path}",
            f"data.val_file={path}",
            "data.batch_size=2",
            "trainer.max_steps=6",
            "eval.at_end=false",
        )
    )
    assert metrics["data/skipped/train/missing_image"] == 1


def _modes():
    base = Image.new("RGB", (8, 8), (200, 100, 50))
    gray16 = np.full((8, 8), 51400, dtype=np.uint16)  # 51400 / 65535 * 255 = 200
    cases = {m: (base.convert(m), None) for m in ["1", "L", "P", "CMYK", "YCbCr", "HSV", "RGBX", "LA", "RGBA"]}
    cases.update(
        {
            "I;16": (Image.fromarray(gray16), (200, 200, 200)),
            "I;16B": (Image.frombytes("I;16B", (8, 8), gray16.astype(">u2").tobytes()), (200, 200, 200)),
            "I (32-bit)": (Image.fromarray(np.full((8, 8), 2**30, dtype=np.int32), "I"), (128, 128, 128)),
            "F": (Image.fromarray(np.full((8, 8), 200 / 255, dtype=np.float32), "F"), (200, 200, 200)),
            "LAB (white)": (Image.new("LAB", (8, 8), (255, 128, 128)), None),
            "La (transparent)": (Image.new("La", (8, 8)), (255, 255, 255)),
            "RGBa (transparent)": (Image.new("RGBa", (8, 8)), (255, 255, 255)),
            "PA (transparent)": (Image.new("PA", (8, 8)), (255, 255, 255)),
        }
    )
    return cases


@pytest.mark.parametrize("mode", sorted(_modes()))
def test_every_image_mode_becomes_8_bit_rgb(mode):
    image, expected = _modes()[mode]
    out = to_rgb(image)
    assert out.mode == "RGB" and np.asarray(out).dtype == np.uint8
    if expected is not None:
        assert out.getpixel((0, 0)) == expected
    if mode.startswith("LAB"):
        assert min(out.getpixel((0, 0))) >= 250  # L=100 is white, not the colour convert("RGB") makes of it


# ---------------------------------------------------------------- a literal <image> in a text
def _marker_files(folder):
    """Files whose second row's text holds a literal <image> (the collator would expand it into an
    image's tokens with no picture: the model stopped the run mid-fit), each as a user holds it."""
    good = {"images": ["red.png"], "messages": [user(IMG, q("What color?")), answer("red")]}
    rows = {
        # axolotl / TRL parts, the marker left in the text part
        "a text part": [
            good,
            {"images": ["red.png"], "messages": [user(IMG, q("<image>\nWhat color?")), answer("red")]},
        ],
        # ms-swift's older query/response, read as qa: the question column holds the marker
        "a question column": [
            {"query": "What color?", "response": "red", "images": ["red.png"]},
            {"query": "<image>What color?", "response": "red", "images": ["red.png"]},
        ],
        # an answer that quotes it
        "an answer": [good, {"images": ["red.png"], "messages": [user(IMG, q("Color?")), answer("<image> red")]}],
    }
    return {case: write_jsonl(folder / f"{i}.jsonl", r) for i, (case, r) in enumerate(rows.items())}


QA_COLUMNS = {"question_column": "query", "answer_column": "response", "image_column": "images"}


@pytest.mark.parametrize("case", ["a text part", "a question column", "an answer"])
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_a_literal_image_token_in_a_text_is_a_counted_bad_record(case, mode, pictures, processor):
    path = _marker_files(pictures)[case]
    columns = QA_COLUMNS if case == "a question column" else {}
    cfg = data_cfg(source="jsonl", train_file=path, val_file=path, on_bad_sample=mode, **columns)
    if mode == "raise":
        with pytest.raises(BadSampleError, match=r"\d\.jsonl:2: turn \d \((user|assistant)\) holds a literal <image>"):
            check_sources(cfg)
        return
    assert check_sources(cfg) == {"train/marker_in_text": 1, "val/marker_in_text": 1}
    dataset = RecordDataset(build_rows(cfg, "train"))
    bad = dataset[1]
    assert bad.kind == "marker_in_text" and bad.origin.endswith(".jsonl:2")
    assert "Remove it from the text" in bad.reason and "format=llava" in bad.reason
    # the collator never encodes it: the batch holds one image's tokens per picture, as the model checks
    batch = Idefics2Collator(processor)([dataset[0], dataset[1]])
    assert [b.kind for b in batch["bad_samples"]] == ["marker_in_text"] and len(batch["input_ids"]) == 1
    image_tokens = int((batch["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == batch["pixel_values"].shape[1] * processor.image_seq_len
