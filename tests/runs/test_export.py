"""Evaluate, predict, merge with a parity check, model card, push up to the network boundary."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from idefics2_ft.cli.arguments import parse_overrides
from idefics2_ft.data import load_image
from idefics2_ft.hub import HubError, check_write_access, push_folder
from idefics2_ft.models.generation import stop_token_ids
from idefics2_ft.tasks.evaluate import answer, evaluate, load_run
from idefics2_ft.tasks.export import NonFiniteWeights, ParityError, export_run, merge_and_check, parity_batch
from tests.helpers import IDEFICS2_FT

FAKE_TOKEN = "hf_FAKEtoken1234567890abcdefghijklmnopq"


@pytest.fixture
def run_dir(trained_run):
    return trained_run[0]


def run_cfg(run_dir, *overrides):
    cfg, _ = parse_overrides([f"run_dir={run_dir}", *overrides], {})
    return cfg


def test_evaluate_writes_one_prediction_per_question(run_dir, tmp_path):
    cfg = run_cfg(run_dir)
    model, processor = load_run(cfg)
    metrics = evaluate(cfg, model, processor, "test", tmp_path)
    lines = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == cfg.data.max_val_samples == metrics["eval/n_questions"]
    row = json.loads(lines[0])
    assert {"id", "prediction", "references", "accuracy", "anls", "question_type"} <= set(row)
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and "eval/anls" in metrics and metrics["eval/split"] == "test"
    assert json.loads((tmp_path / "eval_metrics.json").read_text()) == metrics


def test_merge_parity_holds_and_the_export_reloads_with_the_same_answers(run_dir, monkeypatch):
    from transformers import Idefics2ForConditionalGeneration

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    cfg = run_cfg(run_dir)
    out, report = export_run(cfg)
    assert report["parity/max_abs_diff"] <= report["parity/atol"] == 1e-3
    assert report["parity/argmax_agreement"] == 1.0
    assert "parity/trained_4bit_vs_merged_max_abs_diff" in report
    names = {p.name for p in out.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "README.md",
        "export_report.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
    } <= names
    assert any(n.endswith(".safetensors") for n in names) and not any("adapter" in n for n in names)

    merged = Idefics2ForConditionalGeneration.from_pretrained(out).eval()
    adapter_model, processor = load_run(cfg, full_precision=True)
    batch = parity_batch(cfg, processor, 4)
    with torch.no_grad():
        gen = {k: v for k, v in batch.items() if k != "labels"}
        kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
        # the export's own generation config stops at <end_of_utterance>, as the project does
        assert merged.generation_config.eos_token_id == stop_token_ids(processor.tokenizer)
        kwargs["eos_token_id"] = stop_token_ids(processor.tokenizer)  # the adapter's base stops at </s> only
        assert torch.equal(merged.generate(**gen, **kwargs), adapter_model.generate(**gen, **kwargs))

    card = (out / "README.md").read_text()
    for field in (
        "Base model",
        "Data:",
        "easyvqa",
        "Recipe and resolved config",
        "do_image_splitting",
        "longest_edge",
        "val/accuracy",
        "Split:",
        "steps",
        "License",
        "from_pretrained",
        "Merge check",
    ):
        assert field in card, field
    for path in Path(run_dir).rglob("*"):  # the token is written nowhere: run folder and export
        if path.is_file():
            assert FAKE_TOKEN.encode() not in path.read_bytes(), path


def test_a_corrupted_adapter_fails_the_parity_check_and_exports_nothing(run_dir, tmp_path):
    import shutil

    broken = tmp_path / "run"
    shutil.copytree(run_dir, broken, ignore=shutil.ignore_patterns("export*", "checkpoints"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    state = load_file(weights)
    key = next(k for k in state if "lora_B" in k and "text_model" in k)
    state[key] = torch.full_like(state[key], float("inf"))
    save_file(state, weights)
    cfg = run_cfg(broken)
    with pytest.raises(ParityError, match="differs from the adapter model"):
        merge_and_check(cfg, broken / "adapter", torch.float32, 2, None)
    with pytest.raises(NonFiniteWeights, match="refusing to export or push"):  # export checks before merging
        export_run(cfg)
    assert not (broken / "export").exists()


def test_adapter_only_export(run_dir, tmp_path):
    cfg = run_cfg(run_dir, "export.adapter_only=true", f"export.out_dir={tmp_path / 'a'}")
    out, report = export_run(cfg)
    names = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= names
    assert "library_name: peft" in (out / "README.md").read_text()
    assert not any(k.startswith("agreement/") for k in report)  # nothing merged: no answer check


def test_the_answer_check_is_what_evaluate_gives_on_both_models(run_dir, tmp_path):
    """export.agreement_questions=N: the model as trained and the merged model answer the first N validation
    questions; the report's figures are those of two evaluations of the same N questions, compared here."""
    n = 8  # of the tiny run's 12 validation questions
    cfg = run_cfg(run_dir, f"export.out_dir={tmp_path / 'merged'}", f"export.agreement_questions={n}")
    out, report = export_run(cfg)
    saved = json.loads((out / "export_report.json").read_text())
    assert {k: v for k, v in saved.items() if k.startswith("agreement/")} == {
        k: v for k, v in report.items() if k.startswith("agreement/")
    }
    assert saved["agreement/questions"] == n and saved["agreement/split"] == cfg.data.val_split
    assert saved["agreement/metric"] == cfg.data.metric

    # independently: evaluate both models on the same first n questions, and compare their predictions
    first_n = run_cfg(run_dir, f"data.max_val_samples={n}")
    trained, processor = load_run(first_n)
    as_trained = evaluate(first_n, trained, processor, cfg.data.val_split, tmp_path / "eval-trained")
    merged, merged_processor = load_run(first_n, model_dir=str(out))
    as_merged = evaluate(first_n, merged, merged_processor, cfg.data.val_split, tmp_path / "eval-merged")
    rows = {
        name: [json.loads(line) for line in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        for name in ("eval-trained", "eval-merged")
    }
    pairs = list(zip(rows["eval-trained"], rows["eval-merged"], strict=True))
    same = sum(a["prediction"] == b["prediction"] for a, b in pairs)
    assert len(pairs) == n and saved["agreement/same_answers"] == same
    assert saved["agreement/same_fraction"] == pytest.approx(same / n)
    metric = f"eval/{cfg.data.metric}"
    assert saved["agreement/adapter_score"] == pytest.approx(as_trained[metric])
    assert saved["agreement/merged_score"] == pytest.approx(as_merged[metric])
    assert saved["agreement/score_difference_points"] == pytest.approx(100 * (as_merged[metric] - as_trained[metric]))
    differing = [
        {"id": a["id"], "adapter": a["prediction"], "merged": b["prediction"], "references": a["references"]}
        for a, b in pairs
        if a["prediction"] != b["prediction"]
    ]
    assert saved["agreement/differing"] == differing[:5]
    assert saved["agreement/ok"] == (same / n >= 0.98 and abs(saved["agreement/score_difference_points"]) <= 0.5)

    card = (out / "README.md").read_text()
    assert "## Adapter vs merged" in card and f"{same} of {n} answers are the same" in card

    # 0 turns it off, and the report and the card say so
    off = run_cfg(run_dir, f"export.out_dir={tmp_path / 'off'}", "export.agreement_questions=0")
    out, report = export_run(off)
    assert report["agreement/skipped"] == "export.agreement_questions=0" and "agreement/questions" not in report
    assert "Not checked: export.agreement_questions=0." in (out / "README.md").read_text()


def test_a_low_agreement_warns_and_the_card_shows_the_differing_answers(tmp_path, caplog):
    from idefics2_ft.tasks.export import agreement_text, answer_agreement
    from tests.helpers import compose_config

    cfg = compose_config([f"run_dir={tmp_path}"])

    def rows(predictions):  # Idefics2Module.val_predictions' rows: the columns the check reads
        return [{"id": f"q|{i}", "prediction": p, "answers": ["red"]} for i, p in enumerate(predictions)]

    as_trained = rows(["red"] * 20)
    merged = rows(["red"] * 18 + ["a | b", "blue"])
    with caplog.at_level("WARNING", logger="idefics2_ft.tasks.export"):
        report = answer_agreement(cfg, (as_trained, 1.0), (merged, 0.9))
    assert (report["agreement/questions"], report["agreement/same_answers"]) == (20, 18)
    assert report["agreement/same_fraction"] == 0.9 and report["agreement/score_difference_points"] == -10.0
    assert report["agreement/ok"] is False and len(report["agreement/differing"]) == 2
    assert "18/20 answers the same" in caplog.text and "the export is written all the same" in caplog.text

    text = agreement_text(cfg, report)
    assert "18 of 20 answers are the same (90.0%)" in text and "-10.00 points" in text
    assert "**outside** the bounds" in text
    assert "| `q\\|18` | red | a \\| b | red |" in text  # a table cell keeps its |


def test_a_negative_number_of_answer_check_questions_is_refused_naming_the_key(tmp_path):
    from idefics2_ft.config import ConfigError, validate
    from tests.helpers import compose_config

    with pytest.raises(ConfigError) as info:
        validate(compose_config([f"run_dir={tmp_path}", "export.agreement_questions=-1"]))
    [problem] = info.value.problems
    assert "export.agreement_questions=-1" in problem and "export.agreement_questions=200" in problem


def test_predict_command_answers(run_dir):
    image = sorted(Path(__import__("easy_vqa").__file__).parent.rglob("*.png"))[0]
    out = subprocess.run(
        [
            IDEFICS2_FT,
            "predict",
            f"run_dir={run_dir}",
            f"image={image}",
            "question=what color is the shape?",
            "max_new_tokens=4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    # one line: the answer the library gives for the same run, image and question
    model, processor = load_run(run_cfg(run_dir))
    expected = answer(model, processor, [load_image(str(image))], "what color is the shape?", max_new_tokens=4)
    assert out.stdout == expected + "\n"


def test_push_without_a_token_fails_fast(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # no stored login
    with pytest.raises(HubError, match="no Hugging Face token"):
        check_write_access("me/model")


def test_training_with_push_checks_the_token_before_any_weight_loads(tiny_run_cfg, monkeypatch, tmp_path):
    from idefics2_ft.tasks import train as train_module

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(train_module, "resolve_base", lambda cfg: (_ for _ in ()).throw(AssertionError("loaded")))
    cfg = tiny_run_cfg("export.push_to_hub=true", "export.hub.repo_id=me/model")
    with pytest.raises(HubError, match="no Hugging Face token"):
        train_module.train(cfg)


def test_push_without_network_says_so_and_keeps_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    with pytest.raises(HubError, match="Cannot reach the Hugging Face Hub"):
        push_folder(folder, "me/model", private=True, commit_message="test")
    with pytest.raises(HubError, match="Cannot reach"):
        check_write_access("me/model")
    assert (folder / "README.md").is_file()


def test_a_run_loads_the_exact_base_it_was_trained_on(run_dir, tmp_path):
    import shutil

    record = json.loads((run_dir / "base_model.json").read_text())
    assert Path(record["path"]).is_absolute() and record["fingerprint"]
    moved = tmp_path / "run"
    shutil.copytree(run_dir, moved, ignore=shutil.ignore_patterns("export*", "checkpoints"))
    cfg = run_cfg(moved, "model.tiny.cache_dir=/nonexistent")  # no rebuild: the record wins
    from idefics2_ft.tasks.evaluate import base_model_path

    assert base_model_path(cfg) == record["path"]
    record["fingerprint"] = "0" * 16
    (moved / "base_model.json").write_text(json.dumps(record))
    with pytest.raises(RuntimeError, match="not the one this run was trained on"):
        base_model_path(cfg)


def test_evaluate_a_merged_folder(run_dir, tmp_path):
    cfg = run_cfg(run_dir, f"export.out_dir={tmp_path / 'merged'}")
    out, _ = export_run(cfg)
    model, processor = load_run(cfg, model_dir=str(out))
    assert not hasattr(model, "peft_config")  # a plain transformers model
    metrics = evaluate(cfg, model, processor, "test", tmp_path / "eval")
    assert metrics["eval/n_questions"] == cfg.data.max_val_samples
    assert len((tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()) == cfg.data.max_val_samples


def test_merging_into_the_dequantized_weights_answers_as_the_trained_model(run_dir, tmp_path):
    reports = {}
    for into in ("original", "dequantized"):
        cfg = run_cfg(run_dir, f"export.merge_into={into}", f"export.out_dir={tmp_path / into}")
        _, reports[into] = export_run(cfg)
        saved = json.loads((tmp_path / into / "export_report.json").read_text())
        assert saved["parity/merged_into"] == into and saved["parity/max_abs_diff"] <= saved["parity/atol"]
        card = (tmp_path / into / "README.md").read_text()
        assert "parity/trained_4bit_vs_merged_max_abs_diff" in card and "model as trained" in card
    original = reports["original"]["parity/trained_4bit_vs_merged_max_abs_diff"]
    dequantized = reports["dequantized"]["parity/trained_4bit_vs_merged_max_abs_diff"]
    # Merged into the original weights, the export differs from the 4-bit model as trained by the NF4
    # rounding; merged into the dequantized ones, only by the 4-bit kernel's arithmetic (bf16 on the CPU).
    assert dequantized < 0.1 * original
    agreement = {k: r["parity/trained_4bit_vs_merged_argmax_agreement"] for k, r in reports.items()}
    assert agreement["dequantized"] >= agreement["original"]


def test_the_cards_metadata_is_what_the_hub_reads(run_dir, tmp_path, monkeypatch):
    """Both cards of a both-ways export parse with huggingface_hub's own card parser; each push goes to its repo."""
    from huggingface_hub import ModelCard

    import idefics2_ft.hub

    pushed = []
    monkeypatch.setattr(
        idefics2_ft.hub, "push_folder", lambda folder, repo_id, *a, **k: pushed.append((folder.name, repo_id)) or "url"
    )
    cfg = run_cfg(
        run_dir,
        f"export.out_dir={tmp_path / 'both'}",
        "export.with_adapter=true",
        "export.push_to_hub=true",
        "export.hub.repo_id=me/tiny-easyvqa",
    )
    out, report = export_run(cfg)
    assert pushed == [("both", "me/tiny-easyvqa"), ("both-adapter", "me/tiny-easyvqa-adapter")]
    assert report["hub/commit/merged"] == report["hub/commit/adapter"] == "url"

    metrics = json.loads((run_dir / "metrics.json").read_text())
    for folder, library in ((out, "transformers"), (tmp_path / "both-adapter", "peft")):
        card = ModelCard.load(folder / "README.md")
        data = card.data
        assert data.library_name == library and data.pipeline_tag == "image-text-to-text"
        assert data.license == "apache-2.0" and "idefics2" in data.tags
        assert data.base_model is None  # the demo's tiny base is on no Hub; a Hub id is named (next test)
        [result] = data.eval_results  # the model-index
        assert result.metric_type == "accuracy" and result.dataset_split == cfg.data.val_split
        assert result.metric_value == round(metrics["val/accuracy"], 4)
        # the score card travels with the score: in the model-index's metric args and as a table in the text
        card_keys = {k.removeprefix("val/card/"): v for k, v in metrics.items() if k.startswith("val/card/")}
        assert result.metric_args == {k: v for k, v in card_keys.items() if k != "split"}
        assert result.metric_args["preset"] == "training" and result.metric_args["weights"] == "4-bit base + adapter"
        assert "| preset | training |" in card.text and f"| questions | {card_keys['questions']} |" in card.text
        assert "val/card/" not in card.text  # not repeated among the scores
        assert "# t: Idefics2 fine-tuned with idefics2-ft" in card.text
    assert (tmp_path / "both-adapter" / "adapter_model.safetensors").is_file()


def test_a_hub_base_and_dataset_are_named_in_the_card_metadata(run_dir):
    from huggingface_hub import ModelCard

    from idefics2_ft.tasks.export import model_card

    cfg = run_cfg(
        run_dir,
        "model.name_or_path=HuggingFaceM4/idefics2-8b",
        "data.source=docvqa",
        "data.path=HuggingFaceM4/DocumentVQA",
        "data.metric=anls",
    )
    card = ModelCard(model_card(cfg, {"val/anls": 0.8123456}, {}, adapter_only=True))
    assert card.data.base_model == "HuggingFaceM4/idefics2-8b" and card.data.datasets == ["HuggingFaceM4/DocumentVQA"]
    assert card.data.library_name == "peft"
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_name, result.metric_value) == ("anls", "ANLS", 0.8123)
    assert result.dataset_type == "HuggingFaceM4/DocumentVQA"


@pytest.mark.parametrize(
    "repo_id, raises",
    [
        ("me/new-model", None),  # the user's own namespace: created at the push
        ("my-org/new-model", None),  # an organization of the user's
        ("someone-else/new-model", "cannot create repos under 'someone-else'"),  # refused now, not after training
        ("me/bad name", "is not a valid Hub repo id"),  # refused offline, before asking the Hub
    ],
)
def test_write_access_treats_a_refusal_as_an_error(repo_id, raises, monkeypatch):
    import httpx
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    class FakeApi:
        def __init__(self, token=None):
            pass

        def whoami(self):
            return {"name": "me", "orgs": [{"name": "my-org"}]}

        def auth_check(self, repo_id, write=False):
            response = httpx.Response(404, request=httpx.Request("GET", "https://huggingface.co"))
            raise RepositoryNotFoundError(f"{repo_id} not found", response=response)

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    if raises is None:
        assert check_write_access(repo_id) == "me"
    else:
        with pytest.raises(HubError, match=raises):
            check_write_access(repo_id)
