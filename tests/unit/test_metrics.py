"""The metrics against hand-computed cases. Where lmms-eval 0.7.3 (which the metrics follow, case by case:
tests/unit/test_metrics_harness.py) differs from a paper's written definition, the harness's value is
asserted, with a comment."""

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
    # the edge: a normalized distance of exactly 0.5 scores 0.5 in lmms-eval (it drops similarities
    # below 0.5); the published definition (Biten et al. 2019, NL < 0.5) gives 0: boundary="paper"
    assert anls("1234", ["1243"]) == 0.5
    assert anls("43", ["4332"]) == 0.5
    assert anls("1234", ["1243"], boundary="paper") == anls("43", ["4332"], boundary="paper") == 0.0
    # just under the edge: distance 3 over 7 -> NL 0.43 -> 1 - 3/7
    assert anls("abcdefg", ["abcdxyz"]) == pytest.approx(1 - 3 / 7)
    # distance 3 over 5 -> 0.4 < 0.5 -> 0
    assert anls("abcde", ["abxyz"]) == 0.0
    # best over the references; case and surrounding whitespace ignored in the distance...
    assert anls(" Total ", ["sum", "TOTAL"]) == 1.0
    # ...but not in the length it is divided by (lmms-eval divides by the answers as given):
    # distance 1 over len("  totl  ") = 8, not over len("total") = 5
    assert anls("  totl  ", ["total"]) == pytest.approx(1 - 1 / 8)
    # one character off in nine -> 1 - 1/9
    assert anls("$1,234.5", ["$1,234.56"]) == pytest.approx(1 - 1 / 9)


def test_anls_empty_strings():
    assert anls("", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", []) == 0.0  # (lmms-eval fails on no reference)


def test_anls_names_its_boundaries():
    with pytest.raises(ValueError, match="boundary='strict'"):
        anls("a", ["a"], boundary="strict")


# ---------------------------------------------------------------- the benchmarks' own definitions, by hand
from idefics2_ft.metrics import (  # noqa: E402
    letter_match,
    multiple_choice,
    normalize_vqa,
    relaxed_accuracy,
    row_scores,
    score,
    vqa_accuracy,
)

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
        ("Dont", ["don't"] * 4, 1.0),  # contractions restored
        ("50 %", ["50%"] * 4, 0.0),  # "%" stays, and a space is a difference
        ("new-york", ["new york"] * 4, 1.0),  # a hyphen inside a word becomes a space...
        # ...and goes without a trace, everywhere, where the answer has it beside a space too
        ("e-mail - inbox", ["email inbox"] * 4, 1.0),
        ("red", ["red"], 1.0),  # one reference (a Cauldron row): exact after normalisation
        ("Red!", ["blue"], 0.0),
    ],
)
def test_vqa_accuracy(prediction, references, expected):
    assert vqa_accuracy(prediction, references) == pytest.approx(expected)


def test_vqa_normalisation_keeps_a_decimal_point():
    assert normalize_vqa("The answer is 3.5!") == "answer is 3.5"


def test_vqa_normalisation_takes_out_at_most_32_full_stops():
    # lmms-eval passes re.UNICODE (32) where re.sub takes its count: the 33rd full stop stays
    assert normalize_vqa("." * 33 + "x") == ".x"
    assert normalize_vqa("Man's hat") == "man 's hat"


@pytest.mark.parametrize(
    "prediction, reference, expected",
    [
        ("10.4", "10", 1.0),  # 4% off
        ("10.5", "10", 1.0),  # 5%: the bound is inclusive
        ("10.6", "10", 0.0),
        # lmms-eval's ChartQA reads "12%" as 0.12 (and so 12 is 100 times off) and "1,204" as no number
        # (then compared as text); the paper's relaxed accuracy reads both as 12 and 1204
        ("12%", "12", 0.0),
        ("12%", "0.12", 1.0),
        ("1,204", "1200", 0.0),
        ("1_204", "1200", 1.0),  # python's float() reads it
        (" 10 ", "10", 1.0),  # and surrounding spaces
        ("0", "0", 1.0),
        ("0.1", "0", 0.0),
        ("0.0", "0", 0.0),  # a reference of 0 is compared as text
        ("Yes", "yes", 1.0),  # not numbers: exact, case aside
        ("yes.", "yes", 0.0),
        ("yes ", "yes", 0.0),  # nothing stripped
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
        # lmms-eval's MMMU parser reads capitals only, and an option's text only in an answer of more
        # than 5 words; where it reads nothing it guesses, we score 0 (and flag the answer unparsed)
        ("b.", "B", 0.0),
        ("Carbon dioxide", "B", 0.0),
        ("It gives out carbon dioxide, I think", "B", 1.0),
        ("B. Carbon dioxide", "B", 1.0),
        ("B. Oxygen", "B", 1.0),  # the letter wins (lmms-eval reads "B." before any text)
        ("Either (A) or (B)", "B", 1.0),  # of several, the last written
        ("A", "B", 0.0),
        ("D", "D", 0.0),  # no such option
        ("I think so", "B", 0.0),
    ],
)
def test_multiple_choice(prediction, reference, expected):
    assert multiple_choice(prediction, [reference], QUESTION) == expected


@pytest.mark.parametrize(
    "prediction, unparsed", [("B", False), ("Answer: C", False), ("Carbon dioxide", True), ("D", True), ("", True)]
)
def test_an_answer_naming_no_option_is_flagged_unparsed(prediction, unparsed):
    scores = row_scores("multiple_choice", prediction, ["B"], QUESTION)
    assert scores["unparsed"] is unparsed and (not unparsed or scores["score"] == 0.0)
    assert "unparsed" not in row_scores("anls", prediction, ["B"], QUESTION)  # a metric that parses nothing


@pytest.mark.parametrize(
    "prediction, expected, unparsed",
    [
        ("B", 1.0, False),
        ("(B)", 1.0, False),
        ("b", 1.0, False),  # case and punctuation aside
        ("B. Carbon dioxide", 1.0, False),  # a leading "B." gives the letter
        ("Answer: B", 0.0, True),  # else the whole answer is compared
        ("Carbon dioxide", 0.0, True),
        ("A", 0.0, False),
        ("D", 0.0, True),  # no such option
    ],
)
def test_letter_match_as_lmms_evals_ai2d(prediction, expected, unparsed):
    assert letter_match(prediction, ["Answer: B"]) == letter_match(prediction, ["B"]) == expected
    assert row_scores("letter_match", prediction, ["B"], QUESTION)["unparsed"] is unparsed


def test_score_dispatches_by_the_sources_metric():
    assert score("accuracy", "Red", ["red"]) == score("exact_match", "Red", ["red"]) == 1.0
    assert score("anls", "red", ["reed"]) == pytest.approx(0.75)
    assert score("multiple_choice", "The plants give out oxygen, mostly", ["A"], QUESTION) == 1.0
    assert score("multiple_choice", "(A)", ["A"], QUESTION) == score("letter_match", "A.", ["A"], QUESTION) == 1.0
    with pytest.raises(ValueError, match="not a metric"):
        score("bleu", "a", ["a"])
