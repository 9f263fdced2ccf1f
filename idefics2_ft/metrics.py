"""Answer metrics (exact match, ANLS, VQA accuracy, relaxed accuracy, multiple choice) and ``METRICS``,
the one table of them that everything else reads.

Each entry of ``METRICS`` says what ``data.metric`` may name, how the metric scores an answer, how a
model card and report.html call it, and what a prediction row stores of it. ``score()``, the
config's choices (pinned by ``tests/unit/test_metric_table.py``), the card's metric names, the
predictions' columns and the gallery's right/wrong mark read the table, so a new metric is one
entry here and its tests (``docs/development.md``, "Adding a metric").
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


# ---------------------------------------------------------------- the table
@dataclass(frozen=True)
class Metric:
    """One metric as ``data.metric`` names it.

    Attributes:
        name: the value ``data.metric`` gives, and the metric's name in the metric keys (``val/<name>``).
        fn: the score of one answer in [0, 1]: ``fn(prediction, references)``, or
            ``fn(prediction, references, question)`` where ``needs_question``.
        display: how the model card's model-index and the report name it ("ANLS").
        aliases: other values of ``data.metric`` that mean this metric (an older name); the metric
            keys keep the name the config gave.
        needs_question: the score reads the question too (multiple choice reads its options there).
        column: the column every prediction row holds this score in, whatever the run's metric (a
            diagnostic beside ``score``; users and tests read ``accuracy`` and ``anls``); None: a row
            holds it only when it is the row's metric (as ``score`` and under the metric's name).
        marks_right: a full score in ``column`` marks an answer right in the gallery whatever the
            row's metric (an exact answer is right); needs a ``column``.
    """

    name: str
    fn: Callable[..., float]
    display: str
    aliases: tuple[str, ...] = ()
    needs_question: bool = False
    column: str | None = None
    marks_right: bool = False

    def __post_init__(self) -> None:
        if self.marks_right and self.column is None:
            raise ValueError(f"Metric {self.name!r}: marks_right reads its column; give it a column.")

    def __call__(self, prediction: str, references: Sequence[str], question: str = "") -> float:
        """The score of one answer; the question goes to ``fn`` only where it reads it."""
        if self.needs_question:
            return self.fn(prediction, references, question)
        return self.fn(prediction, references)


def _table(*entries: Metric) -> dict[str, Metric]:
    """``{name or alias: entry}``: every value ``data.metric`` may take, each name given once."""
    table: dict[str, Metric] = {}
    for entry in entries:
        for key in (*entry.aliases, entry.name):
            if key in table:
                raise ValueError(f"Metric name {key!r} is given twice in METRICS: give each metric its own name.")
            table[key] = entry
    return table


METRICS: dict[str, Metric] = _table(
    # accuracy is the older name of exact_match (and the predictions' column of it)
    Metric(
        "exact_match",
        exact_match,
        "Exact-match accuracy",
        aliases=("accuracy",),
        column="accuracy",
        marks_right=True,
    ),
    Metric("anls", anls, "ANLS", column="anls"),
    Metric("vqa_accuracy", vqa_accuracy, "VQA accuracy"),
    Metric("relaxed_accuracy", relaxed_accuracy, "Relaxed accuracy"),
    Metric("multiple_choice", multiple_choice, "Multiple-choice accuracy", needs_question=True),
)


def metric_of(name: str) -> Metric:
    """The table's entry for ``name`` (a ``data.metric`` value or an alias)."""
    try:
        return METRICS[name]
    except KeyError:
        raise ValueError(
            f"data.metric={name!r}: not a metric; give one of {', '.join(METRICS)} (or add an entry to METRICS "
            "in idefics2_ft/metrics.py)."
        ) from None


def metric_entries() -> list[Metric]:
    """The table's entries, each once (an alias names the same entry), in the table's order."""
    return list(dict.fromkeys(METRICS.values()))


def display_name(name: str) -> str:
    """How a model card and a report name the metric ``name`` ("ANLS"); a name not in the table
    (a card written from an older run's metrics) is shown as it is."""
    return METRICS[name].display if name in METRICS else name


def diagnostic_columns() -> list[str]:
    """The score columns every prediction row holds whatever its metric (``accuracy``, ``anls``)."""
    return [m.column for m in metric_entries() if m.column is not None]


def right_columns() -> list[str]:
    """The columns whose full score marks an answer right whatever its metric (``accuracy``)."""
    return [m.column for m in metric_entries() if m.marks_right and m.column is not None]


def score(metric: str, prediction: str, references: Sequence[str], question: str = "") -> float:
    """The score of ``metric`` (``data.metric``) for one answer."""
    return metric_of(metric)(prediction, references, question)


def row_scores(metric: str, prediction: str, references: Sequence[str], question: str = "") -> dict[str, float]:
    """What a prediction row stores of its scores: ``score`` (by ``metric``), every diagnostic
    column, and the score again under the metric's name as the config gave it (``accuracy``,
    ``vqa_accuracy``), which the evaluation's predictions.jsonl and the report's gallery read."""
    chosen = metric_of(metric)
    value = chosen(prediction, references, question)
    scores = {"score": value}
    for entry in metric_entries():
        if entry.column is not None:
            scores[entry.column] = value if entry is chosen else entry(prediction, references, question)
    scores[metric] = value
    return scores
