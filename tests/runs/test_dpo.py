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


# ---------------------------------------------------------------- the rest of the toolkit on a DPO run
@pytest.fixture(scope="module")
def dpo_run(trained_run, tiny_cache, pair_files, tmp_path_factory):
    """One DPO run from the session's SFT run, validated before and after: ``(run_dir, metrics)``."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    extra = (*pair_files["trl_pairs"], "trainer.max_steps=3", "eval.before_training=true", "name=dpo-card")
    return run_dir, train(dpo_cfg(trained_run, tiny_cache, run_dir, *extra))


def test_the_card_of_a_dpo_run_names_its_objective_losses_reference_and_pairs(dpo_run, trained_run, tmp_path):
    from huggingface_hub import ModelCard

    from idefics2_ft.cli.arguments import parse_overrides
    from idefics2_ft.tasks.export import export_run, model_card

    run_dir, metrics = dpo_run
    sft_dir, _ = trained_run
    cfg, _ = parse_overrides([f"run_dir={run_dir}", "export.adapter_only=true", f"export.out_dir={tmp_path / 'a'}"], {})
    out, _ = export_run(cfg)
    card = ModelCard.load(out / "README.md")
    [result] = card.data.eval_results  # the held-out pairs' reward accuracy, not a QA metric never computed
    assert (result.metric_type, result.dataset_split) == ("rewards/accuracies", "test")
    assert result.metric_value == round(metrics["val/rewards/accuracies"], 4)
    assert "dpo" in card.data.tags and card.data.library_name == "peft"
    text = card.text
    assert "**Objective:** preference tuning (`objective=dpo`)" in text
    assert "**Losses:** `sigmoid` (weight 1); beta=0.1" in text
    assert f"**Reference:** the adapter the policy started from, frozen: the run `t` ({sft_dir})" in text
    assert f"**Pair data:** {cfg.data.path} (train split `train`, held-out split `test`, 4 held-out pairs" in text
    assert "val/rewards/margins" in text and "val/accuracy" not in text
    # the other references, and weighted losses, as the card names them
    mpo = ["objective.loss=[sigmoid,bco_pair,sft]", "objective.loss_weights=[0.8,0.2,1.0]", "objective.beta=0.2"]
    cfg, _ = parse_overrides([f"run_dir={run_dir}", *mpo, "objective.reference=base"], {})
    text = model_card(cfg, {}, {}, adapter_only=True)
    assert "**Losses:** `sigmoid` (weight 0.8), `bco_pair` (weight 0.2), `sft` (weight 1); beta=0.2" in text
    assert "**Reference:** the base model with the adapters switched off" in text
    assert f"**Started from:** the adapter `{sft_dir}`" in text
    assert "model-index" not in text  # no held-out score given: no model-index rather than a made-up one
    cfg, _ = parse_overrides([f"run_dir={run_dir}", "objective.loss=[simpo]", "objective.reference=none"], {})
    assert "**Reference:** none: the losses are reference-free" in model_card(cfg, {}, {}, adapter_only=True)


def test_a_dpo_runs_report_draws_the_reward_curves_and_no_answer_gallery(dpo_run):
    run_dir, metrics = dpo_run
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    logged = [row for row in history if "train/rewards/margins" in row]
    assert [row["step"] for row in logged] == [1, 2, 3]
    assert {"train/rewards/accuracies", "train/logps/chosen", "train/length/chosen"} <= set(logged[0])
    page = (run_dir / "report.html").read_text()
    curves = page.split('alt="reward curves: ', 1)[1].split('"', 1)[0].split(", ")
    for stage in ("train", "val"):
        for name in ("chosen", "rejected", "margins", "accuracies"):
            assert f"{stage}/rewards/{name}" in curves
    assert "reward accuracy (chosen above rejected)" in page and f"{metrics['val/rewards/accuracies']:.1%}" in page
    assert "before training" in page and "after training" in page
    assert "objective</th><td>dpo: 1 x sigmoid, beta 0.1; reference: the adapter it started from" in page
    # no question was answered: no gallery and no QA metric rather than empty ones
    assert "<h2>Examples</h2>" not in page and 'class="gallery"' not in page and "accuracy, overall" not in page


def test_evaluate_scores_a_dpo_runs_held_out_pairs_as_its_validation_did(dpo_run, tmp_path, capsys):
    from idefics2_ft.cli.arguments import parse_overrides
    from idefics2_ft.cli.evaluate import main
    from idefics2_ft.config import ConfigError
    from idefics2_ft.tasks.evaluate import evaluate

    run_dir, metrics = dpo_run
    assert main([f"run_dir={run_dir}", f"out_dir={tmp_path / 'pairs'}", "trainer.enable_progress_bar=false"]) == 0
    scored = json.loads((tmp_path / "pairs" / "eval_metrics.json").read_text())
    # the policy against the reference rebuilt from model.adapter: the run's own final validation, again
    for key in ("rewards/accuracies", "rewards/margins", "rewards/chosen", "logps/rejected", "loss", "pairs"):
        assert scored[f"eval/{key}"] == pytest.approx(metrics[f"val/{key}"], abs=1e-5), key
    assert not (tmp_path / "pairs" / "predictions.jsonl").exists()
    page = (tmp_path / "pairs" / "report.html").read_text()
    assert "run: after training" in page and "this evaluation (test)" in page and "reward margin" in page
    # a merged model has no reference: refused in one line, naming what to do
    assert main([f"run_dir={run_dir}", f"model_dir={run_dir}", f"out_dir={tmp_path / 'm'}"]) == 2
    assert "drop model_dir=" in capsys.readouterr().err and not (tmp_path / "m").exists()
    # answers of a question/answer split: objective.name=sft with its data keys
    qa = ["objective.name=sft", "data.source=easyvqa", "data.path=null", "data.max_val_samples=4"]
    assert main([f"run_dir={run_dir}", *qa, f"out_dir={tmp_path / 'qa'}", "trainer.enable_progress_bar=false"]) == 0
    answered = json.loads((tmp_path / "qa" / "eval_metrics.json").read_text())
    assert answered["eval/n_questions"] == 4 and 0.0 <= answered["eval/accuracy"] <= 1.0
    assert "run: after training" not in (tmp_path / "qa" / "report.html").read_text()  # pairs are not answers
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    with pytest.raises(ConfigError, match="is a preference run"):
        evaluate(cfg, None, None, "test", tmp_path / "x")


def test_a_crashed_dpo_run_resumes_to_the_uninterrupted_adapter_with_its_reference_rebuilt(
    trained_run, tiny_cache, pair_files, tmp_path, monkeypatch
):
    """Checkpoints hold the policy's trainable weights only: the resume builds the reference again from
    model.adapter (the SFT run), and ends with the adapter of the run that was never stopped."""
    import torch

    from idefics2_ft.training import RehearsedCrash
    from idefics2_ft.training.preference_module import PreferenceModule
    from tests.helpers import adapter_weights, assert_same_adapters

    sft_dir, _ = trained_run
    common = (
        *pair_files["trl_pairs"],
        "trainer.max_steps=4",
        "trainer.checkpoint_every_n_steps=1",
        "eval.at_end=false",
    )
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(dpo_cfg(trained_run, tiny_cache, straight, *common))
    with pytest.raises(RehearsedCrash):
        train(dpo_cfg(trained_run, tiny_cache, resumed, *common, "debug.crash_at_step=2"))
    state = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2
    assert state["state_dict"] and all(".default." in k for k in state["state_dict"])  # the policy's only

    seen = {}
    start = PreferenceModule.on_train_start

    def record_reference(self):
        start(self)
        seen.update({k: v.detach().clone() for k, v in self.model.named_parameters() if ".reference." in k})
        seen["step"] = self.global_step

    monkeypatch.setattr(PreferenceModule, "on_train_start", record_reference)
    train(dpo_cfg(trained_run, tiny_cache, resumed, *common, "resume=true"))
    assert seen.pop("step") == 2
    sft = adapter_weights(sft_dir)  # the reference, as model.adapter holds it
    assert {k.replace(".reference.", ".") for k in seen} == set(sft)
    assert all(torch.equal(v, sft[k.replace(".reference.", ".")]) for k, v in seen.items())
    assert_same_adapters(straight, resumed)
