"""Evaluation presets ask the questions as the harnesses do: lmms-eval's own ``doc_to_text`` functions and
task yamls (test-only oracle, ``make install`` puts lmms-eval 0.7.3 in the venv without its dependencies)
give the text our presets must write, and the rendered chat is what the harnesses' Idefics2 models give
the processor (lmms-eval: the chat template; VLMEvalKit: its ``build_prompt_*`` strings)."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import get_args

import pytest
import yaml

from idefics2_ft.config.choices import EvalPreset
from idefics2_ft.data.collator import Idefics2Collator, _expand_images
from idefics2_ft.data.records import Row, qa_messages
from idefics2_ft.presets import PRESETS, EvalRows, apply_preset, preset_of, split_options, unanswered


def lmms_root() -> Path:
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("lmms-eval is not installed (make install puts it in .venv, test-only)")
    return Path(next(iter(spec.submodule_search_locations)))


def lmms_functions(relative: str, *names: str) -> dict:
    """lmms-eval's own functions ``names`` from its file ``relative``, compiled from its source alone (the
    module's imports pull in the whole harness, whose dependencies are not installed)."""
    path = lmms_root() / relative
    tree = ast.parse(path.read_text(encoding="utf-8"))
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in names]
    assert {n.name for n in wanted} == set(names), f"{relative} no longer defines {names}"
    namespace: dict = {"ast": ast, "re": re}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def lmms_yaml(relative: str) -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
    return yaml.load((lmms_root() / relative).read_text(encoding="utf-8"), Loader=Loader)


QUESTIONS = ["what is the total?", "Date of the memo", "  spaced question?  ", "WHO signed it?"]


@pytest.mark.parametrize("question", QUESTIONS)
@pytest.mark.parametrize(
    ("preset", "relative", "function", "template"),
    [
        ("docvqa_lmms", "tasks/docvqa/utils.py", "docvqa_doc_to_text", "tasks/docvqa/_default_template_docvqa_yaml"),
        (
            "textvqa_lmms",
            "tasks/textvqa/utils.py",
            "textvqa_doc_to_text",
            "tasks/textvqa/_default_template_textvqa_yaml",
        ),
        ("chartqa_lmms", "tasks/chartqa/utils.py", "chartqa_doc_to_text", "tasks/chartqa/chartqa.yaml"),
    ],
)
def test_a_vqa_preset_writes_lmms_evals_text(preset, relative, function, template, question):
    doc_to_text = lmms_functions(relative, function)[function]
    config = lmms_yaml(template)
    ours, _ = PRESETS[preset].ask(question)
    assert ours == doc_to_text({"question": question}, config["lmms_eval_specific_kwargs"]["default"])
    budget = config.get("generation_kwargs", {}).get("max_new_tokens", 1024)  # its Idefics2's default: 1024
    assert PRESETS[preset].max_new_tokens == budget


OPTIONS = ["Oxygen", "Carbon dioxide", "Nitrogen", "Water vapour"]


@pytest.mark.parametrize("n", [2, 4])
def test_the_ai2d_preset_writes_lmms_evals_text(n):
    doc_to_text = lmms_functions("tasks/ai2d/utils.py", "ai2d_doc_to_text")["ai2d_doc_to_text"]
    config = lmms_yaml("tasks/ai2d/ai2d.yaml")
    ours, options = PRESETS["ai2d_lmms"].ask(question_with_options("Which gas do plants take in?", OPTIONS[:n]))
    doc = {"question": "Which gas do plants take in?", "options": OPTIONS[:n]}
    assert ours == doc_to_text(doc, config["lmms_eval_specific_kwargs"]["default"])
    assert list(options) == list("ABCD"[:n])
    assert PRESETS["ai2d_lmms"].max_new_tokens == config["generation_kwargs"]["max_new_tokens"]


def test_the_mmmu_preset_writes_lmms_evals_text():
    f = lmms_functions("tasks/mmmu/utils.py", "parse_options", "construct_prompt")
    config = lmms_yaml("tasks/mmmu/mmmu_val.yaml")["lmms_eval_specific_kwargs"]["default"]
    doc = {"question": "What is <image 1> showing?", "question_type": "multiple-choice", "options": repr(OPTIONS)}
    theirs = f["construct_prompt"](doc, config["multiple_choice_prompt"], config["open_ended_prompt"], "format")
    ours, _ = PRESETS["mmmu_lmms"].ask(question_with_options(doc["question"], OPTIONS))
    assert ours == theirs
    assert (
        PRESETS["mmmu_lmms"].max_new_tokens
        == lmms_yaml("tasks/mmmu/_default_template_yaml")["generation_kwargs"]["max_new_tokens"]
    )


def question_with_options(question: str, options: list[str], style: str = "cauldron") -> str:
    lines = [f"{chr(65 + i)}. {text}" for i, text in enumerate(options)]
    if style == "cauldron":  # how The Cauldron's ai2d rows hold a question
        return f"Question: {question}\nChoices:\n" + "\n".join(lines) + "\nAnswer with the letter."
    return question + "\n" + "\n".join(lines)


def test_only_a_run_of_lettered_lines_from_a_is_read_as_the_options():
    statements = "Consider:\nI. x > 0\nII. y > 0\nWhich hold?\nA. I only\nB. II only\nAnswer with the letter."
    assert split_options(statements) == ("Consider:\nI. x > 0\nII. y > 0\nWhich hold?", {"A": "I only", "B": "II only"})
    stem_like_an_option = "A. Smith wrote it.\nWho wrote it?\nA. Smith\nB. Jones"
    assert split_options(stem_like_an_option) == ("A. Smith wrote it.\nWho wrote it?", {"A": "Smith", "B": "Jones"})


@pytest.mark.parametrize("style", ["cauldron", "plain"])
def test_options_are_read_from_either_layout(style):
    stem, options = split_options(question_with_options("Which gas?", OPTIONS, style))
    assert stem == "Which gas?"
    assert options == dict(zip("ABCD", OPTIONS, strict=True))


# VLMEvalKit's Idefics2 (vlmeval/vlm/idefics.py) builds its prompts as strings; these are the strings it
# gives the processor for one image, written out from its build_prompt_default(add_brief=True) and
# build_prompt_puremcq (which rewrites its MCQ dataset's "Options:" / "Please select ..." lines).
VLMEVALKIT = {
    "docvqa_vlmevalkit": "User:<image>what is the total?\nGive a very brief answer.<end_of_utterance>\nAssistant:",
    "ai2d_vlmevalkit": (
        "User:<image>Question: Which gas?\nChoices:\nA. Oxygen\nB. Carbon dioxide\nAnswer with the letter."
        "<end_of_utterance>\nAssistant: Answer:"
    ),
}


@pytest.mark.parametrize("name", sorted(VLMEVALKIT))
def test_a_vlmevalkit_preset_renders_its_prompt(name, processor):
    question = "what is the total?" if name.startswith("docvqa") else question_with_options("Which gas?", OPTIONS[:2])
    row = Row(messages=qa_messages(question, "B"), images=["x.png"], answers=["B"])
    asked = apply_preset(row, PRESETS[name])
    collator = Idefics2Collator(processor, add_generation_prompt=True, generation_prefix=PRESETS[name].prefill)
    text, _ = collator.render(asked.messages[:-1], add_generation_prompt=True)
    # the processor expands their string's <image> as it does ours
    assert text == expanded(VLMEVALKIT[name], collator)


def test_lmms_presets_render_the_chat_template_with_images_first(processor):
    """lmms-eval's Idefics2 puts the images before the text and applies the processor's chat template."""
    row = Row(
        messages=[
            {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
            *qa_messages("what is the total?", "12"),
        ],
        images=["x.png"],
        answers=["12"],
    )
    asked = apply_preset(row, PRESETS["docvqa_lmms"])
    collator = Idefics2Collator(processor)
    text, _ = collator.render(asked.messages[:-1], add_generation_prompt=True)
    content = [{"type": "image"}, {"type": "text", "text": PRESETS["docvqa_lmms"].ask("what is the total?")[0]}]
    template = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert text == expanded(template, collator)


def expanded(prompt: str, collator: Idefics2Collator) -> str:
    """A prompt with its ``<image>`` expanded as the processor expands it before tokenizing."""
    return _expand_images(prompt, collator.image_str, collator.fake_token, collator.image_token)


def test_a_multiple_choice_reference_becomes_its_letter_and_a_question_without_options_is_bad():
    row = Row(messages=qa_messages(question_with_options("Which gas?", OPTIONS), "Carbon dioxide"), images=["x"])
    row.answers = ["Carbon dioxide"]
    assert apply_preset(row, PRESETS["mmmu_lmms"]).answers == ["B"]
    plain = Row(messages=qa_messages("Which gas?", "Oxygen"), images=["x"], answers=["Oxygen"])
    kind, reason = apply_preset(plain, PRESETS["mmmu_lmms"]).problem
    assert kind == "preset_options" and "eval.preset=mmmu_lmms" in reason


def test_a_question_without_an_answer_is_asked_not_scored():
    row = Row(
        messages=qa_messages("what is the total?", ""),
        images=["x"],
        answers=[""],
        problem=("missing_answer", "column 'answers' holds no answer (None)"),
    )
    kept = unanswered(row)
    assert kept.problem is None and kept.answers == []
    asked = EvalRows([row], PRESETS["docvqa_lmms"])[0]
    assert asked.problem is None and asked.answers == []
    assert asked.messages[0]["content"][-1]["text"].endswith("single word or phrase.")


def test_the_configs_choices_are_the_tables_names():
    # config may not import presets (both are foundations): this pins choices.EvalPreset to the table
    assert get_args(EvalPreset) == ("training", *PRESETS)


def test_an_unknown_preset_names_the_ones_there_are():
    assert preset_of("training") is None
    with pytest.raises(ValueError, match="eval.preset='docvqa'.*docvqa_lmms"):
        preset_of("docvqa")
