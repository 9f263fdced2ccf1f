"""``METRICS`` is the one table of the metrics: the config's choices, ``score()``, the model card's
names, the prediction rows' columns and the gallery's right/wrong mark all read it, and no other
module of the package compares a metric's name."""

from __future__ import annotations

import ast
from types import SimpleNamespace
from typing import get_args

import pytest
import torch

from idefics2_ft.config.choices import Metric as MetricChoice
from idefics2_ft.metrics import (
    METRICS,
    Metric,
    _table,
    diagnostic_columns,
    display_name,
    metric_entries,
    right_columns,
    row_scores,
    score,
)
from tests.helpers import ROOT, compose_config


def shouting(prediction, references):
    """A made-up metric: right when the prediction is the reference in capitals."""
    return float(any(prediction == ref.upper() for ref in references))


SHOUTING = Metric("shouting", shouting, "Shouting accuracy")


def test_the_configs_choices_are_the_tables_names_and_aliases():
    # config may not import metrics (both are foundations): this pins choices.Metric to the table
    assert get_args(MetricChoice) == tuple(METRICS)
    assert METRICS["accuracy"] is METRICS["exact_match"]  # the older name, the same entry


def test_each_entry_is_named_by_its_name_and_aliases_and_shown_by_its_display_name():
    for entry in metric_entries():
        assert all(METRICS[key] is entry for key in (entry.name, *entry.aliases))
        assert entry.display and display_name(entry.name) == entry.display
    assert display_name("anls") == "ANLS" and display_name("accuracy") == "Exact-match accuracy"
    assert display_name("bleu") == "bleu"  # an older run's metric the table no longer has: shown as it is


def test_what_every_row_stores_and_what_marks_it_right_come_from_the_table():
    assert diagnostic_columns() == ["accuracy", "anls"]
    assert right_columns() == ["accuracy"]


def test_a_name_given_twice_and_a_right_mark_without_a_column_are_refused():
    with pytest.raises(ValueError, match="'anls' is given twice"):
        _table(Metric("anls", shouting, "A"), Metric("other", shouting, "B", aliases=("anls",)))
    with pytest.raises(ValueError, match="give it a column"):
        Metric("loud", shouting, "Loud", marks_right=True)


def test_an_unknown_metric_names_the_choices_and_the_table():
    with pytest.raises(ValueError, match=r"data.metric='bleu': not a metric; give one of accuracy, .*METRICS"):
        score("bleu", "a", ["a"])


def test_an_entry_added_to_the_table_is_scoreable_and_named_on_the_card(monkeypatch):
    from huggingface_hub import ModelCard

    from idefics2_ft.tasks.export import model_card

    monkeypatch.setitem(METRICS, "shouting", SHOUTING)
    assert score("shouting", "RED", ["red"]) == 1.0 and score("shouting", "red", ["red"]) == 0.0
    assert display_name("shouting") == "Shouting accuracy"
    cfg = compose_config(["data.metric=shouting", "data.path=me/colours", "name=t"])
    card = ModelCard(model_card(cfg, {"val/shouting": 0.5}, {}, adapter_only=True))
    [result] = card.data.eval_results
    assert (result.metric_type, result.metric_name, result.metric_value) == ("shouting", "Shouting accuracy", 0.5)


def test_a_metric_that_needs_the_question_is_given_it(monkeypatch):
    seen = []
    asks = Metric("asks", lambda p, refs, q: seen.append(q) or 1.0, "Asks", needs_question=True)
    monkeypatch.setitem(METRICS, "asks", asks)
    assert score("asks", "a", ["a"], "Which?") == 1.0 and seen == ["Which?"]
    assert METRICS["multiple_choice"].needs_question and not METRICS["anls"].needs_question


def test_a_rows_scores_are_its_metric_and_the_tables_diagnostic_columns(monkeypatch):
    expected = {"score": 1.0, "accuracy": 1.0, "anls": 1.0, "vqa_accuracy": 1.0}
    assert row_scores("vqa_accuracy", "Red", ["red"]) == expected
    assert row_scores("anls", "red", ["reed"]) == {"score": 0.75, "accuracy": 0.0, "anls": 0.75}
    # a diagnostic column added to the table is stored on every row, whatever the row's metric
    loud = Metric("loud", shouting, "Loud", column="loud")
    monkeypatch.setitem(METRICS, "loud", loud)
    assert row_scores("accuracy", "RED", ["red"]) == {"score": 1.0, "accuracy": 1.0, "anls": 1.0, "loud": 1.0}


def test_the_gallery_marks_right_by_the_tables_columns(monkeypatch):
    from idefics2_ft.reporting.gallery import is_right

    assert is_right({"accuracy": 1.0}) and is_right({"accuracy": 0.0, "score": 1.0})
    assert not is_right({"accuracy": 0.0, "anls": 0.9, "score": 0.9})
    monkeypatch.setitem(METRICS, "loud", Metric("loud", shouting, "Loud", column="loud", marks_right=True))
    assert is_right({"accuracy": 0.0, "loud": 1.0}) and not is_right({"accuracy": 0.0, "loud": 0.0})


class _Answers(torch.nn.Module):
    """A stand-in model: a loss for the batch; the answers are given by ``generate`` below."""

    def forward(self, **inputs):
        return SimpleNamespace(loss=torch.tensor(1.0))


def _validated_rows(metric: str, predictions: list[str], answers: list[list[str]]) -> list[dict]:
    from idefics2_ft.training.lightning_module import Idefics2Module

    tokenizer = SimpleNamespace(convert_tokens_to_ids=lambda token: 1, eos_token_id=2, pad_token_id=0)
    module = Idefics2Module(_Answers(), tokenizer, optimizer_factory=None, metric=metric)
    module.generate = lambda inputs: predictions
    n = len(predictions)
    ids = torch.ones(n, 3, dtype=torch.long)
    batch = {
        "loss_inputs": {"input_ids": ids, "attention_mask": ids, "labels": ids},
        "gen_inputs": {"input_ids": ids},
        "keys": list(range(n)),
        "answers": answers,
        "question_types": [None] * n,
        "ids": [f"q{i}" for i in range(n)],
    }
    module.validation_step(batch, 0)
    return [row for _, row in module._val_rows]


def test_a_validated_rows_columns_come_from_the_table(monkeypatch):
    [row] = _validated_rows("relaxed_accuracy", ["10.4"], [["10"]])
    assert row["score"] == row["relaxed_accuracy"] == 1.0 and row["metric"] == "relaxed_accuracy"
    # the diagnostic columns, whatever the metric: "10.4" is 2 edits from "10" over 4 characters, an NL of
    # exactly 0.5, which ANLS keeps as lmms-eval does (the published definition would give 0)
    assert (row["accuracy"], row["anls"]) == (0.0, 0.5)
    monkeypatch.setitem(METRICS, "shouting", SHOUTING)
    monkeypatch.setitem(METRICS, "loud", Metric("loud", shouting, "Loud", column="loud"))
    [row] = _validated_rows("shouting", ["RED"], [["red"]])
    assert {k: row[k] for k in ("score", "shouting", "accuracy", "anls", "loud")} == dict.fromkeys(
        ("score", "shouting", "accuracy", "anls", "loud"), 1.0
    )


def _compared_names(path, names: set[str]) -> list[str]:
    """Where ``path`` compares, indexes by or keys a dict with a metric's name or column."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Subscript):
            operands = [node.slice]
        elif isinstance(node, ast.Dict):
            operands = [k for k in node.keys if k is not None]
        else:
            continue
        for operand in operands:
            values = operand.elts if isinstance(operand, (ast.Tuple, ast.List, ast.Set)) else [operand]
            for value in values:
                if isinstance(value, ast.Constant) and value.value in names:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {value.value!r}")
    return found


# The table itself, the config's Literal that mirrors it (pinned above), and the package's lazy
# exports, whose keys are the functions ``anls`` and ``exact_match``, not the metrics' names.
OWN_NAMES = {"idefics2_ft/metrics.py", "idefics2_ft/config/choices.py", "idefics2_ft/__init__.py"}


def test_no_other_module_compares_a_metrics_name():
    names = set(METRICS) | set(diagnostic_columns())
    paths = [p for p in sorted((ROOT / "idefics2_ft").rglob("*.py")) if str(p.relative_to(ROOT)) not in OWN_NAMES]
    assert [hit for p in paths for hit in _compared_names(p, names)] == []
