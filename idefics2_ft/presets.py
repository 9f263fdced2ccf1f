"""Evaluation presets: the prompts, budgets and metrics of the harnesses behind published scores, and
``PRESETS``, the one table of them ``eval.preset`` names.

A published row (DocVQA 74.0 ANLS, MMMU 43.0) comes from a harness with its own prompt suffix, option
layout, answer prefill and ``max_new_tokens``; the Idefics2 authors measured that the multiple-choice
prompt alone moves a score by up to a point. A preset rewrites each question of the split the way one
harness asks it of Idefics2, and scores it with that harness's metric (``idefics2_ft.metrics``,
identical to lmms-eval's functions):

- ``*_lmms``: lmms-eval 0.7.3 (``lmms_eval/tasks/<task>/*.yaml``, ``utils.py``; its Idefics2 model puts
  the images first, then the text, through the processor's chat template, no prefill);
- ``*_vlmevalkit``: VLMEvalKit's Idefics2 (``vlmeval/vlm/idefics.py``: ``build_prompt_default`` with
  ``add_brief`` for the VQA sets, ``build_prompt_puremcq`` for AI2D, 1,024 new tokens);
- ``training``: the questions as the run trained on them, its own metric and ``eval.max_new_tokens``.

A multiple-choice preset reads the options from the question's ``A. text`` lines (how The Cauldron's
and our own rows hold them), lays them out as the harness does, and turns each reference into its
letter. A question it cannot read options from is counted as a bad record (``preset_options``),
never guessed. The score card (``score_card``) records which preset scored a number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from idefics2_ft.data.records import Row, count_images, message_text
from idefics2_ft.metrics import choice_letter, option_block

TRAINING = "training"


@dataclass(frozen=True)
class Preset:
    """One way a harness asks and scores a benchmark's questions.

    Attributes:
        name: what ``eval.preset`` gives.
        harness: where the prompt comes from ("lmms-eval 0.7.3", "VLMEvalKit").
        benchmark: the published table it reproduces ("DocVQA").
        prompt: the user turn's text after the images: ``{question}`` is the row's question (for a
            multiple-choice preset without its option lines), ``{options}`` the options as ``A. text``
            lines.
        metric: the ``idefics2_ft.metrics`` entry that scores it.
        max_new_tokens: the harness's generation budget.
        prefill: text the answer starts after ``Assistant:`` (VLMEvalKit's `` Answer:``); not part of it.
        question: ``as_is``; ``capitalize`` (lmms-eval's TextVQA: ``str.capitalize``); ``strip``.
        source: the upstream file the prompt is read from.
    """

    name: str
    harness: str
    benchmark: str
    prompt: str
    metric: str
    max_new_tokens: int
    prefill: str = ""
    question: str = "as_is"
    source: str = ""

    @property
    def multiple_choice(self) -> bool:
        return "{options}" in self.prompt

    def ask(self, question: str) -> tuple[str, dict[str, str]]:
        """The user text for a row's question, and its options (empty unless multiple choice).

        Raises:
            ValueError: a multiple-choice preset found no ``A. text`` option lines in the question.
        """
        options: dict[str, str] = {}
        if self.multiple_choice:
            question, options = split_options(question)
            if len(options) < 2:
                raise ValueError(
                    f"eval.preset={self.name} asks a multiple-choice question, and this one has no option lines "
                    "('A. text' on lines of their own, at least two)"
                )
        if self.question == "capitalize":
            question = question.capitalize()
        elif self.question == "strip":
            question = question.strip()
        listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
        return self.prompt.format(question=question, options=listed), options


_LMMS = "https://github.com/EvolvingLMMs-Lab/lmms-eval/blob/v0.7.3/lmms_eval/tasks/"
_VLMEVAL = "https://github.com/open-compass/VLMEvalKit/blob/main/vlmeval/vlm/idefics.py"
_SHORT = "{question}\nAnswer the question using a single word or phrase."
_BRIEF = "{question}\nGive a very brief answer."
_LETTER = "{question}\n{options}\nAnswer with the option's letter from the given choices directly."


def _table(*presets: Preset) -> dict[str, Preset]:
    table: dict[str, Preset] = {}
    for preset in presets:
        if preset.name in table or preset.name == TRAINING:
            raise ValueError(f"Preset name {preset.name!r} is given twice: give each preset its own name.")
        table[preset.name] = preset
    return table


PRESETS: dict[str, Preset] = _table(
    Preset("docvqa_lmms", "lmms-eval 0.7.3", "DocVQA", _SHORT, "anls", 32, source=_LMMS + "docvqa/"),
    Preset("docvqa_vlmevalkit", "VLMEvalKit", "DocVQA", _BRIEF, "anls", 1024, question="strip", source=_VLMEVAL),
    # lmms-eval's TextVQA yaml sets no max_new_tokens: its Idefics2 model then allows 1,024
    Preset(
        "textvqa_lmms",
        "lmms-eval 0.7.3",
        "TextVQA",
        _SHORT,
        "vqa_accuracy",
        1024,
        question="capitalize",
        source=_LMMS + "textvqa/",
    ),
    Preset(
        "textvqa_vlmevalkit", "VLMEvalKit", "TextVQA", _BRIEF, "vqa_accuracy", 1024, question="strip", source=_VLMEVAL
    ),
    Preset(
        "chartqa_lmms",
        "lmms-eval 0.7.3",
        "ChartQA",
        "{question}\nAnswer the question with a single word.",
        "relaxed_accuracy",
        16,
        source=_LMMS + "chartqa/",
    ),
    Preset(
        "chartqa_vlmevalkit",
        "VLMEvalKit",
        "ChartQA",
        _BRIEF,
        "relaxed_accuracy",
        1024,
        question="strip",
        source=_VLMEVAL,
    ),
    Preset("ai2d_lmms", "lmms-eval 0.7.3", "AI2D", _LETTER, "letter_match", 16, source=_LMMS + "ai2d/"),
    # VLMEvalKit's MCQ prompt ("Question: ...\nOptions:\n...\nPlease select the correct answer from the options
    # above.") as its Idefics2 rewrites it (build_prompt_puremcq), with the " Answer:" prefill
    Preset(
        "ai2d_vlmevalkit",
        "VLMEvalKit",
        "AI2D",
        "Question: {question}\nChoices:\n{options}\nAnswer with the letter.",
        "multiple_choice",
        1024,
        prefill=" Answer:",
        source=_VLMEVAL,
    ),
    Preset(
        "mmmu_lmms",
        "lmms-eval 0.7.3",
        "MMMU (multiple choice)",
        "{question}\n{options}\n\nAnswer with the option's letter from the given choices directly.",
        "multiple_choice",
        128,
        source=_LMMS + "mmmu/",
    ),
)


def preset_of(name: str) -> Preset | None:
    """The table's preset for ``eval.preset``; None for ``training``.

    Raises:
        ValueError: no such preset, naming the ones there are.
    """
    if name == TRAINING:
        return None
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(
            f"eval.preset={name!r}: not a preset; give {TRAINING} or one of {', '.join(PRESETS)} "
            "(docs/evaluate-and-export.md#presets-a-score-beside-a-published-row)."
        ) from None


# ---------------------------------------------------------------- multiple-choice questions
_HEADER = re.compile(r"^\s*(choices|options)\s*:\s*$", re.IGNORECASE)
_QUESTION = re.compile(r"^\s*question\s*:\s*", re.IGNORECASE)


def split_options(text: str) -> tuple[str, dict[str, str]]:
    """``(stem, {"A": "Oxygen", ...})`` from a question whose options are lines lettered A, B, C, ...
    (``metrics.option_block``): the stem is what comes before them, without a ``Question:`` label or a
    ``Choices:`` header; what follows the last option (an instruction such as "Answer with the
    letter.") is dropped, since the preset gives its own."""
    first, _, options = option_block(text)
    if not options:
        return text, {}
    stem = [line for line in text.splitlines()[:first] if not _HEADER.match(line)]
    return _QUESTION.sub("", "\n".join(stem), count=1).strip(), options


# ---------------------------------------------------------------- rows as the preset asks them
def apply_preset(row: Row, preset: Preset) -> Row:
    """The row as ``preset`` asks it: one user turn (the row's images, then the preset's text) and the
    answer; a multiple-choice row's references become the letters they name. A row the preset cannot
    ask is returned with its problem set (``preset_options``): the evaluation counts it as bad."""
    if row.problem or preset is None:
        return row
    users = [m for m in row.messages if m.get("role") == "user"]
    assistant = [m for m in row.messages if m.get("role") == "assistant"]
    if not users or not assistant:
        return row  # check_row names what is missing
    # every image the conversation shows, before the text (how both harnesses lay them out)
    images = [{"type": "image"} for _ in range(count_images(row.messages))]
    try:
        text, options = preset.ask(message_text(users[-1]))
    except ValueError as err:
        return _with(row, problem=("preset_options", str(err)))
    answers = list(row.answers)  # none: a question without a reference answer (unanswered)
    if options and answers:
        letters = [choice_letter(a, options) for a in answers]
        if not all(letters):
            return _with(row, problem=("preset_options", f"the reference {answers!r} names none of the options"))
        answers = letters
    messages = [
        {"role": "user", "content": [*images, {"type": "text", "text": text}]},
        {"role": "assistant", "content": [{"type": "text", "text": answers[0] if answers else NO_REFERENCE}]},
    ]
    return _with(row, messages=messages, answers=answers)


def _with(row: Row, **changes: Any) -> Row:
    return replace(row, **changes)


# the assistant turn of a question without a reference answer (a test split's): generation drops it
NO_REFERENCE = "(no reference answer)"


def unanswered(row: Row) -> Row:
    """A question whose split holds no answer (``missing_answer``: DocVQA's test split) as one to answer
    without scoring: no references, a stand-in assistant turn that generation drops. Other rows as
    they are."""
    if not (row.problem and row.problem[0] == "missing_answer" and row.messages):
        return row
    messages = [m for m in row.messages if m.get("role") != "assistant"]
    messages.append({"role": "assistant", "content": [{"type": "text", "text": NO_REFERENCE}]})
    return _with(row, problem=None, answers=[], messages=messages)


class EvalRows(Sequence):
    """A split's rows as an evaluation asks them, each rewritten when it is read: a question without an
    answer is kept (``unanswered``), and a preset (if any) asks it its way (``apply_preset``)."""

    def __init__(self, rows: Sequence[Row], preset: Preset | None) -> None:
        self.rows, self.preset = rows, preset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):  # type: ignore[override]
        row = unanswered(self.rows[index])
        return apply_preset(row, self.preset) if self.preset is not None else row


# ---------------------------------------------------------------- the score card
def score_card(
    cfg: Any,
    preset: Preset | None,
    split: str,
    model: Any,
    questions: int,
    unparsed: int | None = None,
    unanswered: int = 0,
    bad_records: int = 0,
) -> dict[str, Any]:
    """Everything a score depends on beyond the weights, to put beside it (eval_metrics.json's
    ``card/*``, metrics.json, report.html, the model card's model-index).

    Args:
        cfg: the run's config (data and model keys).
        preset: the preset that asked the questions; None: as trained.
        split: the split answered.
        model: the model that answered (how its weights are held: ``weights_kind``; its dtype).
        questions: questions scored.
        unparsed: multiple-choice answers that named no option (scored 0, never guessed).
        unanswered: questions answered but not scored (their split holds no answer: a submission's).
        bad_records: records that could not be asked (a missing image, no options for the preset).
    """
    import torch
    import transformers

    card: dict[str, Any] = {
        "card/split": split,
        "card/preset": preset.name if preset else TRAINING,
        "card/harness": preset.harness if preset else "idefics2-ft (the training prompt)",
        "card/metric": preset.metric if preset else _run_metric(cfg),
        "card/max_new_tokens": preset.max_new_tokens if preset else cfg.eval.max_new_tokens,
        "card/image_splitting": bool(cfg.data.do_image_splitting),
        "card/longest_edge": int(cfg.data.longest_edge),
        "card/dtype": str(getattr(model, "dtype", cfg.model.dtype)).removeprefix("torch."),  # model.dtype=auto resolved
        "card/weights": weights_kind(cfg, model),
        "card/transformers": transformers.__version__,
        "card/torch": torch.__version__,
        "card/questions": int(questions),
    }
    if unparsed is not None:
        card["card/unparsed"] = int(unparsed)
    if unanswered:
        card["card/unanswered"] = int(unanswered)
    if bad_records:
        card["card/bad_records"] = int(bad_records)
    return card


def _run_metric(cfg: Any) -> str:
    """The metric a run scores with: ``data.metric``, or a mixture's own per source."""
    if not cfg.data.get("mixture"):
        return cfg.data.metric
    per_source = ", ".join(f"{e.name} {e.metric or cfg.data.metric}" for e in cfg.data.mixture)
    return f"score: the mean over sources ({per_source})"


def weights_kind(cfg: Any, model: Any) -> str:
    """How the scored weights are held: the adapter on its base (4-bit where quantized), a merged
    export, or a full fine-tune's weights."""
    if hasattr(model, "peft_config"):  # a PeftModel: the adapter on top of its base
        base = model.get_base_model()
        return "4-bit base + adapter" if getattr(base, "is_loaded_in_4bit", False) else "base + adapter"
    return "full fine-tune" if cfg.peft.method == "full" else "merged"


CARD_FIELDS: tuple[tuple[str, str], ...] = (
    ("card/split", "split"),
    ("card/preset", "preset"),
    ("card/harness", "prompt from"),
    ("card/metric", "metric"),
    ("card/max_new_tokens", "max_new_tokens"),
    ("card/image_splitting", "image splitting"),
    ("card/longest_edge", "longest_edge"),
    ("card/dtype", "dtype"),
    ("card/weights", "weights"),
    ("card/transformers", "transformers"),
    ("card/torch", "torch"),
    ("card/questions", "questions"),
    ("card/unparsed", "unparsed multiple-choice answers"),
    ("card/unanswered", "questions without an answer (not scored)"),
    ("card/bad_records", "records that could not be asked"),
)


def card_rows(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """The score card's fields present in ``metrics`` as ``(label, value)`` rows, in the card's order."""
    return [(label, str(metrics[prefix + key])) for key, label in CARD_FIELDS if prefix + key in metrics]


def card_of(metrics: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The score card a run's or an evaluation's metrics hold, and the prefix of its scores: an
    evaluation's (``eval/card/*``) before the run's own validation (``val/card/*``); ``{}`` if neither."""
    for prefix in ("eval/", "val/"):
        card = {k.removeprefix(prefix + "card/"): v for k, v in metrics.items() if k.startswith(prefix + "card/")}
        if card:
            return prefix, card
    return "", {}


def card_table(metrics: dict[str, Any]) -> str:
    """The score card as a Markdown table (the model card's "Score card"); empty without one."""
    prefix, card = card_of(metrics)
    if not card:
        return ""
    rows = "".join(f"| {label} | {value} |\n" for label, value in card_rows(metrics, prefix))
    return "| setting | value |\n|---|---|\n" + rows
