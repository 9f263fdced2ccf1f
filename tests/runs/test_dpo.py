"""objective=dpo end to end on the tiny model: each pair format trains from the session's SFT run (its
adapter the reference), starts at ln 2, saves only the policy's adapter, and exports it merged."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from idefics2_ft.demo import formats
from idefics2_ft.tasks.train import train
from tests.helpers import TINY_RUN, compose_config


@pytest.fixture(scope="module")
def pair_files(tmp_path_factory):
    """Each pair format as its project writes it (the demo's easy-VQA pairs: a wrong answer rejected)."""
    root = tmp_path_factory.mktemp("pairs")
    trl = formats.write_trl_pairs(root / "trl", rows=12)
    rlaifv = formats.write_rlaifv(root / "rlaifv", rows=12)
    llamafactory = formats.write_llamafactory_pairs(root / "llamafactory", rows=12)
    swift = formats.write_swift_pairs(root / "swift", rows=12)
    return {
        "trl_pairs": ["data=hub", f"data.path={trl}", "data.val_split=test"],
        "rlaifv": ["data=hub", f"data.path={rlaifv}", "data.train_split='train[4:]'", "data.val_split='train[:4]'"],
        "llamafactory_pairs": ["data=jsonl", f"data.train_file={llamafactory}", f"data.val_file={llamafactory}"],
        "swift_pairs": ["data=jsonl", f"data.train_file={swift}", f"data.val_file={swift}"],
    }


def dpo_cfg(trained_run, tiny_cache, run_dir, *extra: str):
    sft_dir, _ = trained_run
    overrides = [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", f"run_dir={run_dir}", "name=dpo"]
    overrides += ["objective=dpo", f"model.adapter={sft_dir}", "trainer.max_steps=2", "data.max_val_samples=4"]
    return compose_config(overrides + list(extra))


@pytest.mark.parametrize("fmt", ["trl_pairs", "rlaifv", "llamafactory_pairs", "swift_pairs"])
def test_each_pair_format_trains_from_the_sft_run_and_keeps_only_the_policy(
    trained_run, tiny_cache, pair_files, tmp_path, fmt, caplog
):
    run_dir = tmp_path / "run"
    with caplog.at_level("INFO", logger="idefics2_ft"):
        metrics = train(dpo_cfg(trained_run, tiny_cache, run_dir, *pair_files[fmt]))
    said = caplog.text
    assert f"format={fmt}" in said
    # the policy starts as a copy of the SFT adapter, which is the reference: exactly ln 2 at step 0
    start = next(line for line in said.splitlines() if "Step 0: loss" in line)
    assert float(start.split("loss ")[1].split(",")[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["val/pairs"] >= 1 and "validation" not in metrics
    for key in ("val/rewards/chosen", "val/rewards/margins", "val/rewards/accuracies", "val/logps/chosen"):
        assert math.isfinite(metrics[key]), key
    saved = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and not any("reference" in k for k in saved)  # the frozen reference is not the run's adapter
    assert not (run_dir / "adapter" / "reference").exists()
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"]


def test_sft_data_given_to_dpo_and_pairs_given_to_sft_are_refused_naming_the_objective(
    trained_run, tiny_cache, pair_files, tmp_path
):
    from idefics2_ft.data import DataError

    llava = formats.write_llava(tmp_path / "llava", rows=8)
    sft_rows = ["data=jsonl", f"data.train_file={llava}", f"data.val_file={llava}"]
    with pytest.raises(DataError, match=r"objective=dpo trains on preference pairs.*format=llava"):
        train(dpo_cfg(trained_run, tiny_cache, tmp_path / "a", *sft_rows))
    # easy-VQA's own questions have no columns to name: every record is a pair without a rejected side
    with pytest.raises(DataError, match=r"no rejected side \(a pair dataset gives both, for objective=dpo\)"):
        train(dpo_cfg(trained_run, tiny_cache, tmp_path / "b"))
    sft = compose_config(
        [*TINY_RUN, f"model.tiny.cache_dir={tiny_cache}", f"run_dir={tmp_path / 'c'}", *pair_files["swift_pairs"]]
    )
    with pytest.raises(DataError, match="Train on pairs with objective=dpo"):
        train(sft)
