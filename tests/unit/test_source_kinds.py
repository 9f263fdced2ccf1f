"""Each kind of data.source is one object in one registry; the rest of the code asks it (issue 30)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import datasets
import pytest
from omegaconf import OmegaConf

from idefics2_ft.config import ConfigError, DataConfig, validate
from idefics2_ft.config.choices import DataSource
from idefics2_ft.data import sources
from idefics2_ft.data.records import DataError, Row, qa_messages
from idefics2_ft.data.sources import ALIASES, SOURCES, SourceKind, build_rows, data_fingerprint, kind_of
from tests.helpers import IDEFICS2_FT, compose_config

ROOT = Path(__file__).resolve().parents[2]


def data_cfg(**kw):
    return OmegaConf.structured(DataConfig(**kw))


def test_the_configs_choices_are_the_registrys_kinds_and_aliases():
    assert set(get_args(DataSource)) == set(SOURCES) | set(ALIASES)
    assert all(target in SOURCES for target in ALIASES.values())
    for name, kind in SOURCES.items():
        assert kind.name == name and kind.about, kind


def test_no_module_outside_the_registry_compares_data_source_with_a_name():
    """``d.source == "jsonl"`` and kin belong to the kinds: every other module asks ``kind_of``."""
    offenders = []
    for path in (ROOT / "idefics2_ft").rglob("*.py"):
        if path.parent.name == "sources" and path.parent.parent.name == "data":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if ".source ==" in line or ".source in (" in line or ".source !=" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_docvqa_is_a_preset_of_hub_and_an_older_config_that_names_it_still_reads(tmp_path):
    cfg = compose_config(["data=docvqa", f"run_dir={tmp_path}"])
    assert cfg.data.source == "hub" and kind_of(cfg.data) is SOURCES["hub"]
    assert kind_of(data_cfg(source="docvqa", path="HuggingFaceM4/DocumentVQA")) is SOURCES["hub"]
    with pytest.raises(DataError, match=r"data.source='csv' is not one of easyvqa, jsonl, hub, docvqa"):
        kind_of(OmegaConf.create({"source": "csv"}))


def test_a_one_split_dataset_read_through_the_docvqa_preset_is_named_as_memorisation(tmp_path):
    """``data=docvqa`` acted as ``hub`` everywhere but the check that validation is not the training set."""
    datasets.Dataset.from_dict({"question": ["q"], "answers": [["a"]], "image": [None]}).save_to_disk(
        str(tmp_path / "one")
    )
    cfg = compose_config(["data=docvqa", f"data.path={tmp_path / 'one'}", f"run_dir={tmp_path / 'run'}"])
    rows = build_rows(cfg.data, "val")
    assert kind_of(cfg.data).one_split(rows)


class Letters(SourceKind):
    """A kind a test adds: rows made from a string, as a new kind would make them from its source."""

    name = "letters"
    about = "one question per letter of data.path"

    def rows(self, d: Any, split_key: str) -> list[Row]:
        return [Row(messages=qa_messages(f"say {c}", c), images=[], answers=[c], id=c) for c in d.path]

    def fingerprint(self, d: Any) -> dict[str, Any]:
        return {"letters": d.path}

    def problems(self, d: Any, where: str) -> list[str]:
        return [] if d.path else [f"{where}.path is required with source letters: the letters to ask about."]


def test_a_new_kind_is_one_object_in_the_registry(monkeypatch):
    monkeypatch.setitem(SOURCES, "letters", Letters())
    cfg = OmegaConf.create({"source": "letters", "path": "abc", "subset": None})
    assert [r.answers for r in build_rows(cfg, "train")] == [["a"], ["b"], ["c"]]
    assert data_fingerprint(cfg) == {"letters": "abc"}
    from idefics2_ft.data.checks import source_problems

    empty = data_cfg(source="hub")
    empty.source = "letters"  # the schema's choices are pinned above; the checks ask the registry
    assert source_problems(empty, "data") == ["data.path is required with source letters: the letters to ask about."]
    assert sources.kind_of(cfg).for_split(cfg, "test") == {"val_split": "test"}


def test_each_kind_checks_its_own_keys_and_streaming_asks_the_kind(tmp_path):
    cfg = compose_config(["data=jsonl", f"run_dir={tmp_path}", "data.streaming=true"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    said = str(err.value)
    assert "data.train_file is required with source jsonl" in said
    assert "data.streaming=true reads data.path (a Hub dataset or data files), not source jsonl" in said
    cfg = compose_config(["data=hub", f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="data.path is required with source hub"):
        validate(cfg)


def test_evaluate_asks_the_kind_which_splits_it_has(tmp_path):
    from idefics2_ft.tasks.evaluate import config_for_split

    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    for path in (train, val):
        path.write_text(json.dumps({"question": "q", "answers": ["a"], "image": "x.png"}) + "\n")
    cfg = compose_config(["data=jsonl", f"data.train_file={train}", f"data.val_file={val}", f"run_dir={tmp_path}"])
    assert config_for_split(cfg, "train").data.val_file == str(train)
    with pytest.raises(ConfigError, match="a JSONL run's splits are its files"):
        config_for_split(cfg, "test")
    easy = compose_config(["data=easyvqa", f"run_dir={tmp_path}"])
    assert config_for_split(easy, "train").data.val_split == "train"
    with pytest.raises(ConfigError, match="easy-VQA ships the splits train and test"):
        config_for_split(easy, "validation")


def test_the_registry_and_the_data_checks_import_no_torch():
    """``validate`` asks the data room for its keys' problems before anything loads (``--help`` stays quick)."""
    code = "import sys, idefics2_ft.data.checks, idefics2_ft.config; print(sorted({'torch', 'lightning', 'datasets'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert out.strip() == "[]"


def _cauldron_subset(folder: Path, name: str, n: int) -> None:
    """A Cauldron subset as ``huggingface-cli download ... --include "NAME/*"`` leaves it: NAME/train-*.parquet."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "white").save(buf, format="PNG")
    features = datasets.Features(
        {
            "images": datasets.Sequence(datasets.Image()),
            "texts": [
                {
                    "user": datasets.Value("string"),
                    "assistant": datasets.Value("string"),
                    "source": datasets.Value("string"),
                }
            ],
        }
    )
    rows = {
        "images": [[{"bytes": buf.getvalue(), "path": None}]] * n,
        "texts": [[{"user": f"{name} question {i}?", "assistant": f"{name} {i}", "source": name}] for i in range(n)],
    }
    (folder / name).mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / name / "train-00000-of-00001.parquet"))


def test_cauldron_subset_folders_downloaded_without_the_readme_are_found_by_name(tmp_path):
    folder = tmp_path / "the_cauldron"
    _cauldron_subset(folder, "chartqa", 3)
    _cauldron_subset(folder, "vqav2", 2)
    base = [
        "data=cauldron",
        f"data.path={folder}",
        "data.train_split=train",
        "data.val_split=train",
        f"run_dir={tmp_path}",
    ]
    cfg = compose_config([*base, "data.subset=chartqa"])
    rows = build_rows(cfg.data, "train")
    assert [r.answers for r in rows] == [["chartqa 0"], ["chartqa 1"], ["chartqa 2"]]  # that subset only
    with pytest.raises(DataError) as missing:
        build_rows(compose_config([*base, "data.subset=docvqa"]).data, "train")
    assert "no folder docvqa/" in str(missing.value) and "['chartqa', 'vqav2']" in str(missing.value)
    assert "data.subset=null" in str(missing.value)
    # following datasets' own hint (subset null) would merge every subset: refused, naming them
    with pytest.raises(DataError, match=r"holds the subset folders \['chartqa', 'vqav2'\].*merge every subset"):
        build_rows(compose_config([*base, "data.subset=null"]).data, "train")
    # the subset's own folder with data.subset=null, as the message says
    alone = compose_config([*base[:1], f"data.path={folder / 'vqav2'}", *base[2:], "data.subset=null"])
    assert len(build_rows(alone.data, "train")) == 2


def test_a_misspelt_mixture_key_is_named_with_the_nearest_one_before_hydra(tmp_path):
    mixture = "data.mixture=[{name: a, source: easyvqa, wieght: 0.5},{name: b, source: easyvqa, weight: 0.5}]"
    for given in (mixture, "+" + mixture):  # Hydra's own hint (+data.mixture) fails the same way
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "recipe=easyvqa_tiny", given, f"run_dir={tmp_path / 'run'}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr[-2000:]
        assert done.stderr.strip().splitlines()[-1] == (
            "data.mixture[0] (a).wieght is not a key of a mixture entry: did you mean weight?"
        )
        assert not (tmp_path / "run").exists()


def test_an_older_run_folder_that_says_source_docvqa_and_lacks_the_new_keys_resumes_as_the_same_run(tmp_path):
    """Review #37: the alias must compare equal on resume, and keys an older version did not write
    (objective.*, data.pairs) at their defaults are no change."""
    import yaml

    from idefics2_ft.tasks.claim import changes

    cfg = compose_config(["data=docvqa", "data.path=/data/docvqa", f"run_dir={tmp_path}"])
    old = OmegaConf.to_container(cfg, resolve=True)
    old["data"]["source"] = "docvqa"
    del old["objective"], old["data"]["pairs"], old["model"]["adapter"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    assert changes(cfg, tmp_path, None) == {}
    moved = compose_config(["data=docvqa", "data.path=/data/docvqa", "objective=dpo", f"run_dir={tmp_path}"])
    assert "objective.name" in changes(moved, tmp_path, None)  # a real change is still one


def test_a_cauldron_subsets_fingerprint_covers_its_own_folder_only(tmp_path):
    """Review #29: downloading another subset into the folder is not an edit of this run's data."""
    folder = tmp_path / "the_cauldron"
    _cauldron_subset(folder, "chartqa", 2)
    cfg = compose_config(["data=cauldron", f"data.path={folder}", "data.subset=chartqa", f"run_dir={tmp_path}"])
    before = data_fingerprint(cfg.data)
    _cauldron_subset(folder, "docvqa", 2)
    assert data_fingerprint(cfg.data) == before and list(before) == ["chartqa/train-00000-of-00001.parquet"]


def test_slices_of_one_data_file_hold_rows_out(tmp_path):
    """Review #22: train[2:] / train[:2] on a JSON file were ignored, and the warning advised them."""
    path = tmp_path / "d.jsonl"
    rows = [{"question": f"q{i}", "answers": [f"a{i}"], "image": "x.png"} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_config(
        [
            "data=hub",
            f"data.path={path}",
            "data.train_split='train[2:]'",
            "data.val_split='train[:2]'",
            f"run_dir={tmp_path}",
        ]
    )
    train, val = build_rows(cfg.data, "train"), build_rows(cfg.data, "val")
    assert [r.answers for r in train] == [["a2"], ["a3"], ["a4"]] and [r.answers for r in val] == [["a0"], ["a1"]]
    assert not kind_of(cfg.data).one_split(val)
    whole = compose_config(["data=hub", f"data.path={path}", f"run_dir={tmp_path}"])
    assert kind_of(whole.data).one_split(build_rows(whole.data, "val"))  # no slices: named as memorisation
    short = compose_config(["data=hub", f"data.path={path}", "data.train_split='train[10:]'", f"run_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"data.train_split='train\[10:\]' leaves no rows"):
        build_rows(short.data, "train")


def test_a_mixture_key_named_as_data_names_it_gets_the_entrys_name_and_plan_refuses_typos_too(tmp_path):
    from idefics2_ft.config.validate import mixture_entry_problems

    said = mixture_entry_problems([{"name": "a", "max_train_samples": 5}])
    assert said == ["data.mixture[0] (a).max_train_samples is not a key of a mixture entry: did you mean max_samples?"]
    done = subprocess.run(
        [
            IDEFICS2_FT,
            "plan",
            "recipe=easyvqa_tiny",
            "data.mixture=[{name: a, source: easyvqa, wieght: 1.0}]",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().endswith("did you mean weight?"), done.stderr[-1500:]


def test_evaluating_a_mixture_on_a_split_asks_each_sources_kind(tmp_path):
    """Review #40: a JSONL source of a mixture was scored on its val_file under data.split=train."""
    from idefics2_ft.tasks.evaluate import config_for_split

    train, val = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    for path in (train, val):
        path.write_text(json.dumps({"question": "q", "answers": ["a"], "image": "x.png"}) + "\n")
    mixture = f"data.mixture=[{{name: e, source: easyvqa}}, {{name: j, source: jsonl, train_file: '{train}', val_file: '{val}'}}]"
    cfg = compose_config(["data=easyvqa", mixture, f"run_dir={tmp_path}"])
    picked = config_for_split(cfg, "train")
    entries = {e.name: e for e in picked.data.mixture}
    assert entries["j"].val_file == str(train) and entries["e"].val_split == "train"
    with pytest.raises(ConfigError, match="data.mixture source 'e'.*easy-VQA ships the splits train and test"):
        config_for_split(cfg, "validation")
