"""The benchmark metrics score exactly as lmms-eval 0.7.3's own functions do, on thousands of generated
near misses per metric (seeded): edits, case, whitespace, punctuation, ``%``, commas in numbers, full
stops, number words, articles, contractions, ANLS's exact 0.5 boundary, empty answers, option letters
in many forms, option texts in long sentences, answers that name no option.

The oracle is lmms-eval's code as installed (``make install`` puts ``lmms-eval==0.7.3`` in with
``--no-deps``; its own dependencies are far too heavy for a test tool): each file that holds a metric
is loaded by path, with stand-ins for the imports that have nothing to do with scoring (its logger,
sacrebleu, its registry decorators, its LLM-judge verifiers). Skipped only where lmms-eval is absent.

Where lmms-eval's MMMU parser would pick a letter at random (its ``random.choice``, patched here to
return a marker), ours must report the answer unparsed and score it 0.
"""

from __future__ import annotations

import importlib.util
import random
import sys
import types
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from idefics2_ft.metrics import (
    METRICS,
    anls,
    letter_match,
    multiple_choice,
    names_a_letter,
    names_an_option,
    options_of,
    read_choice,
    relaxed_accuracy,
    row_scores,
    vqa_accuracy,
)

LMMS_EVAL_VERSION = "0.7.3"
GUESSED = "<picked at random>"  # what lmms-eval's random.choice returns here
N = 3000  # cases per metric


def _lmms_eval_root() -> Path | None:
    spec = importlib.util.find_spec("lmms_eval")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


LMMS_ROOT = _lmms_eval_root()
if LMMS_ROOT is None:
    pytest.skip(
        f"lmms-eval is not installed: the oracle these metrics are checked against. `make install` installs it "
        f"(pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}, with the oracle extra).",
        allow_module_level=True,
    )


# ---------------------------------------------------------------- lmms-eval's own functions
def _stand_in(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


class _Quiet:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


def _decorator(*args, **kwargs):
    return lambda fn: fn


class _Filter:
    def __init__(self, *args, **kwargs) -> None:
        pass


# imports of the metric files that have nothing to do with scoring
STAND_INS = {
    "sacrebleu": _stand_in("sacrebleu"),
    "loguru": _stand_in("loguru", logger=_Quiet()),
    "lmms_eval.api.registry": _stand_in(
        "lmms_eval.api.registry", register_aggregation=_decorator, register_metric=_decorator
    ),
    "lmms_eval.api.filter": _stand_in("lmms_eval.api.filter", Filter=_Filter),  # (pulls in datasets)
    "lmms_eval.verifiers": _stand_in("lmms_eval.verifiers", VerificationPipeline=object),
    "lmms_eval.verifiers.openai": _stand_in("lmms_eval.verifiers.openai", OpenAIVerifier=object),
}
# lmms-eval's files, in the order they import each other
FILES = {
    "lmms_eval.api.metrics": "api/metrics.py",
    "lmms_eval.filters.extraction": "filters/extraction.py",
    "lmms_eval.tasks._task_utils.file_utils": "tasks/_task_utils/file_utils.py",
    "lmms_eval.tasks._task_utils.vqa_eval_metric": "tasks/_task_utils/vqa_eval_metric.py",
    "lmms_eval.tasks._task_utils.mmmu_mcq_utils": "tasks/_task_utils/mmmu_mcq_utils.py",
    "lmms_eval.tasks.textvqa.utils": "tasks/textvqa/utils.py",
    "lmms_eval.tasks.chartqa.utils": "tasks/chartqa/utils.py",
    "lmms_eval.tasks.mmmu.utils": "tasks/mmmu/utils.py",
    "lmms_eval.tasks.ai2d.utils": "tasks/ai2d/utils.py",
}


def load_lmms_eval(root: Path) -> dict[str, types.ModuleType]:
    """lmms-eval's metric files, run from the installed distribution; ``sys.modules`` is left as it was."""
    added = []
    loaded: dict[str, types.ModuleType] = {}
    try:
        for name, module in STAND_INS.items():
            if name not in sys.modules:
                sys.modules[name] = module
                added.append(name)
        for name, path in FILES.items():
            spec = importlib.util.spec_from_file_location(name, root / path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            added.append(name)
            spec.loader.exec_module(module)
            loaded[name] = module
    finally:
        for name in added:
            sys.modules.pop(name, None)
    # the MMMU parser guesses with random.choice when nothing parses: make the guess visible
    loaded["lmms_eval.tasks._task_utils.mmmu_mcq_utils"].random = types.SimpleNamespace(choice=lambda _: GUESSED)
    return loaded


LMMS = load_lmms_eval(LMMS_ROOT)
_METRICS = LMMS["lmms_eval.api.metrics"]
_TEXTVQA = LMMS["lmms_eval.tasks.textvqa.utils"]
_CHARTQA = LMMS["lmms_eval.tasks.chartqa.utils"]
_MMMU = LMMS["lmms_eval.tasks.mmmu.utils"]
_AI2D = LMMS["lmms_eval.tasks.ai2d.utils"]


def lmms_anls(prediction: str, references: list[str]) -> float:
    """DocVQA's ANLS (``api/metrics.py::anls``, the metric its yaml names)."""
    return _METRICS.anls(references=list(references), predictions=[prediction])["anls"]


def lmms_vqa_accuracy(prediction: str, references: list[str]) -> float:
    """TextVQA's accuracy (``textvqa_process_results``; it rewrites the doc's answers, so a copy)."""
    return _TEXTVQA.textvqa_process_results({"answers": list(references), "question_id": 0}, [prediction])[
        "exact_match"
    ]


def lmms_relaxed_accuracy(prediction: str, references: list[str]) -> float:
    """ChartQA's relaxed accuracy (``relaxed_correctness``; one target a question there, any of ours)."""
    return float(any(_CHARTQA.relaxed_correctness(prediction, ref) for ref in references))


def lmms_mmmu_choice(prediction: str, options: list[str], answer: str) -> tuple[str, float]:
    """MMMU's parsed letter (``mmmu_process_results``; GUESSED where it picks at random) and its score
    (``eval_multi_choice``)."""
    doc = {"id": "validation_Art_1", "question_type": "multiple-choice", "options": repr(options), "answer": answer}
    [parsed] = _MMMU.mmmu_process_results(doc, [prediction])["mmmu_acc"]["parsed_pred"]
    return parsed, float(_MMMU.eval_multi_choice(answer, parsed))


# ai2d.yaml's filter and metric, with its keyword arguments
_AI2D_FILTER = _AI2D.MultiChoiceRegexFilter(
    regex_pattern=r"([A-Z])\.", group_select=0, ignore_case=True, ignore_punctuation=True
)


def lmms_ai2d(prediction: str, target: str) -> float:
    """AI2D's score: the filter, then (as ``ConfigurableTask.process_results`` does for generate_until)
    the filtered answer stripped and given to ``exact_match`` with ai2d.yaml's arguments."""
    [filtered] = _AI2D_FILTER.apply([[prediction]], [{}])
    return float(
        _METRICS.exact_match_fn(
            references=[target], predictions=[filtered.strip()], ignore_case=True, ignore_punctuation=True
        )["exact_match"]
    )


# ---------------------------------------------------------------- near misses
LETTERS = "abcdefghijklmnopqrstuvwxyz"
NOISE = LETTERS + "ABCXYZ0123456789 .,-/%'"
PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!.'%*:#&$"
SPACES = [" ", "  ", "\t", "\n", " \n "]


def edit(rng: random.Random, text: str, edits: int) -> str:
    """``text`` with up to ``edits`` random insertions, deletions and substitutions."""
    chars = list(text)
    for _ in range(edits):
        kind, at = rng.randrange(3), rng.randint(0, len(chars))
        if kind == 0 or not chars:
            chars.insert(at, rng.choice(NOISE))
        elif kind == 1:
            del chars[min(at, len(chars) - 1)]
        else:
            chars[min(at, len(chars) - 1)] = rng.choice(NOISE)
    return "".join(chars)


def recase(rng: random.Random, text: str) -> str:
    return rng.choice([str.lower, str.upper, str.title, str.swapcase, str.capitalize, str])(text)


def pad(rng: random.Random, text: str) -> str:
    """Whitespace around and (doubled) inside."""
    if rng.random() < 0.3:
        text = text.replace(" ", rng.choice(SPACES))
    return rng.choice(["", *SPACES]) + text + rng.choice(["", *SPACES])


def punctuate(rng: random.Random, text: str) -> str:
    """A mark at an end, in the middle, beside a space or not."""
    mark = rng.choice(PUNCTUATION)
    where = rng.randrange(4)
    if where == 0:
        return text + mark
    if where == 1:
        return mark + text
    at = rng.randint(0, len(text))
    gap = " " if where == 2 else ""
    return text[:at] + gap + mark + text[at:]


def near_miss(rng: random.Random, text: str, edits: int = 2) -> str:
    steps = [lambda t: recase(rng, t), lambda t: pad(rng, t), lambda t: punctuate(rng, t)]
    steps.append(lambda t: edit(rng, t, rng.randint(1, edits)))
    for step in rng.sample(steps, rng.randint(0, len(steps))):
        text = step(text)
    return text


# ---------------------------------------------------------------- ANLS
DOC_ANSWERS = [
    "total",
    "Invoice",
    "John Smith",
    "$1,234.56",
    "12/05/2019",
    "ACME Corp.",
    "N/A",
    "42",
    "3.5%",
    "page 3 of 10",
    "Straße",  # upper() is longer: lmms-eval divides by len(answer.upper())
    "İzmir",  # lower() is longer
    "ﬁnal",
    "a",
    "",
    "  spaced   out  ",
]


def anls_cases(rng: random.Random, n: int) -> Iterator[tuple[str, list[str]]]:
    for _ in range(n):
        refs = [near_miss(rng, rng.choice(DOC_ANSWERS), 1) for _ in range(rng.randint(1, 3))]
        kind = rng.random()
        if kind < 0.2:  # exactly half of the characters wrong: NL = 0.5 (before any padding)
            half = rng.randint(1, 5)
            base = "".join(rng.choice(LETTERS) for _ in range(2 * half))
            refs = [base, *refs[: rng.randint(0, 1)]]
            pred = base[:half] + "".join(rng.choice("0123456789") for _ in range(half))
            if rng.random() < 0.3:
                pred = pad(rng, recase(rng, pred))
        elif kind < 0.7:
            pred = near_miss(rng, rng.choice(refs), 3)
        else:
            pred = near_miss(rng, rng.choice(DOC_ANSWERS))
        yield pred, refs


# ---------------------------------------------------------------- VQA accuracy
VQA_ANSWERS = [
    "two",
    "2",
    "dog",
    "a dog",
    "The dog",
    "dogs",
    "don't",
    "dont",
    "it's red",
    "its red",
    "man's hat",
    "1,000",
    "1000",
    "3.5",
    "3.50",
    "yes",
    "no",
    "new york",
    "New-York",
    "coca cola",
    "coca-cola",
    "e.g. this",
    "10:30",
    "50%",
    "none",
    "0",
    "ten",
    "im",
    "i'm",
    "U.S.A.",
    "usa",
    "mr. smith",
    "(c) 2015",
    "left / right",
    "a.b.c",
    "hello!",
    "what?",
    "x_y",
    "@home",
    "x = 5",
    '"quoted"',
    "one, two",
    "1,2",
    "ok\tgo",
    "line\nbreak",
    "youre",
    "whats up",
    "an apple",
    "somebody'd",
    "",
]


def vqa_cases(rng: random.Random, n: int) -> Iterator[tuple[str, list[str]]]:
    for _ in range(n):
        base = rng.choice(VQA_ANSWERS)
        pool = [base] + [near_miss(rng, base, 1) for _ in range(2)] + [rng.choice(VQA_ANSWERS)]
        refs = [rng.choice(pool) for _ in range(rng.randint(4, 10))]
        kind = rng.random()
        if kind < 0.05:  # more full stops than the harness takes out (32)
            pred = ". " * rng.randint(25, 40) + base + "." * rng.randint(0, 10)
        elif kind < 0.5:
            pred = rng.choice(pool)
        else:
            pred = near_miss(rng, rng.choice(pool), 1)
        yield pred, refs


# ---------------------------------------------------------------- relaxed accuracy
def _number_text(rng: random.Random, value: float) -> str:
    forms = [
        lambda v: str(v),
        lambda v: f"{v:.1f}",
        lambda v: f"{v:g}",
        lambda v: str(round(v)),
        lambda v: f"{v}%",
        lambda v: f"{v:,.2f}",  # 1,204.00: no number to float()
        lambda v: f" {v} ",
        lambda v: f"{v:e}",
        lambda v: f"{v:_}" if isinstance(v, int) else f"{round(v):_}",
        lambda v: f"+{v}",
        lambda v: f"{v}%%",
    ]
    return rng.choice(forms)(value)


CHART_WORDS = ["Yes", "yes", "NO", "no", "Ten", "nan", "NaN", "inf", "-inf", "%", "", " ", "0", "0.0", "-0", "0%"]


def relaxed_cases(rng: random.Random, n: int) -> Iterator[tuple[str, list[str]]]:
    for _ in range(n):
        kind = rng.random()
        if kind < 0.55:  # a number and one near it
            target = rng.choice([rng.randint(0, 3000), round(rng.uniform(-100, 100), rng.randint(0, 3)), 10, 100, 0])
            factor = rng.choice([1, 1.05, 0.95, 1.04, 1.06, 0.94, 1 + rng.uniform(-0.1, 0.1), 100, 0.01])
            refs = [_number_text(rng, target)]
            pred = _number_text(rng, round(target * factor, rng.randint(0, 4)))
        elif kind < 0.75:  # the exact 5% edge
            target = rng.choice([10, 20, 100, 40, 2.5])
            refs = [rng.choice([str(target), f"{target}%"])]
            pred = rng.choice([f"{target * 1.05:g}", f"{target * 0.95:g}", f"{target * 1.05:g}%"])
        else:
            refs = [rng.choice(CHART_WORDS + [str(rng.randint(0, 20))])]
            pred = rng.choice([near_miss(rng, refs[0], 1), recase(rng, refs[0]), rng.choice(CHART_WORDS)])
        if rng.random() < 0.15:
            refs.append(rng.choice(CHART_WORDS))
        yield pred, refs


# ---------------------------------------------------------------- multiple choice
OPTION_TEXTS = [
    "Oxygen",
    "Carbon dioxide",
    "Nitrogen",
    "red",
    "red car",
    "A cat",
    "Plan B",
    "none of the above",
    "C. elegans",
    "the sun",
    "water",
    "B",
    "(A) first",
    "2",
    "20",
    "Yes",
    "It is D.",
    "an evaporation cycle",
]
STEMS = ["What do plants give out?", "Which is shown in the diagram?", "What is it?", "Pick one."]


def mc_question(rng: random.Random, texts: list[str]) -> str:
    lines = "\n".join(f"{chr(65 + i)}. {text}" for i, text in enumerate(texts))
    stem = rng.choice(STEMS)
    return rng.choice(
        [
            f"Question: {stem}\nChoices:\n{lines}\nAnswer with the letter.",
            f"{stem}\n{lines}\n\nAnswer with the option's letter from the given choices directly.",
        ]
    )


def mc_answer(rng: random.Random, texts: list[str]) -> str:
    letter = chr(65 + rng.randrange(len(texts) + 1))  # one past the last: no such option
    other = chr(65 + rng.randrange(len(texts)))
    text = rng.choice(texts)
    forms = [
        "{L}",
        "({L})",
        "{L}.",
        "{L})",
        "{L}:",
        "Answer: {L}",
        "The answer is {L}.",
        "{l}",
        "({l})",
        "{L}. {T}",
        "({L}) {T}",
        "{L}: {T}",
        "I think {L} is right",
        "{L}, because {T}",
        "Either {L} or {M}",
        "({L}) or ({M})",
        "{L}{M}",
        " {L} ",
        "**{L}**",
        "{L}\n",
        "'{L}'",
        ",{L}.",
        "Option {L}",
        "{T}",
        "{T}.",
        "The answer is {T} for sure.",
        "I would say that it must be {T} here",
        "It could be {T} or maybe {U}, but I would go with {U}",
        "",
        "I don't know",
        "none",
        "No idea at all what the picture shows here",
        "?",
        "...",
        "it is definitely not any of these options",
    ]
    form = rng.choice(forms)
    answer = form.format(L=letter, l=letter.lower(), M=other, T=text, U=rng.choice(texts))
    return near_miss(rng, answer, 1) if rng.random() < 0.15 else answer


def mc_cases(rng: random.Random, n: int) -> Iterator[tuple[str, list[str], str]]:
    for _ in range(n):
        texts = rng.sample(OPTION_TEXTS, rng.randint(2, 6))
        yield mc_answer(rng, texts), texts, chr(65 + rng.randrange(len(texts)))


# ---------------------------------------------------------------- the checks
def _report(wrong: list, total: int) -> str:
    shown = "\n".join(repr(case) for case in wrong[:10])
    return f"{len(wrong)} of {total} cases differ from lmms-eval {LMMS_EVAL_VERSION}, e.g.:\n{shown}"


def test_the_oracle_is_lmms_eval_0_7_3():
    assert version("lmms-eval") == LMMS_EVAL_VERSION  # the harness the metrics are pinned to
    assert "lmms_eval" not in sys.modules  # loaded by path, not imported; the package never imports it


@pytest.mark.parametrize(
    "ours, theirs, cases",
    [
        (anls, lmms_anls, anls_cases),
        (vqa_accuracy, lmms_vqa_accuracy, vqa_cases),
        (relaxed_accuracy, lmms_relaxed_accuracy, relaxed_cases),
    ],
    ids=["anls", "vqa_accuracy", "relaxed_accuracy"],
)
def test_scores_equal_lmms_evals_on_every_case(ours, theirs, cases):
    rng = random.Random(f"harness-{ours.__name__}")
    wrong = []
    for prediction, refs in cases(rng, N):
        mine, harness = ours(prediction, refs), theirs(prediction, refs)
        if mine != harness:
            wrong.append((prediction, refs, mine, harness))
    assert not wrong, _report(wrong, N)


def test_the_anls_boundary_cases_are_there():
    halves = [(p, r) for p, r in anls_cases(random.Random("harness-anls"), N) if lmms_anls(p, r) == 0.5]
    assert len(halves) > 100  # NL exactly 0.5, which the harness keeps


def test_multiple_choice_reads_as_mmmu_and_never_guesses():
    rng = random.Random("harness-multiple-choice")
    wrong, guessed = [], 0
    for prediction, texts, answer in mc_cases(rng, N):
        question = mc_question(rng, texts)
        options = options_of(question)
        assert list(options.values()) == texts  # our reading of the option lines is the doc's list
        parsed, harness = lmms_mmmu_choice(prediction, texts, answer)
        mine, read, named = (
            multiple_choice(prediction, [answer], question),
            read_choice(prediction, options),
            names_an_option(prediction, question),
        )
        if parsed == GUESSED:
            guessed += 1
            ok = (read, named, mine) == (None, False, 0.0)
        else:
            ok = (read, named, mine) == (parsed, True, harness)
        if not ok:
            wrong.append((prediction, texts, answer, parsed, harness, read, mine))
        scores = row_scores("multiple_choice", prediction, [answer], question)
        assert scores["unparsed"] is (parsed == GUESSED)
    assert not wrong, _report(wrong, N)
    assert 0.1 * N < guessed < 0.6 * N  # the generator reaches both sides


def test_letter_match_scores_as_lmms_evals_ai2d():
    rng = random.Random("harness-letter-match")
    wrong, parsed = [], 0
    for prediction, texts, answer in mc_cases(rng, N):
        question = mc_question(rng, texts)
        mine, harness = letter_match(prediction, [answer]), lmms_ai2d(prediction, answer)
        if mine != harness:
            wrong.append((prediction, answer, mine, harness))
        named = names_a_letter(prediction, question)
        parsed += named
        assert named or mine == 0.0  # an answer without an option letter never scores
    assert not wrong, _report(wrong, N)
    assert 0.2 * N < parsed < 0.8 * N
    assert METRICS["letter_match"].display == "Multiple-choice accuracy (letter)"
