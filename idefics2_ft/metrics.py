"""Answer metrics (exact match, ANLS, VQA accuracy, relaxed accuracy, multiple choice, letter match)
and ``METRICS``, the one table of them that everything else reads.

Each entry of ``METRICS`` says what ``data.metric`` may name, how the metric scores an answer, how a
model card and report.html call it, and what a prediction row stores of it. ``score()``, the
config's choices (pinned by ``tests/unit/test_metric_table.py``), the card's metric names, the
predictions' columns and the gallery's right/wrong mark read the table, so a new metric is one
entry here and its tests (``docs/development.md``, "Adding a metric").

The benchmark metrics score as lmms-eval 0.7.3's own functions do, quirks included, so that a number
from here sits beside a published lmms-eval number (``tests/unit/test_metrics_harness.py`` checks
them case by case against lmms-eval's code): ``anls`` as ``lmms_eval/api/metrics.py::anls``,
``vqa_accuracy`` as TextVQA's ``textvqa_process_results`` with its ``EvalAIAnswerProcessor``,
``relaxed_accuracy`` as ChartQA's ``relaxed_correctness``, ``multiple_choice`` as MMMU's
``parse_mmmu_multi_choice_response`` + ``eval_multi_choice``, ``letter_match`` as AI2D's
``MultiChoiceRegexFilter`` + ``exact_match``. Where we differ, on purpose: VQA accuracy over fewer
than 4 references (exact match; lmms-eval would give 0), and a multiple-choice answer that names no
option scores 0 and is flagged (``unparsed``) where lmms-eval picks a letter at random. lmms-eval
strips every generated answer before scoring it; so does our generation. The package never imports
lmms-eval.
"""

from __future__ import annotations

import re
import statistics
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


# ---------------------------------------------------------------- ANLS (DocVQA, InfographicVQA)
ANLS_BOUNDARIES = ("harness", "paper")


def _squashed(text: str) -> str:
    return " ".join(text.lower().split())


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5, boundary: str = "harness") -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA), as lmms-eval scores it.

    The edit distance is taken between the answers lower-cased and with their whitespace collapsed
    (none at either end), but divided by the longer of the two answers as given (``len(text.upper())``,
    surrounding spaces included), which is lmms-eval's ``NL``. The question's score is
    ``1 - min(NL)`` over the references. With ``boundary="harness"`` (the default, lmms-eval's) that
    score is kept unless it is below ``threshold``, so an ``NL`` of exactly 0.5 scores 0.5; with
    ``boundary="paper"`` (Biten et al. 2019: ``1 - NL`` only where ``NL < threshold``) it scores 0.

    Args:
        prediction: the model's answer.
        references: the accepted answers; none scores 0.
        threshold: the similarity below which (harness) or the distance from which (paper) a score is 0.
        boundary: ``harness`` or ``paper``, as above.

    Returns:
        The score in [0, 1].
    """
    if boundary not in ANLS_BOUNDARIES:
        raise ValueError(f"anls: boundary={boundary!r}; give one of {', '.join(ANLS_BOUNDARIES)}.")
    if not references:
        return 0.0
    pred = _squashed(prediction)
    distances = []
    for ref in references:
        longest = max(len(ref.upper()), len(prediction.upper()))
        distances.append(0.0 if longest == 0 else levenshtein(_squashed(ref), pred) / longest)
    nearest = min(distances)
    similarity = 1 - nearest
    kept = similarity >= threshold if boundary == "harness" else nearest < threshold
    return similarity if kept else 0.0


# ---------------------------------------------------------------- VQA accuracy (TextVQA, VQAv2)
# The VQA evaluation's contraction table (lmms-eval's EvalAIAnswerProcessor, from MMF), "word>restored".
# The keys with capitals (Im, Ive, ...) never match, since answers are lower-cased first; they are kept
# so that the table is the harness's whole.
_CONTRACTIONS = dict(
    pair.split(">")
    for pair in """
    aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't couldn'tve>couldn't've
    couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't hadnt>hadn't
    hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd hed've>he'd've
    he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's Id've>I'd've I'dve>I'd've Im>I'm
    Ive>I've isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've itll>it'll let's>let's maam>ma'am
    mightnt>mightn't mightnt've>mightn't've mightn'tve>mightn't've mightve>might've
    mustnt>mustn't mustve>must've neednt>needn't notve>not've oclock>o'clock oughtnt>oughtn't
    ow's'at>'ow's'at 'ows'at>'ow's'at 'ow'sat>'ow's'at shant>shan't shed've>she'd've
    she'dve>she'd've she's>she's shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've
    shouldn'tve>shouldn't've somebody'd>somebodyd somebodyd've>somebody'd've
    somebody'dve>somebody'd've somebodyll>somebody'll somebodys>somebody's someoned>someone'd
    someoned've>someone'd've someone'dve>someone'd've someonell>someone'll someones>someone's
    somethingd>something'd somethingd've>something'd've something'dve>something'd've
    somethingll>something'll thats>that's thered>there'd thered've>there'd've
    there'dve>there'd've therere>there're theres>there's theyd>they'd theyd've>they'd've
    they'dve>they'd've theyll>they'll theyre>they're theyve>they've twas>'twas wasnt>wasn't
    wed've>we'd've we'dve>we'd've weve>we've werent>weren't whatll>what'll whatre>what're
    whats>what's whatve>what've whens>when's whered>where'd wheres>where's whereve>where've
    whod>who'd whod've>who'd've who'dve>who'd've wholl>who'll whos>who's whove>who've
    whyll>why'll whyre>why're whys>why's wont>won't wouldve>would've wouldnt>wouldn't
    wouldnt've>wouldn't've wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll
    yall'd've>y'all'd've y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've
    you'dve>you'd've youll>you'll youre>you're youve>you've
    """.split()
)
_NUMBERS = {"none": "0"} | {
    word: str(n) for n, word in enumerate("zero one two three four five six seven eight nine ten".split())
}
_ARTICLES = {"a", "an", "the"}
# The marks the VQA evaluation takes out ("'", ":", "%", "*", ... stay). Each goes without a trace where the
# answer has it beside a space, or where the answer holds a digit-comma-digit (never, in fact: the commas are
# gone by then; kept as the harness has it); else it becomes a space.
_VQA_MARKS = ';/[]"{}()=+\\_-><@`,?!'
_DIGIT_COMMA_DIGIT = re.compile(r"\d,+\d")
# A full stop not followed by a digit goes ("3.5" keeps its point). The harness passes re.UNICODE (32) where
# re.sub takes its count, so only the first 32 such stops go; we keep that.
_LONE_STOP = re.compile(r"\.(?!\d)")
_STOPS_REMOVED = 32
VQA_MIN_REFERENCES = 4  # the leave-one-out formula needs 3 references in each subset to reach 1


def normalize_vqa(text: str) -> str:
    """An answer as the VQA evaluation (lmms-eval's ``EvalAIAnswerProcessor``) compares it: lower case,
    ``,`` and ``?`` out, ``'s`` split off as a word, the marks above out (or spaces), full stops out
    (a decimal point stays; at most 32), number words as digits, articles out, contractions restored."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    drop_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _VQA_MARKS:  # each mark decided on the answer as it came in, not as it is being rewritten
        beside_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if drop_all or beside_space else " ")
    out = _LONE_STOP.sub("", out, count=_STOPS_REMOVED)
    words = [_NUMBERS.get(word, word) for word in out.lower().split()]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy (VQAv2, TextVQA) as lmms-eval's TextVQA scores it: answers normalised by
    ``normalize_vqa``, then ``min(matches / 3, 1)`` averaged over the leave-one-out subsets of the
    references (10 human answers: each subset holds 9).

    The one place we differ from lmms-eval: with fewer than 4 references (a Cauldron row holds one
    answer) no subset could score 1 (lmms-eval gives at most 2/3, and 0 to every answer against one
    reference), so the score is the exact match of the normalised answers. No reference scores 0.
    """
    pred = normalize_vqa(prediction)
    refs = [normalize_vqa(r) for r in references]
    if not refs:
        return 0.0
    if len(refs) < VQA_MIN_REFERENCES:
        return float(pred in refs)
    matches = sum(r == pred for r in refs)
    # leaving out reference i leaves the matches less its own; statistics.mean sums exactly, as lmms-eval's does
    return statistics.mean(min(1, float(matches - (r == pred)) / 3) for r in refs)


# ---------------------------------------------------------------- relaxed accuracy (ChartQA)
RELAXED_TOLERANCE = 0.05


def chart_number(text: str) -> float | None:
    """The number ChartQA's relaxed accuracy reads in an answer: Python's ``float`` of it as it is
    (surrounding whitespace, ``_`` between digits, ``nan``, ``inf`` accepted; ``1,204`` is no number),
    a trailing ``%`` (or several) read as hundredths (``12%`` is 0.12); None where it is no number."""
    percent = text.endswith("%")
    try:
        value = float(text.rstrip("%") if percent else text)
    except ValueError:
        return None
    return value / 100.0 if percent else value


def relaxed_accuracy(prediction: str, references: Sequence[str], tolerance: float = RELAXED_TOLERANCE) -> float:
    """ChartQA's relaxed accuracy as lmms-eval scores it (``relaxed_correctness``): where both answers
    are numbers (``chart_number``) and the reference's is not 0, right within ``tolerance`` (5%,
    inclusive) of it, relative to it; else the two must be equal but for case (nothing stripped, so
    ``"12%"`` against ``"12"`` is wrong and a reference of 0 needs the same text). Best over the
    references."""
    pred = chart_number(prediction)
    for ref in references:
        target = chart_number(ref)
        if pred is not None and target:  # 0 (and no number) is compared as text
            right = abs(pred - target) / abs(target) <= tolerance
        else:
            right = prediction.lower() == ref.lower()
        if right:
            return 1.0
    return 0.0


# ---------------------------------------------------------------- multiple choice (AI2D, MMMU, ScienceQA)
_OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[.)]\s+(.+?)\s*$", re.MULTILINE)
_LETTER = re.compile(r"^(?:answer\s*(?:is)?\s*:?\s*)?\(?([A-Z])\)?(?:[.):]|\s|$)", re.IGNORECASE)
_EDGE_MARKS = (",", ".", "!", "?", ";", ":", "'")  # stripped from the ends of an answer, one mark after the other


def option_block(question: str) -> tuple[int, int, dict[str, str]]:
    """Where a question's options are: ``(first line, line after the last, {"A": "Oxygen", ...})``.

    The options are the last run of consecutive lines lettered A, B, C, ... in order ("A. Oxygen",
    "(B) Carbon dioxide", "C) Nitrogen"), so a stem's own numbered lines ("I. x > 0") or a line that
    merely starts like one ("A. Smith wrote ...") are not taken for options. ``(0, 0, {})`` if none.
    """
    lines = question.splitlines()
    found: tuple[int, int, dict[str, str]] = (0, 0, {})
    i = 0
    while i < len(lines):
        match = _OPTION_LINE.match(lines[i])
        if not match or match.group(1) != "A":
            i += 1
            continue
        options, j = {}, i
        while j < len(lines):
            match = _OPTION_LINE.match(lines[j])
            if not match or match.group(1) != chr(ord("A") + len(options)):
                break
            options[match.group(1)] = match.group(2)
            j += 1
        found = (i, j, options)
        i = j
    return found


def options_of(question: str) -> dict[str, str]:
    """``{"A": "Oxygen", ...}``: the question's options (``option_block``), in order."""
    return option_block(question)[2]


def choice_letter(answer: str, options: dict[str, str]) -> str | None:
    """The option a reference names: its letter ("B", "B.", "(B)", "Answer: B") or an option's text.
    (A prediction is read by ``read_choice``, as the harness reads it.)"""
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


def read_choice(answer: str, options: dict[str, str]) -> str | None:
    """The option letter an answer names, read as lmms-eval's MMMU parser
    (``parse_mmmu_multi_choice_response``) reads it, or None where it names none (where the parser
    picks a letter at random).

    After stripping ``, . ! ? ; : '`` from its ends (one mark after the other), the answer names the
    letters written ``(B)``; failing those, the letters followed by a space (``B`` alone, ``Answer: B``);
    failing those, the letters followed by a full stop (``B.``); failing those, and only in an answer of
    more than 5 words, the options whose text it holds (case aside). Of several, the one written last
    wins (by ``(B)``, by `` B `` or by the option's text; ties go to the first option). Only capitals
    count: ``b`` names nothing. A question without option lines offers every letter A-Z (no texts).
    """
    letters = list(options) or list(string.ascii_uppercase)
    for mark in _EDGE_MARKS:
        answer = answer.strip(mark)
    padded = f" {answer} "
    found = [c for c in letters if f"({c})" in padded]
    if found:
        return _latest(found, lambda c: padded.rfind(f"({c})"))
    found = [c for c in letters if f"{c} " in padded] or [c for c in letters if f"{c}." in padded]
    if found:  # (for "B." the harness ranks by " B " too)
        return _latest(found, lambda c: padded.rfind(f" {c} "))
    if len(padded.split()) > 5:
        lowered = padded.lower()
        found = [c for c in options if options[c].lower() in lowered]
        if found:
            return _latest(found, lambda c: lowered.rfind(options[c].lower()))
    return None


def _latest(found: list[str], place: Callable[[str], int]) -> str:
    """The letter placed last; of equal places the first (as numpy's argmax, which the harness uses)."""
    places = [place(c) for c in found]
    return found[places.index(max(places))]


def _reference_letters(references: Sequence[str], options: dict[str, str]) -> set[str]:
    return {letter for letter in (choice_letter(ref, options) for ref in references) if letter is not None}


def multiple_choice(prediction: str, references: Sequence[str], question: str = "") -> float:
    """1.0 when the prediction names (``read_choice``, as lmms-eval's MMMU parser reads it) the option
    a reference names (``choice_letter``: ``B``, ``Answer: B`` or the option's text); the options are
    read from the question's lines (``A. ...``). An answer that names no option scores 0 (lmms-eval
    would pick a letter at random); ``names_an_option`` tells those apart (``unparsed``)."""
    options = options_of(question)
    pred = read_choice(prediction, options)
    return float(pred is not None and pred in _reference_letters(references, options))


def names_an_option(prediction: str, question: str) -> bool:
    """Whether ``multiple_choice`` reads an option in the prediction (False: unparsed, scored 0)."""
    return read_choice(prediction, options_of(question)) is not None


# ---------------------------------------------------------------- letter match (lmms-eval's AI2D)
_LEADING_LETTER = re.compile(r"^\s*([A-Z])\.")  # AI2D's MultiChoiceRegexFilter
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)
_REFERENCE_LETTER = re.compile(r"^\s*(?:answer\s*(?:is)?\s*:?\s*)?\(?([A-Z])\)?[.):]?\s*$", re.IGNORECASE)


def _letter_filtered(prediction: str) -> str:
    """The answer AI2D's filter passes on: the letter of a leading ``B.``, else the whole answer; stripped
    (lmms-eval strips each filtered answer before its metric)."""
    match = _LEADING_LETTER.match(prediction)
    return (match.group(1) if match else prediction).strip()


def _letter_form(text: str) -> str:
    """``exact_match`` with ``ignore_case`` and ``ignore_punctuation``: lower case, ASCII punctuation out;
    trailing NULs dropped (numpy's strings, which it compares, do not hold them)."""
    return text.lower().translate(_NO_PUNCTUATION).rstrip("\0")


def letter_match(prediction: str, references: Sequence[str]) -> float:
    """AI2D's score in lmms-eval (``MultiChoiceRegexFilter``, then ``exact_match`` with ``ignore_case`` and
    ``ignore_punctuation``): the answer's leading ``B.`` gives its letter, else the whole answer is
    compared; equal to a reference's letter but for case and ASCII punctuation scores 1. So ``B``,
    ``(B)``, ``b`` and ``B. Carbon dioxide`` name B; ``Answer: B`` and the option's text score 0. A
    reference written ``B``, ``(B)``, ``B.`` or ``Answer: B`` counts as its letter (lmms-eval's
    references are letters)."""
    pred = _letter_form(_letter_filtered(prediction))
    for ref in references:
        match = _REFERENCE_LETTER.match(ref)
        if pred == _letter_form(match.group(1).upper() if match else ref):
            return 1.0
    return 0.0


def names_a_letter(prediction: str, question: str) -> bool:
    """Whether ``letter_match`` reads one option letter in the prediction (any letter where the question
    lists no options); False: unparsed, scored 0."""
    pred = _letter_form(_letter_filtered(prediction))
    return len(pred) == 1 and pred.upper() in (options_of(question) or string.ascii_uppercase)


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
        parses: ``parses(prediction, question)``: whether the answer names an option at all (a
            multiple-choice metric); where given, a row of this metric stores ``unparsed`` (True for an
            answer that names none, which scores 0 and is never guessed). None: nothing to parse.
    """

    name: str
    fn: Callable[..., float]
    display: str
    aliases: tuple[str, ...] = ()
    needs_question: bool = False
    column: str | None = None
    marks_right: bool = False
    parses: Callable[[str, str], bool] | None = None

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
    Metric("multiple_choice", multiple_choice, "Multiple-choice accuracy", needs_question=True, parses=names_an_option),
    # lmms-eval's AI2D scoring: a letter (or "B. ...") only; the ai2d_lmms preset scores with it
    Metric("letter_match", letter_match, "Multiple-choice accuracy (letter)", parses=names_a_letter),
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


def row_scores(metric: str, prediction: str, references: Sequence[str], question: str = "") -> dict[str, float | bool]:
    """What a prediction row stores of its scores: ``score`` (by ``metric``), every diagnostic
    column, and the score again under the metric's name as the config gave it (``accuracy``,
    ``vqa_accuracy``), which the evaluation's predictions.jsonl and the report's gallery read; and
    ``unparsed`` (True/False) where the metric parses options (``Metric.parses``)."""
    chosen = metric_of(metric)
    value = chosen(prediction, references, question)
    scores: dict[str, float | bool] = {"score": value}
    for entry in metric_entries():
        if entry.column is not None:
            scores[entry.column] = value if entry is chosen else entry(prediction, references, question)
    scores[metric] = value
    if chosen.parses is not None:  # an answer that names no option: it scored 0 (a right one was read)
        scores["unparsed"] = value == 0 and not chosen.parses(prediction, question)
    return scores
