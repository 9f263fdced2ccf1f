"""ANLS and exact match against hand-computed cases."""

import pytest

from idefics2_ft.metrics import anls, exact_match, levenshtein, normalize_answer


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("same", "same") == 0


def test_exact_match_normalises_case_punctuation_and_spaces():
    assert exact_match("  Blue. ", ["blue"]) == 1.0
    assert exact_match("dark blue", ["dark  blue", "navy"]) == 1.0
    assert exact_match("blue", ["red"]) == 0.0
    assert normalize_answer("A,  B!") == "a b"


def test_anls_hand_computed():
    # the published edge: a normalized distance of exactly 0.5 is not < 0.5, so it scores 0
    assert anls("1234", ["1243"]) == 0.0
    assert anls("43", ["4332"]) == 0.0
    # just under the edge: distance 3 over 7 -> NL 0.43 -> 1 - 3/7
    assert anls("abcdefg", ["abcdxyz"]) == pytest.approx(1 - 3 / 7)
    # distance 3 over 5 -> 0.4 < 0.5 -> 0
    assert anls("abcde", ["abxyz"]) == 0.0
    # best over the references; case and surrounding whitespace ignored
    assert anls(" Total ", ["sum", "TOTAL"]) == 1.0
    # one character off in nine -> 1 - 1/9
    assert anls("$1,234.5", ["$1,234.56"]) == pytest.approx(1 - 1 / 9)


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", []) == 0.0


# ---------------------------------------------------------------- the benchmarks' own definitions, by hand
from idefics2_ft.metrics import multiple_choice, normalize_vqa, relaxed_accuracy, score, vqa_accuracy  # noqa: E402

TEN = ["2"] * 3 + ["3"] * 7  # ten human answers


@pytest.mark.parametrize(
    "prediction, references, expected",
    [
        # leaving out one of the three "2"s leaves 2 matches (2/3), one of the seven "3"s leaves 3 (1):
        # (3 x 2/3 + 7 x 1) / 10 = 0.9
        ("2", TEN, 0.9),
        ("two", TEN, 0.9),  # number words are digits
        ("3", TEN, 1.0),  # at least 3 matches in every subset
        ("4", TEN, 0.0),
        # one match: leaving it out scores 0, the 9 others 1/3 each: 9 x (1/3) / 10 = 0.3
        ("1", ["1"] + ["5"] * 9, 0.3),
        ("A dog.", ["dog"] * 10, 1.0),  # articles and the full stop go
        ("red", ["red"], 1.0),  # one reference (a Cauldron row): exact after normalisation
        ("Red!", ["blue"], 0.0),
    ],
)
def test_vqa_accuracy(prediction, references, expected):
    assert vqa_accuracy(prediction, references) == pytest.approx(expected)


def test_vqa_normalisation_keeps_a_decimal_point():
    assert normalize_vqa("The answer is 3.5!") == "answer is 3.5"


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("10.4", "10", 1.0),  # 4% off
        ("10.5", "10", 1.0),  # 5%: the bound is inclusive
        ("10.6", "10", 0.0),
        ("12%", "12", 1.0),
        ("1,204", "1200", 1.0),
        ("0", "0", 1.0),
        ("0.1", "0", 0.0),
        ("Yes", "yes", 1.0),  # not numbers: exact, case aside
        ("yes.", "yes", 0.0),
    ],
)
def test_relaxed_accuracy(prediction, reference, expected):
    assert relaxed_accuracy(prediction, [reference]) == expected


QUESTION = (
    "Question: What do plants give out?\nChoices:\nA. Oxygen\nB. Carbon dioxide\nC. Nitrogen\nAnswer with the letter."
)


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("B", "Answer: B", 1.0),
        ("Answer: B", "B", 1.0),
        ("(B)", "B", 1.0),
        ("b.", "B", 1.0),
        ("Carbon dioxide", "B", 1.0),  # the option's text
        ("B. Carbon dioxide", "B", 1.0),
        ("B. Oxygen", "B", 0.0),  # a letter and another option's text names nothing
        ("A", "B", 0.0),
        ("D", "D", 0.0),  # no such option
        ("I think so", "B", 0.0),
    ],
)
def test_multiple_choice(prediction, reference, expected):
    assert multiple_choice(prediction, [reference], QUESTION) == expected


def test_score_dispatches_by_the_sources_metric():
    assert score("accuracy", "Red", ["red"]) == score("exact_match", "Red", ["red"]) == 1.0
    assert score("anls", "red", ["reed"]) == pytest.approx(0.75)
    assert score("multiple_choice", "Oxygen", ["A"], QUESTION) == 1.0
    with pytest.raises(ValueError, match="not a metric"):
        score("bleu", "a", ["a"])
