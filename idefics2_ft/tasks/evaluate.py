"""Load a finished run (adapter or merged model) and evaluate it on a split, or answer one question.

A preference run (``objective=dpo``) trained on pairs: ``evaluate_pairs`` scores held-out pairs with
the run's own reward metrics (its policy against its reference, rebuilt as the run had it);
``objective.name=sft`` with a question/answer split scores its answers instead (``evaluate``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from idefics2_ft.config import ConfigError
from idefics2_ft.data import DataError
from idefics2_ft.data.mixture import entry_config
from idefics2_ft.data.sources import kind_of
from idefics2_ft.metrics import diagnostic_columns
from idefics2_ft.models import load_full_precision, load_idefics2, load_processor, resolve_base, resolve_dtype
from idefics2_ft.models.generation import stop_token_ids
from idefics2_ft.presets import EvalRows, preset_of, score_card
from idefics2_ft.run_folder import Output, RunFolder, output_folder, read_base_record, read_metrics, unfinished

log = logging.getLogger(__name__)


def base_model_path(cfg: DictConfig) -> str:
    """The base the run trained on (``run_dir/base_model.json``), so its adapter fits; without a
    record, what ``model.name_or_path`` resolves to."""
    return resolve_base(cfg, read_base_record(cfg.run_dir))


def config_for_split(cfg: DictConfig, split: str) -> DictConfig:
    """The run's config set to evaluate ``split``, which must be one the source has.

    A JSONL run's splits are its files: ``data.val_split`` is ``data.val_file`` and
    ``data.train_split`` is ``data.train_file``; another file is given as ``data.val_file=FILE``.

    Raises:
        ConfigError: the source has no such split, naming the ones it has (``SourceKind.for_split``).
    """
    try:
        if not cfg.data.get("mixture"):
            return OmegaConf.merge(cfg, {"data": kind_of(cfg.data).for_split(cfg.data, split)})
        # a mixture: each source's own split (a JSONL source's file), asked of its kind
        base = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k != "mixture"}
        entries = []
        for entry in cfg.data.mixture:
            merged = entry_config(base, entry)
            try:
                keys = kind_of(merged).for_split(merged, split)
            except DataError as err:
                raise DataError(f"data.mixture source {entry.name!r}: {err}") from None
            entries.append({**OmegaConf.to_container(entry, resolve=True), **keys})
    except DataError as err:  # the source has no such split: refused as the config it is
        raise ConfigError([str(err)]) from None
    return OmegaConf.merge(cfg, {"data": {"val_split": split, "mixture": entries}})


def load_run(cfg: DictConfig, full_precision: bool = False, model_dir: str | None = None):
    """The model and processor of a run, ready for generation.

    ``model_dir`` (a merged export or ``run_dir/model``) loads as a plain checkpoint. Otherwise the
    base is loaded as it was trained (4-bit for QLoRA), or in full precision as an export holds it
    with ``full_precision=True`` (``export.merge_into``), and the run's ``adapter/`` goes on top.

    Args:
        cfg: the run's config.
        full_precision: load the base in full precision, as an export holds it.
        model_dir: a folder holding a whole model (a merged export).

    Returns:
        ``(model, processor)``, the model in eval mode with its cache on.

    Raises:
        FileNotFoundError: the run has no adapter (it did not finish).
    """
    from peft import PeftModel

    run = RunFolder(cfg.run_dir)
    if model_dir is None and run.full_model.is_dir():
        model_dir = str(run.full_model)
    if model_dir is not None:
        from transformers import Idefics2ForConditionalGeneration

        model = Idefics2ForConditionalGeneration.from_pretrained(
            model_dir, dtype=resolve_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation
        )
        processor = load_processor(model_dir, cfg.data)
    else:
        adapter = run.adapter
        if not (adapter / "adapter_config.json").is_file():
            raise FileNotFoundError(unfinished(run.root) or f"{adapter}/adapter_config.json not found.")
        if full_precision:  # the base as an export holds it (export.merge_into), with the adapter on top
            dtype = resolve_dtype(cfg.model.dtype)
            dequantized = cfg.export.merge_into == "dequantized"
            model = load_full_precision(base_model_path(cfg), cfg.model, cfg.peft, dtype, dequantized)
        else:
            model = load_idefics2(base_model_path(cfg), cfg.model, cfg.peft)
        model = PeftModel.from_pretrained(model, str(adapter))
        processor = load_processor(str(adapter), cfg.data)
    model.eval()
    model.config.use_cache = True
    return model, processor


def evaluation_output(cfg: DictConfig, out_dir: str | Path) -> Output:
    """Claim ``out_dir`` for an evaluation of this run (``run_folder.output_folder``): before any work.

    Raises:
        OutputRefused: the folder holds something else, lies where the run keeps its own files, or
            cannot be written (a read-only run folder: the message says to set ``out_dir=``).
    """
    return output_folder(Path(cfg.run_dir), out_dir, "evaluation", "out_dir")


def scored_weights(cfg: DictConfig, model_dir: str | None = None) -> dict[str, Any]:
    """Which weights an evaluation scores: the folder, a hash of its weight files, and the step the run
    had trained when they were saved (a training may own the folder and replace them later)."""
    import hashlib

    from idefics2_ft.data.fingerprint import file_fingerprint

    run = RunFolder(cfg.run_dir)
    folder = Path(model_dir) if model_dir else (run.full_model if run.full_model.is_dir() else run.adapter)
    # each weight file by its content fingerprint (at most 4 MiB read per file: a merged 8B is 16 GB)
    prints = [[p.name, file_fingerprint(p)] for p in sorted(folder.glob("*.safetensors"))]
    digest = hashlib.sha256(json.dumps(prints).encode())
    return {
        "eval/weights": str(folder),
        "eval/weights_sha256": digest.hexdigest()[:16],
        "eval/trained_steps": read_metrics(run.root).get("train/steps", "?"),
    }


def evaluate(
    cfg: DictConfig,
    model,
    processor,
    split: str,
    out_dir: Path | Output,
    label: str = "the run's weights as trained",
    weights: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Greedy answers on ``split`` (left-padded batches); writes predictions.jsonl, metrics JSON and
    report.html (``label`` says there which model answered), all at once when the evaluation is
    complete: an interrupted one leaves nothing at ``out_dir``.

    Args:
        cfg: the run's config.
        model: the model to evaluate (``load_run`` gives it).
        processor: its processor.
        split: the split to answer.
        out_dir: where predictions.jsonl, eval_metrics.json and report.html go (claimed, if a path).
        label: which model answered, for the report.
        weights: which weights answered (``scored_weights``), recorded in the metrics.

    Returns:
        Flat metrics: ``eval/<metric>`` and ``eval/<metric>/<question type>``, ``eval/accuracy`` and
        ``eval/anls`` (the diagnostic columns of ``idefics2_ft.metrics.METRICS``), ``eval/loss``, ``eval/split``.

    Raises:
        OutputRefused: ``out_dir`` may not be written (before any question is answered).
    """

    if cfg.objective.name == "dpo":
        raise ConfigError([PAIRS_NOT_ANSWERS.format(run_dir=cfg.run_dir)])
    target = out_dir if isinstance(out_dir, Output) else evaluation_output(cfg, out_dir)
    module, datamodule, preset = answer_questions(cfg, model, processor, split)
    rows = module.val_predictions or []
    scored = [r for r in rows if not r.get("unanswered")]
    metrics = {"eval/" + k.removeprefix("val/"): v for k, v in module.val_metrics.items()}
    # the records that could not be asked (a missing image, no options for a multiple-choice preset, ...)
    bad = {k.removeprefix("val/"): v for k, v in module.skipped.items() if v}  # by kind
    metrics.update({f"eval/skipped/{kind}": n for kind, n in bad.items()})
    kinds = ", ".join(f"{kind} {n}" for kind, n in bad.items())
    if bad:
        log.warning(
            "%d of %d records of split %r could not be asked and are not in the score: %s.",
            *(sum(bad.values()), len(datamodule.val_set), split, kinds),
        )
    if not rows:
        raise DataError(
            f"No question of split {split!r} could be asked ({len(datamodule.val_set)} records, all bad: "
            f"{kinds or 'none read'}); nothing was written."
            + (
                f" eval.preset={preset.name} asks {preset.benchmark} questions: is it the preset for this data?"
                if preset
                else ""
            )
        )
    for column in diagnostic_columns():  # eval/accuracy, eval/anls beside the run's own metric
        if scored:
            metrics.setdefault(f"eval/{column}", sum(r[column] for r in scored) / len(scored))
    metrics["eval/split"] = split
    metrics.update(weights or {})
    unparsed = metrics.get("eval/unparsed")
    card = score_card(
        cfg,
        preset,
        split,
        model,
        len(scored),
        None if unparsed is None else int(unparsed),
        unanswered=len(rows) - len(scored),
        bad_records=sum(bad.values()),
    )
    metrics.update({f"eval/{k}": v for k, v in card.items()})
    answers = submission(rows, cfg, bad) if len(scored) < len(rows) else None
    from idefics2_ft.reporting import evaluation_report

    lines = [
        {
            "id": row["id"],
            "prediction": row["prediction"],
            "references": row["answers"],
            "question_type": row["question_type"],
            "source": row.get("source"),
            **({} if row.get("unanswered") else {row.get("metric", "score"): row.get("score")}),
            **{column: row[column] for column in diagnostic_columns() if column in row},
            **({"unparsed": row["unparsed"]} if "unparsed" in row else {}),
        }
        for row in rows
    ]
    with target.writing() as folder:  # all files appear together, once complete
        (folder / "predictions.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
        (folder / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (folder / "score_card.json").write_text(json.dumps(card, indent=2) + "\n")
        if answers is not None:  # questions without public answers: the file their server scores
            (folder / SUBMISSION).write_text(json.dumps(answers, indent=1) + "\n")
        evaluation_report(cfg, folder, metrics, scored, datamodule.val_set.rows, label)
    log.info("Report: %s", target.path / "report.html")
    if answers is not None:
        log.info(
            "%d questions of split %r have no answer: not scored; %s holds their answers for the benchmark's "
            "server (DocVQA: the Robust Reading Competition's site, task 'Single Page Document VQA').",
            *(len(answers), split, target.path / SUBMISSION),
        )
    return metrics


SUBMISSION = "submission.json"


def submission(rows: list[dict], cfg: DictConfig, bad: dict[str, int]) -> list[dict] | None:
    """The answers to questions without a public answer, as DocVQA's evaluation server takes them:
    ``[{"questionId": 57344, "answer": "..."}]``, the ids read from ``data.id_column`` (DocVQA's
    ``questionId``), integers where the column holds integers (``"57344"`` too, not ``"0012"``).

    Returns None (and says why) when the file could not be right: no ``data.id_column`` (the ids would
    be line numbers) or a row without its id, or ids repeated. Warns when bad records left questions
    out (the server counts them as unanswered).
    """
    unanswered = [r for r in rows if r.get("unanswered")]
    if not cfg.data.id_column:
        log.warning(
            "%d questions have no answer, and no submission.json was written: the server matches answers by "
            "question id; set data.id_column= to the column that holds it (DocVQA: data.id_column=questionId).",
            len(unanswered),
        )
        return None
    ids = [r["id"] for r in unanswered]

    def as_id(value):
        if isinstance(value, str) and value.isdigit() and str(int(value)) == value:
            return int(value)
        return value

    answers = [{"questionId": as_id(i), "answer": r["prediction"]} for i, r in zip(ids, unanswered, strict=True)]
    counts = Counter(str(a["questionId"]) for a in answers)
    repeated = sorted(k for k, n in counts.items() if n > 1)
    if repeated:
        log.warning(
            "No submission.json: question ids repeat in data.id_column=%s (%s); the server needs one answer per "
            "question (a row without the column takes its line number as id).",
            cfg.data.id_column,
            ", ".join(repeated[:5]),
        )
        return None
    if bad:
        log.warning(
            "submission.json holds %d answers; %d records could not be asked (%s) and are missing from it: "
            "the server counts them as unanswered.",
            *(len(answers), sum(bad.values()), ", ".join(f"{kind} {n}" for kind, n in bad.items())),
        )
    return answers


def answer_questions(cfg: DictConfig, model, processor, split: str, limit: int | None = None):
    """Greedy answers of ``model`` to the questions of ``split`` (the first ``limit``, in the split's
    order, or all), asked as ``eval.preset`` says (``training``: as the run trained) and scored with its
    metric: ``Idefics2Module`` in one ``validate_once`` pass (left-padded batches of
    ``data.eval_batch_size``, the preset's or ``eval.max_new_tokens``, the run's stop tokens). A
    question whose split holds no answer is answered, not scored (``presets.unanswered``).

    Returns:
        ``(module, datamodule, preset)``: the module's ``val_predictions`` and ``val_metrics`` hold
        the answers and scores; ``preset`` is None for ``training``.
    """
    from idefics2_ft.data.datamodule import Idefics2DataModule
    from idefics2_ft.data.dataset import RecordDataset
    from idefics2_ft.training.lightning_module import Idefics2Module

    preset = preset_of(cfg.eval.preset)  # None: the questions as the run trained on them
    keys: dict[str, Any] = {"val_split": split, "pairs": False}
    if limit is not None:  # each source reads no more than it needs
        keys["max_val_samples"] = min(limit, cfg.data.max_val_samples or limit)
    data_cfg = OmegaConf.merge(cfg.data, keys)
    datamodule = Idefics2DataModule(data_cfg, processor)
    module = Idefics2Module(
        model,
        processor.tokenizer,
        optimizer_factory=None,
        metric=preset.metric if preset else data_cfg.metric,
        max_new_tokens=preset.max_new_tokens if preset else cfg.eval.max_new_tokens,
        # a preset scores every source with its harness's metric
        source_metrics={} if preset else {s.name: s.cfg.metric for s in datamodule.sources if s.name},
    )
    datamodule.setup("validate")
    rows = EvalRows(datamodule.val_set.rows, preset)
    # the first `limit` in the validation set's order (a mixture's sources interleaved)
    datamodule.val_set = RecordDataset(rows, min(limit, len(rows)) if limit is not None else len(datamodule.val_set))
    datamodule.generation_prefix = preset.prefill if preset else ""
    if preset:
        log.info(
            "Preset %s: %s's %s prompt, %s, max_new_tokens=%d.",
            *(preset.name, preset.harness, preset.benchmark, preset.metric, preset.max_new_tokens),
        )
    validate_once(cfg, module, datamodule)
    return module, datamodule, preset


PAIRS_NOT_ANSWERS = (
    "{run_dir} is a preference run (objective=dpo): its data are pairs, which have no answer to generate and "
    "score. Score its held-out pairs with `idefics2-ft evaluate run_dir={run_dir}` (evaluate_pairs), or a "
    "question/answer split with objective.name=sft and that split's data.* keys."
)


def validate_once(cfg: DictConfig, module, datamodule) -> None:
    """One validation pass of ``module`` over ``datamodule``'s validation set, on one device, writing nothing."""
    import lightning as L

    from idefics2_ft.training.trainer import follow_stop_policy

    trainer = L.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        logger=False,
        enable_progress_bar=cfg.trainer.enable_progress_bar,
        enable_checkpointing=False,
    )
    follow_stop_policy(trainer)  # a stop is ours, not Lightning's
    trainer.validate(module, datamodule=datamodule, verbose=False)


def load_pair_run(cfg: DictConfig):
    """A preference run's policy and reference, as the run trained them: the base as trained (4-bit for
    QLoRA), the run's ``adapter/`` as the policy (``default``) and, for ``objective.reference=adapter``,
    the adapter it started from (``model.adapter``) beside it as the frozen ``reference``.

    Returns:
        ``(model, processor, reference)``: the model in eval mode; ``reference`` is ``adapter``,
        ``base`` or ``none`` (as ``PreferenceModule`` takes it).

    Raises:
        FileNotFoundError: the run has no adapter (it did not finish).
        RunFolderError: the reference adapter (``model.adapter``) is gone or never finished.
    """
    from peft import PeftModel

    from idefics2_ft.run_folder import starting_adapter
    from idefics2_ft.training.preference_module import POLICY_ADAPTER, REFERENCE_ADAPTER, reference_of

    run = RunFolder(cfg.run_dir)
    if not (run.adapter / "adapter_config.json").is_file():
        raise FileNotFoundError(unfinished(run.root) or f"{run.adapter}/adapter_config.json not found.")
    reference = reference_of(cfg.objective, cfg.model.adapter)
    reference_dir = starting_adapter(cfg.model.adapter) if reference == "adapter" else None
    model = load_idefics2(base_model_path(cfg), cfg.model, cfg.peft)
    model = PeftModel.from_pretrained(model, str(run.adapter), adapter_name=POLICY_ADAPTER)
    if reference_dir is not None:
        model.load_adapter(str(reference_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        model.base_model.set_adapter(POLICY_ADAPTER)
    processor = load_processor(str(run.adapter), cfg.data)
    model.eval()
    return model, processor, reference


def evaluate_pairs(
    cfg: DictConfig,
    model,
    processor,
    reference: str,
    split: str,
    out_dir: Path | Output,
    label: str = "the run's policy against its reference",
    weights: dict[str, Any] | None = None,
) -> dict[str, float]:
    """A preference run's held-out pairs of ``split`` scored as its validation scores them: the loss,
    rewards, reward accuracy, log-probs and lengths, means over the pairs. Writes eval_metrics.json and
    report.html, together, once complete.

    Args:
        model, processor, reference: ``load_pair_run``'s.
        Others: as ``evaluate``.

    Returns:
        Flat metrics: ``eval/rewards/*``, ``eval/logps/*``, ``eval/loss``, ``eval/loss/<name>``,
        ``eval/length/*``, ``eval/pairs``, ``eval/split``, and ``weights``.
    """

    from idefics2_ft.data.datamodule import Idefics2DataModule
    from idefics2_ft.reporting import evaluation_report
    from idefics2_ft.training.preference_module import PreferenceModule

    target = out_dir if isinstance(out_dir, Output) else evaluation_output(cfg, out_dir)
    o = cfg.objective
    data_cfg = OmegaConf.merge(cfg.data, {"val_split": split, "pairs": True})
    datamodule = Idefics2DataModule(data_cfg, processor)
    module = PreferenceModule.from_objective(model, processor.tokenizer, o, reference)
    validate_once(cfg, module, datamodule)
    metrics: dict[str, Any] = {"eval/" + k.removeprefix("val/"): v for k, v in module.val_metrics.items()}
    metrics.update({f"eval/skipped/{k.removeprefix('val/')}": v for k, v in module.skipped.items()})
    metrics["eval/split"] = split
    metrics.update(weights or {})
    if not metrics.get("eval/pairs"):
        raise DataError(f"No usable pair in split {split!r} of {cfg.data.path or cfg.data.source}: nothing was scored.")
    with target.writing() as folder:  # both files appear together, once complete
        (folder / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        evaluation_report(cfg, folder, metrics, [], [], label)
    log.info("Report: %s", target.path / "report.html")
    return metrics


def format_table(metrics: dict[str, Any]) -> str:
    """A plain summary table of flat eval metrics."""
    width = max(len(k) for k in metrics)
    lines = [
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in sorted(metrics.items())
    ]
    return "\n".join(lines)


@torch.no_grad()
def answer(
    model, processor, images: list, question: str | None = None, messages: list | None = None, max_new_tokens: int = 64
) -> str:
    """One answer, greedy, with the processor's chat template and ``add_generation_prompt=True``."""
    if messages is None:
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
        messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[images] if images else None, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    stop = stop_token_ids(processor.tokenizer)
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=processor.tokenizer.pad_token_id,
    )
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()
