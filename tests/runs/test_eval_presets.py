"""`evaluate` with a preset: the harness's metric and budget, a score card beside every score, unparsed
multiple-choice answers counted, and a split without public answers answered into a submission file."""

import json

import pytest
from PIL import Image

from idefics2_ft.cli.arguments import parse_overrides
from idefics2_ft.metrics import score
from idefics2_ft.presets import PRESETS
from idefics2_ft.tasks.evaluate import SUBMISSION, evaluate, load_run


@pytest.fixture(scope="module")
def loaded(trained_run):
    run_dir, metrics = trained_run
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    model, processor = load_run(cfg)
    return run_dir, metrics, model, processor


def evaluation(loaded, out, *overrides):
    run_dir, _, model, processor = loaded
    cfg, _ = parse_overrides([f"run_dir={run_dir}", *overrides], {})
    metrics = evaluate(cfg, model, processor, cfg.data.val_split, out)
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return cfg, metrics, rows


def qa_file(folder, rows: list[dict]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    for i, row in enumerate(rows):
        Image.new("RGB", (64, 48), colours[i % 3]).save(folder / f"{i}.png")
        row["image"] = f"{i}.png"
    path = folder / "split.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_training_writes_a_score_card_beside_its_validation_score(trained_run):
    run_dir, metrics = trained_run
    cfg, _ = parse_overrides([f"run_dir={run_dir}"], {})
    assert metrics["val/card/preset"] == "training" and metrics["val/card/metric"] == cfg.data.metric
    assert metrics["val/card/questions"] == metrics["val/n_questions"] == 12
    assert metrics["val/card/weights"] == "4-bit base + adapter" and metrics["val/card/image_splitting"] is False
    assert metrics["val/card/max_new_tokens"] == cfg.eval.max_new_tokens
    assert metrics["val/card/longest_edge"] == cfg.data.longest_edge
    assert json.loads((run_dir / "metrics.json").read_text())["val/card/preset"] == "training"


def test_a_preset_scores_with_its_metric_and_writes_the_score_card(loaded, tmp_path):
    cfg, metrics, rows = evaluation(loaded, tmp_path / "eval", "eval.preset=docvqa_lmms")
    preset = PRESETS["docvqa_lmms"]
    assert metrics["eval/anls"] == pytest.approx(
        sum(score("anls", r["prediction"], r["references"]) for r in rows) / 12
    )
    card = json.loads((tmp_path / "eval" / "score_card.json").read_text())
    assert card == {k.removeprefix("eval/"): v for k, v in metrics.items() if k.startswith("eval/card/")}
    import torch
    import transformers

    assert card["card/preset"] == "docvqa_lmms" and card["card/harness"] == preset.harness
    assert card["card/metric"] == "anls" and card["card/max_new_tokens"] == 32 and card["card/questions"] == 12
    assert card["card/weights"] == "4-bit base + adapter" and card["card/image_splitting"] is False
    assert card["card/transformers"] == transformers.__version__ and card["card/torch"] == torch.__version__
    assert card["card/split"] == cfg.data.val_split and card["card/longest_edge"] == cfg.data.longest_edge
    page = (tmp_path / "eval" / "report.html").read_text()
    assert "score card: preset" in page and "docvqa_lmms" in page
    assert "run: after training" not in page  # the run validated with the training prompt: not comparable


def test_unparsed_multiple_choice_answers_are_counted_and_score_zero(loaded, tmp_path):
    options = "\nA. red\nB. green\nC. blue"
    questions = [{"question": f"Which colour fills it?{options}", "answers": ["ABC"[i % 3]]} for i in range(6)]
    path = qa_file(tmp_path / "mc", questions)
    data = ["data.source=jsonl", "data.format=qa", f"data.val_file={path}", "data.max_val_samples=null"]
    _, metrics, rows = evaluation(loaded, tmp_path / "eval", *data, "eval.preset=mmmu_lmms")
    unparsed = [r for r in rows if r["unparsed"]]
    assert metrics["eval/unparsed"] == metrics["eval/card/unparsed"] == len(unparsed)
    assert all(r["multiple_choice"] == 0.0 for r in unparsed)
    assert all(r["references"] in (["A"], ["B"], ["C"]) for r in rows)


def test_a_split_without_answers_is_answered_into_a_submission_file(loaded, tmp_path):
    questions = [
        {"questionId": 57344 + i, "question": f"What is written at the top? {i}", "answers": None} for i in range(5)
    ]
    path = qa_file(tmp_path / "test", questions)
    data = ["data.source=jsonl", "data.format=qa", f"data.val_file={path}", "data.id_column=questionId"]
    _, metrics, rows = evaluation(
        loaded, tmp_path / "eval", *data, "data.max_val_samples=null", "eval.preset=docvqa_lmms"
    )
    submitted = json.loads((tmp_path / "eval" / SUBMISSION).read_text())
    assert submitted == [{"questionId": 57344 + i, "answer": rows[i]["prediction"]} for i in range(5)]
    assert metrics["eval/unanswered"] == metrics["eval/card/unanswered"] == 5 and metrics["eval/card/questions"] == 0
    assert "eval/anls" not in metrics and "eval/loss" not in metrics  # nothing to score against


def test_a_submission_needs_the_id_column_and_says_what_it_leaves_out(loaded, tmp_path, caplog):
    questions = [{"questionId": 900 + i, "question": f"What is written? {i}", "answers": None} for i in range(4)]
    path = qa_file(tmp_path / "test", questions)
    (tmp_path / "test" / "2.png").unlink()  # one page is missing: that question cannot be asked
    data = ["data.source=jsonl", "data.format=qa", f"data.val_file={path}", "data.max_val_samples=null"]
    _, metrics, rows = evaluation(loaded, tmp_path / "no-id", *data, "eval.preset=docvqa_lmms")
    assert not (tmp_path / "no-id" / SUBMISSION).exists()  # its ids would be line numbers
    assert "set data.id_column=" in caplog.text
    _, metrics, rows = evaluation(
        loaded, tmp_path / "eval", *data, "data.id_column=questionId", "eval.preset=docvqa_lmms"
    )
    submitted = json.loads((tmp_path / "eval" / SUBMISSION).read_text())
    assert [a["questionId"] for a in submitted] == [900, 901, 903]
    assert metrics["eval/skipped/missing_image"] == metrics["eval/card/bad_records"] == 1
    assert "missing from it" in caplog.text


def test_questions_a_preset_cannot_ask_are_counted_and_none_at_all_is_an_error(loaded, tmp_path):
    questions = [
        {"question": "Which colour?\nA. red\nB. green", "answers": ["A"]},
        {"question": "Which colour?", "answers": ["red"]},
    ]
    data = ["data.source=jsonl", "data.format=qa", f"data.val_file={qa_file(tmp_path / 'mc', questions)}"]
    _, metrics, rows = evaluation(
        loaded, tmp_path / "eval", *data, "data.max_val_samples=null", "eval.preset=mmmu_lmms"
    )
    assert len(rows) == metrics["eval/card/questions"] == 1
    assert metrics["eval/skipped/preset_options"] == metrics["eval/card/bad_records"] == 1
    from idefics2_ft.data import DataError

    only_bad = ["data.source=jsonl", "data.format=qa", f"data.val_file={qa_file(tmp_path / 'bad', questions[1:])}"]
    with pytest.raises(DataError, match="No question of split .* could be asked .*preset_options 1.*is it the preset"):
        evaluation(loaded, tmp_path / "none", *only_bad, "eval.preset=mmmu_lmms")
    assert not (tmp_path / "none").exists()


MC_QUESTIONS = [
    {
        "question": "Question: Which colour fills it?\nChoices:\nA. red\nB. green\nC. blue\nAnswer with the letter.",
        "answers": ["Answer: A"],
    },
    {"question": "Which colour fills it?\nA. red\nB. green", "answers": ["green"]},
]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_writes_a_score_card(loaded, tmp_path, name):
    preset = PRESETS[name]
    data = ["data.max_val_samples=2"]
    if preset.multiple_choice:
        data += [
            "data.source=jsonl",
            "data.format=qa",
            f"data.val_file={qa_file(tmp_path / 'mc', [dict(q) for q in MC_QUESTIONS])}",
        ]
    _, metrics, rows = evaluation(loaded, tmp_path / "eval", *data, f"eval.preset={name}")
    assert len(rows) == metrics["eval/card/questions"] == 2
    assert metrics["eval/card/preset"] == name and metrics["eval/card/metric"] == preset.metric
    assert metrics["eval/card/max_new_tokens"] == preset.max_new_tokens
    assert f"eval/{preset.metric}" in metrics
    if preset.multiple_choice:
        assert [r["references"] for r in rows] == [["A"], ["B"]]  # the letters the references name
        assert "eval/card/unparsed" in metrics
