"""Answer metrics: exact match after normalisation, and ANLS as DocVQA defines it."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0.

    Args:
        prediction: the model's answer.
        references: the accepted answers.

    Returns:
        1.0 or 0.0.
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA).

    Both sides are lower-cased and stripped of surrounding and repeated whitespace. Per reference,
    the normalized distance is ``NL = distance / max(len)``; the score is ``1 - NL`` where
    ``NL < threshold`` and 0 otherwise (so a distance of exactly half scores 0, as in the published
    definition, Biten et al. 2019); the question's score is the best over its references.

    Args:
        prediction: the model's answer.
        references: the accepted answers.
        threshold: normalized distances at or above it score 0.

    Returns:
        The score in [0, 1].
    """
    pred = " ".join(prediction.lower().split())
    best = 0.0
    for ref in references:
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        distance = 0.0 if longest == 0 else levenshtein(pred, ref) / longest
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


# ---------------------------------------------------------------- VQA accuracy (TextVQA, VQAv2)
_CONTRACTIONS = {
    "dont": "don't",
    "doesnt": "doesn't",
    "isnt": "isn't",
    "arent": "aren't",
    "cant": "can't",
    "wont": "won't",
    "didnt": "didn't",
    "im": "i'm",
    "ive": "i've",
    "youre": "you're",
    "thats": "that's",
    "whats": "what's",
    "wasnt": "wasn't",
    "werent": "weren't",
    "hasnt": "hasn't",
    "havent": "haven't",
}
_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = re.compile(r"(?!<=\d)(\.)(?!\d)|[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$|~:']")
VQA_MIN_REFERENCES = 4  # the leave-one-out formula needs 3 references in each subset to reach 1


def normalize_vqa(text: str) -> str:
    """The VQA evaluation's answer normalisation: lower case, punctuation out (a decimal point
    stays), number words as digits, articles out, common contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _VQA_PUNCT.sub(lambda m: "" if m.group(0) in "'" else " ", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy (VQAv2, TextVQA): ``min(matches / 3, 1)`` averaged over the leave-one-out subsets
    of the references (10 human answers: each subset holds 9).

    With fewer than 4 references (a Cauldron row holds one answer) no subset could score 1, so the
    score is the exact match of the normalised answers.
    """
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(r) for r in references]
    if not refs:
        return 0.0
    if len(refs) < VQA_MIN_REFERENCES:
        return float(pred in refs)
    scores = []
    for left_out in range(len(refs)):
        matches = sum(1 for i, r in enumerate(refs) if i != left_out and r == pred)
        scores.append(min(matches / 3.0, 1.0))
    return sum(scores) / len(scores)


# ---------------------------------------------------------------- relaxed accuracy (ChartQA)
RELAXED_TOLERANCE = 0.05


def _number(text: str) -> float | None:
    text = text.strip().rstrip("%").replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy: a number within ``tolerance`` (5%) of the reference's, relative to
    it; anything else must match exactly (case and surrounding spaces aside). Best over references."""
    pred = prediction.strip()
    for ref in references:
        p, r = _number(pred), _number(ref)
        if p is not None and r is not None:
            if (r == 0 and p == 0) or (r != 0 and abs(p - r) / abs(r) <= tolerance):
                return 1.0
        elif pred.lower() == ref.strip().lower():
            return 1.0
    return 0.0


# ---------------------------------------------------------------- multiple choice (AI2D, ScienceQA)
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.):]\s+(.+?)\s*$", re.MULTILINE)
_LETTER = re.compile(r"^(?:answer\s*(?:is)?\s*:?\s*)?\(?([A-Z])\)?(?:[.):]|\s|$)", re.IGNORECASE)


def options_of(question: str) -> dict[str, str]:
    """``{"A": "Oxygen", ...}`` from option lines in a question ("A. Oxygen", "(B) Carbon dioxide")."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question)}


def choice_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option an answer names: its letter ("B", "B.", "(B)", "Answer: B") or an option's text."""
    text = answer.strip()
    match = _LETTER.match(text)
    if match and (not options or match.group(1).upper() in options):
        rest = text[match.end() :].strip()
        letter = match.group(1).upper()
        # "B. Carbon dioxide" names B; a word that merely starts with a capital ("A cat") is not a letter
        if not rest or not options or normalize_answer(rest) == normalize_answer(options[letter]):
            return letter
    wanted = normalize_answer(text)
    for letter, option in options.items():
        if wanted == normalize_answer(option):
            return letter
    return None


def multiple_choice(prediction: str, references: Sequence[str], question: str = "") -> float:
    """1.0 when the prediction names the reference's option, by letter or by text; the options are
    read from the question's lines (``A. ...``). Without options, the letters are compared."""
    options = options_of(question)
    pred = choice_letter(prediction, options)
    if pred is None:
        return 0.0
    return float(any(choice_letter(ref, options) == pred for ref in references))


def score(metric: str, prediction: str, references: Sequence[str], question: str = "") -> float:
    """The score of ``metric`` (``data.metric``) for one answer."""
    if metric in ("accuracy", "exact_match"):
        return exact_match(prediction, references)
    if metric == "anls":
        return anls(prediction, references)
    if metric == "vqa_accuracy":
        return vqa_accuracy(prediction, references)
    if metric == "relaxed_accuracy":
        return relaxed_accuracy(prediction, references)
    if metric == "multiple_choice":
        return multiple_choice(prediction, references, question)
    raise ValueError(f"data.metric={metric!r}: not a metric.")
