"""The allowed values of every key that takes one of a few, declared once.

The schema gives each such key ``choice(default, Allowed)``; ``validate`` checks every one of them
from the schema, and its message lists the same values.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args

PeftMethod = Literal["lora", "dora", "full"]
QuantType = Literal["nf4", "fp4"]
QuantStorage = Literal["uint8", "bfloat16", "float16", "float32"]
LoraTarget = Literal["text", "text+connector", "all"]
DType = Literal["auto", "bfloat16", "float16", "float32"]
Attention = Literal["eager", "sdpa", "flash_attention_2"]
# the kinds in idefics2_ft/data/sources (SOURCES), and docvqa, an older name of hub (run folders of
# earlier versions say it); tests/unit/test_source_kinds.py pins this list to the registry
DataSource = Literal["easyvqa", "jsonl", "hub", "docvqa"]
OnBadSample = Literal["skip", "raise"]
# "auto" and the names of idefics2_ft.data.formats.FORMATS, in its order (importing the data package here would
# load torch with the config; tests/unit/test_format_table.py pins the two to each other)
DataFormat = Literal[
    "auto", "trl", "cauldron", "llava", "qa", "trl_pairs", "rlaifv", "llamafactory_pairs", "swift_pairs"
]
# The names and aliases of idefics2_ft.metrics.METRICS, in its order (accuracy is exact_match's older
# name). config may not import metrics (both are foundations), so tests/unit/test_metric_table.py pins the two.
Metric = Literal[
    "accuracy", "exact_match", "anls", "vqa_accuracy", "relaxed_accuracy", "multiple_choice", "letter_match"
]
# how `evaluate` asks and scores the questions: training, or a preset of idefics2_ft/presets.py (pinned to its
# table by tests/unit/test_presets.py: config may not import presets)
EvalPreset = Literal[
    "training",
    "docvqa_lmms",
    "docvqa_vlmevalkit",
    "textvqa_lmms",
    "textvqa_vlmevalkit",
    "chartqa_lmms",
    "chartqa_vlmevalkit",
    "ai2d_lmms",
    "ai2d_vlmevalkit",
    "mmmu_lmms",
]
GroupBy = Literal["none", "length", "aspect"]
Objective = Literal["sft", "dpo"]
# the reference of preference tuning: auto is adapter with model.adapter, else base (docs/preference-tuning.md)
Reference = Literal["auto", "adapter", "base", "none"]
Optimizer = Literal["auto", "adamw", "paged_adamw_8bit"]
Scheduler = Literal["cosine", "constant"]
Precision = Literal["auto", "32-true", "32", "bf16-mixed", "bf16-true", "16-mixed"]
Strategy = Literal["auto", "ddp", "fsdp", "deepspeed"]
Backend = Literal["nccl", "gloo"]
ZeroStage = Literal[2, 3]
LoggerType = Literal["csv", "tensorboard", "wandb", "none"]
MergeInto = Literal["dequantized", "original"]


def choice(default: Any, allowed: Any, *, optional: bool = False) -> Any:
    """A dataclass field whose value must be one of ``allowed`` (a ``Literal``), or None if ``optional``."""
    return dataclasses.field(default=default, metadata={"choices": get_args(allowed), "optional": optional})


def choices_of(schema: type, prefix: str = "") -> dict[str, tuple[tuple, bool]]:
    """``{"peft.method": (("lora", "dora", "full"), False), ...}`` for every choice field under ``schema``."""
    found: dict[str, tuple[tuple, bool]] = {}
    for f in dataclasses.fields(schema):
        if "choices" in f.metadata:
            found[prefix + f.name] = (f.metadata["choices"], f.metadata["optional"])
        elif f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            found.update(choices_of(f.default_factory, f"{prefix}{f.name}."))
    return found
