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
