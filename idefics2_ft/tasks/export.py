"""Merge a run's adapter into a full-precision base, check it, save it with a card, push it.

Never merged into the 4-bit base (rounding would change the outputs): the base is reloaded in
bf16 (fp32 on the CPU), the adapter applied, ``merge_and_unload`` called, and the merged model's
logits compared with the unmerged adapter model's on the same base before anything is saved. Then
the answer check: the model as trained (the adapter on its 4-bit base for QLoRA) and the merged
model answer the same ``export.agreement_questions`` validation questions, and the report says how
many answers are the same and how far the two scores are apart (a warning, never a refusal).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import platform
import shutil
from pathlib import Path
from string import Template
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoTokenizer

from idefics2_ft.data.collator import Idefics2Collator
from idefics2_ft.data.dataset import RecordDataset
from idefics2_ft.data.sources import build_rows
from idefics2_ft.metrics import display_name
from idefics2_ft.models import load_full_precision, load_processor, non_finite_parameters, resolve_dtype
from idefics2_ft.models.bases import describe_base
from idefics2_ft.models.generation import generation_config
from idefics2_ft.presets import card_of, card_table, preset_of
from idefics2_ft.ranks import distributed
from idefics2_ft.reporting.page import TEMPLATES, is_preference
from idefics2_ft.run_folder import MARKER, Output, RunFolder, output_folder, read_metrics, redacted, unfinished
from idefics2_ft.stops import StopPolicy, active
from idefics2_ft.tasks.evaluate import answer_questions, base_model_path, load_run

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """The merged model does not reproduce the adapter model: nothing was exported."""


class NonFiniteWeights(ValueError):
    """The adapter holds NaN or infinite weights: nothing is exported or pushed."""


def check_adapter_is_finite(adapter_dir: Path) -> None:
    """Refuse an adapter with a NaN or an infinity in any weight (a diverged run's, say).

    Raises:
        NonFiniteWeights: naming the first offending tensors.
        FileNotFoundError: the folder holds no adapter weights.
    """
    from safetensors.torch import load_file

    files = sorted(Path(adapter_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{adapter_dir} holds no *.safetensors adapter weights: did the run finish?")
    bad = [name for f in files for name in non_finite_parameters(load_file(f))]
    if bad:
        raise NonFiniteWeights(
            f"The adapter in {adapter_dir} holds NaN or infinite weights ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): refusing to export or push it. The run diverged; "
            "train again with a lower optim.lr."
        )


def parity_batch(cfg: DictConfig, processor, n: int) -> dict[str, torch.Tensor]:
    """``n`` validation records as one right-padded batch (bad records skipped)."""
    dataset = RecordDataset(build_rows(cfg.data, "val"), cfg.data.max_val_samples)
    records = [dataset[i] for i in range(min(len(dataset), 4 * n))]
    batch = Idefics2Collator(processor, cfg.data.max_length)(records)
    if "input_ids" not in batch:
        raise ParityError("No usable validation record for the parity check: check data.* in the run's config.")
    return {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor)}


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits.float()
    return logits[batch["attention_mask"].bool()]  # [valid tokens, vocab]


def merge_and_check(
    cfg: DictConfig,
    adapter_dir: Path,
    dtype: torch.dtype,
    n: int,
    atol: float | None,
    merge_into: str = "dequantized",
    questions: int = 0,
):
    """Returns ``(merged_model, processor, report)``; raises ParityError if the check fails.

    The report holds two comparisons of logits: the merged model against the adapter on the same
    full-precision base (``parity/*``: must agree within ``atol``, or nothing is exported), and, for
    QLoRA, against the model as trained, the adapter on its 4-bit base (``parity/trained_4bit_vs_merged_*``).
    With ``questions``, a third of answers (``agreement/*``, ``answer_agreement``): the model as trained
    (``load_run``: ``adapter_dir`` is the run's ``adapter/``) and the merged model answer the first
    ``questions`` validation questions, greedy, as ``evaluate`` answers them.

    The model as trained goes first and is freed before the full-precision base loads: the two are
    never in memory together.
    """
    from peft import PeftModel

    base_path = base_model_path(cfg)
    processor = load_processor(str(adapter_dir), cfg.data)
    batch = parity_batch(cfg, processor, n)
    trained_logits, trained_answers = None, None
    if cfg.peft.quantize is not None or questions:
        trained, _ = load_run(cfg)  # the model as trained and evaluated: 4-bit base for QLoRA, the adapter on top
        if cfg.peft.quantize is not None:  # how far the model as trained is from the export (below)
            trained_logits = _logits(trained, batch).cpu()
        if questions:
            trained_answers = validation_answers(cfg, trained, processor, questions, "the model as trained")
        del trained
        free_memory()
    base = load_full_precision(base_path, cfg.model, cfg.peft, dtype, dequantized=merge_into == "dequantized")
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    reference = _logits(model, batch)
    merged = model.merge_and_unload().eval()
    merged_logits = _logits(merged, batch)
    tol = atol if atol is not None else (1e-3 if dtype == torch.float32 else 1e-1)
    diff = (merged_logits - reference).abs()
    report: dict[str, Any] = {
        "parity/records": int(batch["input_ids"].shape[0]),
        "parity/tokens": int(reference.shape[0]),
        "parity/dtype": str(dtype).removeprefix("torch."),
        "parity/merged_into": merge_into if cfg.peft.quantize is not None else "original",
        "parity/atol": tol,
        "parity/max_abs_diff": float(diff.max()) if torch.isfinite(diff).all() else float("inf"),
        "parity/mean_abs_diff": float(diff.mean()) if torch.isfinite(diff).all() else float("inf"),
        "parity/argmax_agreement": float((merged_logits.argmax(-1) == reference.argmax(-1)).float().mean()),
    }
    if trained_logits is not None:
        merged_cpu = merged_logits.cpu()
        report["parity/trained_4bit_vs_merged_max_abs_diff"] = float((trained_logits - merged_cpu).abs().max())
        report["parity/trained_4bit_vs_merged_argmax_agreement"] = float(
            (trained_logits.argmax(-1) == merged_cpu.argmax(-1)).float().mean()
        )
    ok = (
        torch.isfinite(merged_logits).all() and torch.isfinite(reference).all() and report["parity/max_abs_diff"] <= tol
    )
    if not ok:
        raise ParityError(
            f"The merged model differs from the adapter model: max |logit diff| {report['parity/max_abs_diff']:.3g} "
            f"> {tol:g} on {report['parity/tokens']} tokens ({report['parity/dtype']}). Nothing was exported; "
            "check the adapter files, or raise export.parity_atol if the difference is expected."
        )
    if trained_answers is not None:
        del model, reference, merged_logits
        merged_answers = validation_answers(cfg, merged, processor, questions, "the merged model")
        report.update(answer_agreement(cfg, trained_answers, merged_answers))
    return merged, processor, report


# The answer check warns (and records ``agreement/ok: false``) below these; it never refuses an export: the
# parity of the logits gates it, and greedy answers of a correct merge may still differ where two tokens
# are nearly tied (another kernel, another dtype).
MIN_SAME_ANSWERS = 0.98
MAX_SCORE_POINTS = 0.5
DIFFERING_SHOWN = 5  # differing answers kept in the report for the reader


def answer_check_questions(cfg: DictConfig) -> tuple[int, str | None]:
    """How many validation questions the answer check asks (``export.agreement_questions``), and why it
    asks none (None: it runs)."""
    n = int(cfg.export.agreement_questions)
    if n <= 0:
        return 0, "export.agreement_questions=0"
    if cfg.objective.name == "dpo":
        return 0, "a preference run (objective=dpo): its validation split holds pairs, not questions to answer"
    if distributed() or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # the end of a multi-rank training
        return 0, (
            "exported at the end of a multi-process run, where one rank cannot run a validation alone: "
            f"`idefics2-ft export run_dir={cfg.run_dir}` checks the answers"
        )
    return n, None


def validation_answers(cfg: DictConfig, model, processor, n: int, label: str) -> tuple[list[dict], float]:
    """Greedy answers of ``model`` to the first ``n`` questions of the run's validation split, generated
    as ``evaluate`` generates them: ``Idefics2Module`` in one ``validate_once`` pass (left-padded batches
    of ``data.eval_batch_size``, ``eval.max_new_tokens``, the run's stop tokens; the Lightning progress
    bar where ``trainer.enable_progress_bar``).

    Returns:
        The module's ``val_predictions`` rows (each scored with its metric, ``metrics.score``: the
        ``score`` column) and the overall score as validation reports it (``val/<metric>``, for a
        mixture ``val/score``).
    """
    log.info(
        "Answer check: %s answers the first %d question(s) of %s (split %s).",
        label,
        n,
        cfg.data.path or cfg.data.source,
        cfg.data.val_split,
    )
    module, _, preset = answer_questions(cfg, model, processor, cfg.data.val_split, limit=n)
    metrics = module.val_metrics
    metric = preset.metric if preset else cfg.data.metric
    overall = metrics.get("val/score", metrics.get(f"val/{metric}", float("nan")))
    return list(module.val_predictions or []), float(overall)


def answer_agreement(
    cfg: DictConfig, trained: tuple[list[dict], float], merged: tuple[list[dict], float]
) -> dict[str, Any]:
    """``agreement/*``: how many of the same questions the two models answer identically, each one's
    score (the run's metric: ``data.metric``, or a mixture's ``score``) and the difference in points
    (merged minus as trained, x 100), and the first differing answers. Logs one line; warns below
    ``MIN_SAME_ANSWERS`` or beyond ``MAX_SCORE_POINTS``."""
    (rows_a, score_a), (rows_b, score_b) = trained, merged
    if [r["id"] for r in rows_a] != [r["id"] for r in rows_b]:  # the same records, read twice: never expected
        raise RuntimeError("The answer check's two passes read different questions: report this as a bug.")
    same = [a["prediction"] == b["prediction"] for a, b in zip(rows_a, rows_b, strict=True)]
    fraction = sum(same) / len(same) if same else float("nan")
    points = round(100 * (score_b - score_a), 6)
    preset = preset_of(cfg.eval.preset)  # the questions were asked (and scored) as it says
    metric = "score" if cfg.data.get("mixture") else (preset.metric if preset else cfg.data.metric)
    ok = bool(same) and fraction >= MIN_SAME_ANSWERS and abs(points) <= MAX_SCORE_POINTS
    report: dict[str, Any] = {
        "agreement/split": cfg.data.val_split,
        "agreement/metric": metric,
        "agreement/questions": len(same),
        "agreement/same_answers": sum(same),
        "agreement/same_fraction": fraction,
        "agreement/adapter_score": score_a,
        "agreement/merged_score": score_b,
        "agreement/score_difference_points": points,
        "agreement/ok": ok,
        "agreement/differing": [
            {"id": a["id"], "adapter": a["prediction"], "merged": b["prediction"], "references": a["answers"]}
            for a, b, s in zip(rows_a, rows_b, same, strict=True)
            if not s
        ][:DIFFERING_SHOWN],
    }
    line = (
        f"Adapter vs merged: {sum(same)}/{len(same)} answers the same ({100 * fraction:.1f}%); {metric} "
        f"{100 * score_a:.2f}% as trained, {100 * score_b:.2f}% merged ({points:+.2f} points)."
    )
    if ok:
        log.info(line)
    else:
        log.warning(
            "%s Outside the bounds (at least %.0f%% the same, within %.1f points): the export is written all the "
            "same (its logits passed the parity check); agreement/differing in export_report.json shows answers "
            "that differ.",
            line,
            100 * MIN_SAME_ANSWERS,
            MAX_SCORE_POINTS,
        )
    return report


def free_memory() -> None:
    """Return what freed models held: Python's cycles (a Lightning trainer and its module), and CUDA's cache."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def card_metadata(cfg: DictConfig, metrics: dict[str, Any], adapter_only: bool):
    """The card's YAML front matter as the Hub reads it (``huggingface_hub.ModelCardData``): base
    model, library, license, task, datasets, tags, and a ``model-index`` with the validation metric."""
    from huggingface_hub import EvalResult

    data = cfg.data.path or cfg.data.source
    split = metrics.get("eval/split", cfg.data.val_split)
    if is_preference(cfg):  # pairs: the held-out pairs' reward accuracy, not a QA metric it never computed
        return _metadata(cfg, adapter_only, data, _pair_results(cfg, metrics, data, split))
    # one result per source: (its name in the metric keys, the dataset it reads, its subset, its metric)
    if cfg.data.get("mixture"):
        scored = [
            (f"{e.name}/", e.path or data, e.subset or cfg.data.subset, e.metric or cfg.data.metric)
            for e in cfg.data.mixture
        ]
    else:
        scored = [("", data, cfg.data.get("subset"), cfg.data.metric)]
    results = []
    card_prefix, card = card_of(metrics)
    for prefix, dataset, subset, metric in scored:
        value = metrics.get(f"eval/{prefix}{metric}", metrics.get(f"val/{prefix}{metric}"))
        scored_by = "eval/" if f"eval/{prefix}{metric}" in metrics else "val/"
        # the score card of the pass that gave this value (the split is the result's own key)
        card_args = {k: v for k, v in card.items() if k != "split"} if scored_by == card_prefix else {}
        if isinstance(value, (int, float)):
            results.append(
                EvalResult(
                    task_type="visual-question-answering",
                    dataset_type=dataset,
                    dataset_name=f"{dataset} ({subset})" if subset else dataset,
                    dataset_config=subset,
                    dataset_split=split,
                    metric_type=metric,
                    metric_name=display_name(metric),  # the table's name for it (metrics.METRICS)
                    metric_value=round(float(value), 4),
                    metric_args=card_args or None,  # the score card: preset, image settings, dtype, weights, ...
                )
            )
    return _metadata(cfg, adapter_only, data, results)


def _metadata(cfg: DictConfig, adapter_only: bool, data: str, results: list):
    from huggingface_hub import ModelCardData

    _, base_id = describe_base(cfg.model.name_or_path)
    tags = ["idefics2", "idefics2-ft", "qlora" if cfg.peft.quantize else cfg.peft.method]
    if is_preference(cfg):
        tags += ["dpo", *[f"dpo-{name}" for name in cfg.objective.loss if name != "sigmoid"]]
    return ModelCardData(
        base_model=base_id,  # None for a stand-in: it is on no Hub
        library_name="peft" if adapter_only else "transformers",
        license="apache-2.0",
        pipeline_tag="image-text-to-text",
        datasets=[data] if cfg.data.path else None,
        tags=tags,
        model_name=cfg.name,
        eval_results=results or None,
    )


# the model-index entry of a preference run: the share of held-out pairs whose chosen answer the model
# rewards above the rejected one (its ``val/rewards/accuracies``, or an evaluation's ``eval/...``)
PAIR_METRIC = "rewards/accuracies"


def _pair_results(cfg: DictConfig, metrics: dict[str, Any], data: str, split: str) -> list:
    from huggingface_hub import EvalResult

    value = metrics.get(f"eval/{PAIR_METRIC}", metrics.get(f"val/{PAIR_METRIC}"))
    if not isinstance(value, (int, float)):
        return []
    subset = cfg.data.get("subset")
    return [
        EvalResult(
            task_type="image-text-to-text",
            dataset_type=data,
            dataset_name=f"{data} ({subset})" if subset else data,
            dataset_config=subset,
            dataset_split=split,
            metric_type=PAIR_METRIC,
            metric_name="Reward accuracy (held-out preference pairs)",
            metric_value=round(float(value), 4),
        )
    ]


def reference_text(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    """What a preference run compared its policy with: the adapter it started from (its run named),
    the base, or none."""
    from idefics2_ft.training.preference_module import reference_of

    reference = metrics.get("objective/reference") or reference_of(cfg.objective, cfg.model.adapter)
    if reference == "base":
        return "the base model with the adapters switched off"
    if reference == "none":
        return "none: the losses are reference-free"
    folder = Path(str(cfg.model.adapter))
    run = RunFolder(folder)
    if run.config.is_file():  # a run folder: its adapter/ is the reference, and its name says which run
        try:
            name = OmegaConf.load(run.config).get("name")
        except Exception:  # an unreadable config still leaves the folder to name
            name = None
        which = f"the run `{name}` ({folder}), its `adapter/`" if name else f"the run {folder}, its `adapter/`"
    else:
        which = f"the adapter folder `{folder}`"
    return f"the adapter the policy started from, frozen: {which}"


def objective_lines(cfg: DictConfig, metrics: dict[str, Any]) -> str:
    """The card's lines on a preference run (empty for SFT): objective, losses with weights, beta, the
    reference, the pair data."""
    if not is_preference(cfg):
        return ""
    o = cfg.objective
    weights = list(o.loss_weights) if o.loss_weights is not None else [1.0] * len(o.loss)
    losses = ", ".join(f"`{name}` (weight {w:g})" for name, w in zip(o.loss, weights, strict=False))
    options = [f"beta={o.beta:g}"]
    if o.label_smoothing:
        options.append(f"label_smoothing={o.label_smoothing:g}")
    if "simpo" in o.loss:
        options.append(f"simpo_gamma={o.simpo_gamma:g}")
    if "orpo" in o.loss:
        options.append(f"orpo_lambda={o.orpo_lambda if o.orpo_lambda is not None else o.beta:g}")
    if cfg.data.get("mixture"):
        data = ", ".join(
            f"{e.name} ({e.path or cfg.data.path or cfg.data.source}, weight {e.weight:g})" for e in cfg.data.mixture
        )
    else:
        data = str(cfg.data.path or cfg.data.source)
    pairs = metrics.get("eval/pairs", metrics.get("val/pairs"))
    held_out = f", {pairs:.0f} held-out pairs scored" if isinstance(pairs, (int, float)) else ""
    reference, started = reference_text(cfg, metrics), ""
    if cfg.model.adapter and "started from" not in reference:  # the base as reference, from an adapter
        started = f"- **Started from:** the adapter `{cfg.model.adapter}` (its copy is what trained)\n"
    return (
        "- **Objective:** preference tuning (`objective=dpo`) on pairs of a chosen and a rejected answer\n"
        f"- **Losses:** {losses}; {', '.join(options)}\n"
        f"- **Reference:** {reference}\n{started}"
        f"- **Pair data:** {data} (train split `{cfg.data.train_split}`, held-out split "
        f"`{metrics.get('eval/split', cfg.data.val_split)}`{held_out})\n"
        "- **Rewards:** beta x (policy - reference) log-probability of each answer; the reward accuracy is the "
        "share of held-out pairs whose chosen answer is rewarded above the rejected one\n"
    )


def model_card(cfg: DictConfig, metrics: dict[str, Any], report: dict[str, Any], adapter_only: bool) -> str:
    """A Hub model card (``reporting/templates/model_card.md``): base, data, recipe and resolved
    config, image settings, metrics, the merge check, usage."""
    base = cfg.model.name_or_path
    p = cfg.peft
    # the scores; their score card (val/card/*, eval/card/*) is a table of its own
    evals = {k: v for k, v in metrics.items() if k.startswith(("val/", "eval/")) and "/card/" not in k}
    card = card_table(metrics)
    hardware = metrics.get("hardware") or (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    method = p.method + (f" on a {p.quantize.upper()} 4-bit base (QLoRA)" if p.quantize else "")
    saved = RunFolder(cfg.run_dir).adapter / "adapter_config.json"
    if p.method != "full" and cfg.model.get("adapter") and saved.is_file():
        # it went on from an adapter (model.adapter), which keeps its own rank and targets: the peft.* keys did not apply
        own = json.loads(saved.read_text())
        method += f", r={own.get('r')}, alpha={own.get('lora_alpha')}, as the adapter it started from"
    elif p.method != "full":
        method += f", r={p.r}, alpha={p.alpha}, targets `{p.target}`"
    merge_check = ""
    if any(k.startswith("parity/") for k in report):
        into = report.get("parity/merged_into", "original")
        merge_check = _template("model_card_merge.md").substitute(
            merged_into="dequantized 4-bit weights it was trained against"
            if into == "dequantized"
            else "original full-precision base weights",
            rows="\n".join(f"| `{k}` | {v} |" for k, v in report.items() if k.startswith("parity/")),
        ) + agreement_text(cfg, report)
    return _template("model_card.md").substitute(
        metadata=card_metadata(cfg, metrics, adapter_only).to_yaml(),
        name=cfg.name,
        base=describe_base(base)[0],
        data=cfg.data.path or cfg.data.source,
        train_split=cfg.data.train_split,
        split=metrics.get("eval/split", cfg.data.val_split),
        method=method,
        objective=objective_lines(cfg, metrics),
        holds="the adapter only" if adapter_only else "the adapter merged into the full-precision base",
        splitting=cfg.data.do_image_splitting,
        longest_edge=cfg.data.longest_edge,
        steps=metrics.get("train/steps", "?"),
        wall_s=f"{metrics.get('train/wall_s', float('nan')):.0f}",
        hardware=hardware,
        eval_rows="\n".join(
            f"| `{k}` | {v:.4f} |" if isinstance(v, float) else f"| `{k}` | {v} |" for k, v in sorted(evals.items())
        ),
        score_card=(
            "The score card (what the scores depend on beside the weights: compare them with a published score "
            f"only where it matches):\n\n{card}\n"
            if card
            else ""
        ),
        merge_check=merge_check,
        peft_import="from peft import PeftModel\nfrom transformers import GenerationConfig\n" if adapter_only else "",
        load=f'base = Idefics2ForConditionalGeneration.from_pretrained("{base}")\n'
        'model = PeftModel.from_pretrained(base, "REPO_OR_FOLDER")\n'
        "# stop at <end_of_utterance> as the fine-tuned model does (PEFT reads no generation config itself)\n"
        'model.generation_config = GenerationConfig.from_pretrained("REPO_OR_FOLDER")'
        if adapter_only
        else 'model = Idefics2ForConditionalGeneration.from_pretrained("REPO_OR_FOLDER")',
        config=OmegaConf.to_yaml(OmegaConf.create(redacted(cfg))).rstrip(),
    )


def agreement_text(cfg: DictConfig, report: dict[str, Any]) -> str:
    """The card's "Adapter vs merged" section (``model_card_agreement.md``) from ``agreement/*``; one line
    where the check was skipped, nothing where the report has no answer check."""
    if "agreement/questions" not in report:
        skipped = report.get("agreement/skipped")
        return f"## Adapter vs merged\n\nNot checked: {skipped}.\n\n" if skipped else ""
    r = report
    trained = "the adapter on its 4-bit base" if cfg.peft.quantize else "the adapter on its base model"
    differing = "\n".join(
        f"| `{_cell(d['id'])}` | {_cell(d['adapter'])} | {_cell(d['merged'])} | {_cell(', '.join(map(str, d['references'])))} |"
        for d in r.get("agreement/differing", [])
    )
    if differing:
        differing = (
            "\nAnswers that differ (the first few):\n\n| question | as trained | merged | references |\n"
            f"|---|---|---|---|\n{differing}\n"
        )
    return _template("model_card_agreement.md").substitute(
        trained=trained,
        questions=r["agreement/questions"],
        split=r["agreement/split"],
        same=r["agreement/same_answers"],
        same_percent=f"{100 * r['agreement/same_fraction']:.1f}",
        metric=display_name(r["agreement/metric"]) if r["agreement/metric"] != "score" else "Score (mean over sources)",
        adapter_score=f"{100 * r['agreement/adapter_score']:.2f}%",
        merged_score=f"{100 * r['agreement/merged_score']:.2f}%",
        points=f"{r['agreement/score_difference_points']:+.2f}",
        verdict="within" if r["agreement/ok"] else "**outside**",
        min_same=f"{100 * MIN_SAME_ANSWERS:.0f}",
        max_points=f"{MAX_SCORE_POINTS:g}",
        differing=differing,
    )


def _cell(text: str) -> str:
    """Text for one table cell: one line, ``|`` escaped, at most 60 characters."""
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= 60 else text[:57] + "..."


def _template(name: str) -> Template:
    return Template((TEMPLATES / name).read_text(encoding="utf-8"))


def _write_export(
    cfg: DictConfig, kind: str, target: Output, adapter_dir: Path, metrics: dict[str, Any]
) -> dict[str, Any]:
    """Write one export (``merged``: merge, check parity, save; ``adapter``: copy it) with its card,
    through the output writer: it appears at ``target`` once complete, and replaces only an earlier
    export of the same kind from this run. Returns the report: parity, and for a merge the answer check
    (``agreement/*``, or ``agreement/skipped`` saying why none ran)."""
    e = cfg.export
    policy = active() or StopPolicy("export")
    report: dict[str, Any] = {}
    merged = processor = None
    if kind == "merged":
        questions, skipped = answer_check_questions(cfg)
        if skipped:
            log.info("Answer check (adapter vs merged) skipped: %s.", skipped)
        with policy.phase_of("the merge", "merge"):
            merged, processor, report = merge_and_check(
                cfg, adapter_dir, resolve_dtype(e.dtype), e.parity_samples, e.parity_atol, e.merge_into, questions
            )
            # stop where the fine-tuned model stops, so that a plain generate() answers as we did
            merged.generation_config = generation_config(processor.tokenizer, merged.generation_config)
        if skipped:
            report["agreement/skipped"] = skipped
    with policy.phase_of("the export save", "export_save"), target.writing() as tmp:
        if kind == "adapter":
            shutil.copytree(adapter_dir, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MARKER))
            # PEFT reads no generation config from an adapter folder: the card shows the one line that does
            tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
            generation_config(tokenizer).save_pretrained(tmp)
        else:
            merged.save_pretrained(tmp, max_shard_size=e.max_shard_size)
            processor.save_pretrained(tmp)
        # inside the writer's partial folder: the export appears whole, once this block ends
        (tmp / "README.md").write_text(model_card(cfg, metrics, report, kind == "adapter"))
        (tmp / "export_report.json").write_text(json.dumps(report, indent=2))
    log.info("Exported the %s to %s", "merged model" if kind == "merged" else "adapter", target.path)
    return report


def export_targets(cfg: DictConfig) -> list[tuple[str, Output]]:
    """What an export writes, each target claimed (before any work): the merged model or the adapter at
    ``export.out_dir`` (default ``RUN/export``), and with ``export.with_adapter`` the adapter beside it.

    Raises:
        OutputRefused: a target holds anything but this run's earlier export of the same kind, is the run
            folder or contains it, or lies where the run keeps its own files.
    """
    e = cfg.export
    out = Path(e.out_dir) if e.out_dir else RunFolder(cfg.run_dir).export
    exports = [("adapter" if e.adapter_only else "merged", out)]
    if e.with_adapter and not e.adapter_only:
        exports.append(("adapter", out.with_name(out.name + "-adapter")))
    return [(kind, output_folder(Path(cfg.run_dir), p, EXPORT_KINDS[kind], "export.out_dir")) for kind, p in exports]


def export_run(cfg: DictConfig, metrics: dict[str, Any] | None = None) -> tuple[Path, dict[str, Any]]:
    """Merge (or copy the adapter), check parity, compare the answers of the model as trained and the
    merged model (``export.agreement_questions``; it warns, never refuses), save with a card; with
    ``export.with_adapter`` also the adapter beside it (``OUT-adapter``); push each if ``export.push_to_hub``.

    Args:
        cfg: the run's config (``run_dir/config.yaml`` with any ``export.*`` overrides).
        metrics: the run's metrics for the card; None reads ``metrics.json``.

    Returns:
        The export folder and the report (parity figures, the answer check, and the Hub commits when pushed).

    Raises:
        NonFiniteWeights: the adapter holds a NaN or an infinity; nothing is written.
        ParityError: the merged model does not reproduce the adapter model; nothing is written.
        HubError: the push failed; the export folder is kept.
    """
    e = cfg.export
    run = RunFolder(cfg.run_dir)
    if metrics is None:
        metrics = read_metrics(run.root)
    adapter_dir = run.adapter
    not_finished = unfinished(run.root)
    if not_finished:
        raise FileNotFoundError(not_finished)
    targets = export_targets(cfg)
    check_adapter_is_finite(adapter_dir)
    report: dict[str, Any] = {}
    for kind, target in targets:
        report.update(_write_export(cfg, kind, target, adapter_dir, metrics))
    if e.push_to_hub:
        from idefics2_ft.hub import push_folder, push_targets

        for (kind, target), repo_id in zip(targets, push_targets(e), strict=True):
            url = push_folder(target.path, repo_id, e.hub.private, e.hub.commit_message, e.hub.revision)
            report[f"hub/commit/{kind}"] = url
            log.info("Pushed the %s to %s", "merged model" if kind == "merged" else "adapter", url)
    return targets[0][1].path, report


EXPORT_KINDS = {"merged": "export", "adapter": "export-adapter"}  # the output kinds their markers name
