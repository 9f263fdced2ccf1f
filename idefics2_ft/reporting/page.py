"""``report.html``: one self-contained page per run or evaluation that a person can look at.

It holds the loss and learning-rate curves (``history.jsonl``), the metrics before and after,
overall and per question type, a gallery of validation examples (half of them chosen among the
wrong answers, so the failures show), and the run's config and plan. A preference run
(``objective=dpo``) has no answers to show: its page draws the reward curves instead and tables the
held-out pairs' metrics. Images and plots are inlined as base64 PNG; the page loads nothing else
and runs no script.
"""

from __future__ import annotations

import html
import io
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from string import Template
from typing import Any

from omegaconf import DictConfig, OmegaConf

from idefics2_ft.metrics import right_columns
from idefics2_ft.reporting.gallery import gallery_cards, is_right, png_data_uri, thumbnail
from idefics2_ft.run_folder import (
    HISTORY_FILE,
    REPORT_FILE,
    RunFolder,
    atomic_write_text,
    read_history,
    read_metrics,
    redacted,
)

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).with_name("templates")


def curves_png(history: Sequence[dict]) -> bytes | None:
    """Train and validation loss over steps, and the learning rate, as one PNG (None without a history)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = {row["step"]: row[key] for row in history if row.get(key) is not None}  # the last write wins
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    train, val, lr = series("train/loss"), series("val/loss"), series("train/lr")
    if not (train[0] or val[0]):
        return None
    figure = Figure(figsize=(10, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    loss_axes, lr_axes = figure.subplots(1, 2, width_ratios=[3, 2])
    if train[0]:
        loss_axes.plot(*train, label="train", color="#1f77b4")
    if val[0]:
        loss_axes.plot(*val, "o--", label="validation", color="#d62728")
    loss_axes.set(xlabel="optimizer step", ylabel="loss", title="loss")
    if max(train[1] + val[1]) / max(min(train[1] + val[1]), 1e-9) > 20:
        loss_axes.set_yscale("log")
    loss_axes.grid(alpha=0.3)
    loss_axes.legend()
    if lr[0]:
        lr_axes.plot(*lr, color="#2ca02c")
    lr_axes.set(xlabel="optimizer step", ylabel="learning rate", title="learning rate")
    lr_axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    lr_axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# The reward curves of a preference run, (history key, label): the rewards on one axes, the share of
# pairs ranked right on another (each drawn where the run logged it: train/ each step, val/ at each validation)
REWARD_CURVES = (
    ("rewards/chosen", "chosen"),
    ("rewards/rejected", "rejected"),
    ("rewards/margins", "margin"),
)
ACCURACY_CURVE = ("rewards/accuracies", "accuracy")


def reward_curves_png(history: Sequence[dict]) -> tuple[bytes, list[str]] | None:
    """A preference run's rewards over steps (chosen, rejected, margin) and its reward accuracy, the
    train/ curves as lines and the val/ ones as points, as one PNG; with the history keys drawn.
    None when the history holds no reward."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[int], list[float]]:
        points = {row["step"]: row[key] for row in history if row.get(key) is not None}
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    drawn: list[str] = []
    figure = Figure(figsize=(10, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    reward_axes, accuracy_axes = figure.subplots(1, 2, width_ratios=[3, 2])
    colors = {"rewards/chosen": "#2a9d4a", "rewards/rejected": "#d1495b", "rewards/margins": "#1f77b4"}
    colors["rewards/accuracies"] = "#9467bd"
    for axes, curves in ((reward_axes, REWARD_CURVES), (accuracy_axes, (ACCURACY_CURVE,))):
        for key, label in curves:
            for stage, style in (("train", "-"), ("val", "o--")):
                steps, values = series(f"{stage}/{key}")
                if steps:
                    axes.plot(steps, values, style, label=f"{label} ({stage})", color=colors[key])
                    drawn.append(f"{stage}/{key}")
    if not drawn:
        return None
    reward_axes.axhline(0.0, color="#999", linewidth=0.8)
    reward_axes.set(xlabel="optimizer step", ylabel="beta x log-ratio", title="rewards")
    accuracy_axes.set(xlabel="optimizer step", ylabel="share of pairs", title="reward accuracy", ylim=(-0.05, 1.05))
    for axes in (reward_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        if axes.lines:
            axes.legend(fontsize="small")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue(), drawn


# A preference run's table: (label, the key after its prefix, how the value reads)
PAIR_ROWS = (
    ("reward accuracy (chosen above rejected)", "rewards/accuracies", "{:.1%}"),
    ("reward margin", "rewards/margins", "{:.4f}"),
    ("reward, chosen", "rewards/chosen", "{:.4f}"),
    ("reward, rejected", "rewards/rejected", "{:.4f}"),
    ("log-prob, chosen", "logps/chosen", "{:.3f}"),
    ("log-prob, rejected", "logps/rejected", "{:.3f}"),
    ("answer length, chosen (tokens)", "length/chosen", "{:.1f}"),
    ("answer length, rejected (tokens)", "length/rejected", "{:.1f}"),
    ("loss", "loss", "{:.4f}"),
    ("pairs", "pairs", "{:.0f}"),
)


def pair_table(columns: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """A preference run's metrics on held-out pairs: rewards, accuracy, log-probs, lengths, each loss,
    one column per ``(title, {key: value})``; keys read as ``<prefix>/<name>`` (``val/``, ``eval/``)."""
    parsed = [
        {k.split("/", 1)[1]: float(v) for k, v in values.items() if "/" in k and isinstance(v, (int, float))}
        for _, values in columns
    ]
    losses = sorted({k for p in parsed for k in p if k.startswith("loss/")})
    losses = losses if len(losses) > 1 else []  # one loss: the loss row is it
    rows = list(PAIR_ROWS[:-2]) + [(f"loss: {k.removeprefix('loss/')}", k, "{:.4f}") for k in losses]
    rows += PAIR_ROWS[-2:]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    body = []
    for label, key, shown in rows:
        cells = "".join(f'<td class="n">{"-" if key not in p else shown.format(p[key])}</td>' for p in parsed)
        body.append(f"<tr><th>{html.escape(label)}</th>{cells}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def is_preference(cfg: DictConfig) -> bool:
    """Whether the run trained on preference pairs (``objective=dpo``)."""
    objective = cfg.get("objective")
    return objective is not None and objective.get("name") == "dpo"


def metric_table(columns: Sequence[tuple[str, dict[str, Any]]], metric: str) -> str:
    """Rows: overall and each question type; one column per ``(title, {key: value})`` set of metrics.

    Keys are read as ``<prefix>/<metric>[/<question type>]`` whatever the prefix (``val/``,
    ``before/val/``, ``eval/``), with ``n_questions`` and ``loss`` beside them.
    """
    parsed: list[dict[str, float]] = []
    for _, values in columns:
        found: dict[str, float] = {}
        for key, value in values.items():
            if not isinstance(value, (int, float)):
                continue
            parts = key.split("/")
            for i, part in enumerate(parts):
                if part == metric:
                    found["/".join(parts[i + 1 :]) or "overall"] = float(value)
                    break
                if part in ("loss", "n_questions") and i == len(parts) - 1:
                    found[part] = float(value)
        parsed.append(found)
    types = sorted({k for p in parsed for k in p} - {"overall", "loss", "n_questions"})
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    body = []
    for row, label in [("overall", f"{metric}, overall"), *[(t, f"{metric}, {t}") for t in types], ("loss", "loss")]:
        cells = []
        for p in parsed:
            value = p.get(row)
            cells.append(
                f'<td class="n">{"-" if value is None else (f"{value:.1%}" if row != "loss" else f"{value:.4f}")}</td>'
            )
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def source_table(columns: Sequence[tuple[str, dict[str, Any]]], sources: Sequence[tuple[str, str]]) -> str:
    """A mixture's table: a row per source (its own metric), the mean of the sources, and the loss."""
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _ in columns)
    rows = [(f"{name}: {metric}", f"/{name}/{metric}") for name, metric in sources]
    rows += [("score: the mean of the sources (each weighs the same)", "/score"), ("loss", "/loss")]
    body = []
    for label, suffix in rows:
        cells = []
        for _, values in columns:
            found = [v for k, v in values.items() if isinstance(v, (int, float)) and ("/" + k).endswith(suffix)]
            value = found[0] if found else None
            text = "-" if value is None else (f"{value:.4f}" if suffix == "/loss" else f"{value:.1%}")
            cells.append(f'<td class="n">{text}</td>')
        body.append(f"<tr><th>{html.escape(label)}</th>{''.join(cells)}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def gallery_html(predictions: Sequence[dict], rows: Iterable, metric: str) -> str:
    """Cards of image, question, prediction and references, marked right or wrong."""
    cards = []
    for card in gallery_cards(predictions, rows):
        p, row = card["p"], card["row"]
        pictures = ""
        if row is not None:
            for ref in row.images[:4]:
                try:
                    pictures += f'<img src="{thumbnail(ref)}" alt="image of {html.escape(str(p["id"]))}">'
                except Exception as err:  # an unreadable image is named, not fatal to the report
                    pictures += f'<p class="note">image unreadable: {html.escape(type(err).__name__)}</p>'
        right = card["right"]
        shown = p.get("metric", metric)
        # the mark is read from the right-marking columns (accuracy): their score beside it would repeat it
        score = f" ({shown} {p[shown]:.2f})" if shown not in right_columns() and shown in p else ""
        if p.get("source"):
            score += f" · {html.escape(str(p['source']))}"
        cards.append(
            f'<div class="card {"right" if right else "wrong"}">{pictures}'
            f"<div><b>Q:</b> {html.escape(card['question'])}</div>"
            f"<div><b>predicted:</b> {html.escape(card['prediction'])}</div>"
            f"<div><b>reference:</b> {html.escape(card['reference'])}</div>"
            f'<div class="mark">{"✓ right" if right else "✗ wrong"}{score}'
            f"{' · ' + html.escape(card['type']) if card['type'] else ''}</div></div>"
        )
    n_wrong = sum(1 for p in predictions if not is_right(p))
    note = (
        f'<p class="note">{len(cards)} of {len(predictions)} answers ({n_wrong} wrong in all); '
        "half of the examples are drawn from the wrong ones.</p>"
    )
    return note + f'<div class="gallery">{"".join(cards)}</div>'


def reward_curves_html(history: Sequence[dict]) -> str:
    """The reward curves' image and, beneath it, the history keys it draws (or why there is none)."""
    drawn = reward_curves_png(history)
    if drawn is None:
        return f'<p class="note">No reward curves: {HISTORY_FILE} holds no train/rewards/* step.</p>'
    png, keys = drawn
    return (
        f'<img src="{png_data_uri(png)}" alt="reward curves: {", ".join(keys)}">'
        f'<p class="note">Rewards are beta x (policy - reference) log-probabilities of each answer (without a '
        f"reference, beta x its mean log-prob per token); the accuracy is the share of pairs whose chosen answer "
        f"is rewarded above the rejected one. Drawn: {html.escape(', '.join(keys))}.</p>"
    )


def plan_html(plan: dict | None) -> str:
    if not plan:
        return '<p class="note">No plan.json in this run.</p>'
    rows = "".join(
        f'<tr><td>{html.escape(k)}</td><td class="n">{v:.3f} GB</td></tr>' for k, v in plan["rows_gb"].items()
    )
    setup = ", ".join(f"{k}={v}" for k, v in plan.get("setup", {}).items())
    workload = ", ".join(f"{k}={v}" for k, v in plan.get("workload", {}).items())
    return (
        f"<p><b>{html.escape(plan['verdict'])}</b>; peak at {html.escape(str(plan.get('peak_at')))}.</p>"
        f"<table>{rows}</table><p class='note'>workload: {html.escape(workload)}<br>setup: {html.escape(setup)}</p>"
    )


def write_report(
    folder: Path,
    *,
    title: str,
    cfg: DictConfig,
    columns: Sequence[tuple[str, dict[str, Any]]],
    predictions: Sequence[dict],
    rows: Iterable,
    run_dir: Path,
    facts: dict[str, Any] | None = None,
    metric: str | None = None,
) -> Path:
    """Write ``folder/report.html`` and return its path.

    Args:
        columns: the metric sets to compare, as ``(column title, flat metrics)``.
        predictions: per-question results (``id``, ``prediction``, ``references`` or ``answers``,
            the run's metric, the diagnostic columns of ``idefics2_ft.metrics.METRICS``, ``question_type``).
        rows: the data rows the predictions answer (their images and questions), matched by ``id``.
        run_dir: the run whose curves (``history.jsonl``), config and plan are shown.
        facts: a few lines for the header (steps, wall time, hardware, ...).
        metric: the metric the columns hold; None: ``data.metric`` (an evaluation preset scores with its own).
    """
    folder, run_dir = Path(folder), Path(run_dir)
    every_source = metric  # a preset's metric scores every source of a mixture
    metric = metric or cfg.data.metric
    pairs = is_preference(cfg)
    history = read_history(run_dir)
    png = curves_png(history)
    curves = (
        f'<img src="{png_data_uri(png)}" alt="loss and learning rate curves">'
        if png
        else f'<p class="note">No curves: {HISTORY_FILE} holds no logged step (trainer.log_every_n_steps).</p>'
    )
    if pairs:
        curves += reward_curves_html(history)
    if cfg.data.get("mixture") and not pairs:  # each source by its own metric, or all by a preset's
        sources = [(n, every_source or m) for n, m in mixture_metrics(cfg)]
        table = source_table(columns, sources)
    else:
        table = pair_table(columns) if pairs else metric_table(columns, metric)
    plan_path = RunFolder(run_dir).plan
    plan = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    header = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in (facts or {}).items()
    )
    page = Template((TEMPLATES / "report.html").read_text(encoding="utf-8")).substitute(
        title=html.escape(title),
        css=(TEMPLATES / "report.css").read_text(encoding="utf-8"),
        header=header,
        metrics=table,
        curves=curves,
        # a preference run generates no answers: no gallery, not an empty one
        gallery="" if pairs else "<h2>Examples</h2>\n" + gallery_html(predictions, rows, metric),
        plan=plan_html(plan),
        config=html.escape(OmegaConf.to_yaml(redacted(cfg))),
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT_FILE
    atomic_write_text(path, page)  # the run's own report, or inside an evaluation's partial folder
    return path


def mixture_metrics(cfg: DictConfig) -> list[tuple[str, str]]:
    """``(source name, its metric)`` of each mixture source (an entry without one has ``data.metric``)."""
    return [(e.name, e.metric or cfg.data.metric) for e in cfg.data.mixture]


def _facts(cfg: DictConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    peft = cfg.peft
    name = {"lora": "LoRA", "dora": "DoRA"}.get(peft.method, peft.method)
    method = name if peft.method == "full" else f"{'Q' if peft.quantize else ''}{name} r={peft.r}"
    facts: dict[str, Any] = {"recipe": cfg.name, "base model": cfg.model.name_or_path, "method": method}
    if is_preference(cfg):
        facts["objective"] = objective_line(cfg, metrics.get("objective/reference"))
    if "validation" in metrics:  # never validated: said at the top, not left to an empty table
        facts["validation"] = metrics["validation"]
    if "train/steps" in metrics:
        facts["steps"] = (
            f"{metrics['train/steps']} at an effective batch of {metrics.get('train/effective_batch', '?')}"
        )
    if "train/wall_s" in metrics:
        facts["training time"] = f"{metrics['train/wall_s']:.0f} s on {metrics.get('hardware', '?')}"
    return facts


def objective_line(cfg: DictConfig, reference: str | None = None) -> str:
    """A preference run's objective in one line: the losses with their weights, beta, the reference
    (``reference``: as the run resolved ``objective.reference``, its metrics' ``objective/reference``)."""
    o = cfg.objective
    weights = list(o.loss_weights) if o.loss_weights is not None else [1.0] * len(o.loss)
    losses = " + ".join(f"{w:g} x {name}" for name, w in zip(o.loss, weights, strict=False))
    reference = reference or o.reference
    named = {
        "adapter": f"the adapter it started from ({cfg.model.adapter}), frozen",
        "base": "the base with the adapters off",
        "none": "none (reference-free)",
    }.get(reference, f"{reference} (model.adapter={cfg.model.adapter})")
    return f"dpo: {losses}, beta {o.beta:g}; reference: {named}"


def _run_columns(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, dict[str, Any]]]:
    """A run's validation before and after training (``before/val/*``, ``val/*``), where it has them."""
    before = {k.removeprefix("before/"): v for k, v in metrics.items() if k.startswith("before/val/")}
    after = {k: v for k, v in metrics.items() if k.startswith("val/")}
    return [(prefix + title, m) for title, m in (("before training", before), ("after training", after)) if m]


def training_report(cfg: DictConfig, run_dir: Path, metrics: dict[str, Any], predictions, rows) -> Path:
    """``run_dir/report.html`` of a finished training run: validation before and after training."""
    columns = _run_columns(metrics)
    from idefics2_ft.presets import card_rows

    facts = {"run folder": str(run_dir), **_facts(cfg, metrics), "validation split": cfg.data.val_split}
    facts.update({f"score card: {label}": value for label, value in card_rows(metrics, "val/")})
    return write_report(
        run_dir,
        title=f"{cfg.name}: {Path(run_dir).name}",
        cfg=cfg,
        columns=columns,
        predictions=predictions or [],
        rows=rows,
        run_dir=run_dir,
        facts=facts,
    )


def evaluation_report(cfg: DictConfig, out_dir: Path, metrics: dict[str, Any], predictions, rows, model: str) -> Path:
    """``out_dir/report.html`` of an evaluation, beside the run's own validation when it was on the same split."""
    from idefics2_ft.presets import TRAINING, card_rows

    run = read_metrics(Path(cfg.run_dir))
    split = metrics.get("eval/split")
    # beside the run's own validation when it scored the same split the same way (pairs, or answers with
    # the training prompt: a preset asks and scores otherwise)
    same_kind = ("eval/pairs" in metrics) == ("val/pairs" in run)
    same_prompt = metrics.get("eval/card/preset", TRAINING) == TRAINING
    columns = _run_columns(run, "run: ") if split == cfg.data.val_split and same_kind and same_prompt else []
    columns.append((f"this evaluation ({split})", metrics))
    facts = {"run folder": str(cfg.run_dir), "evaluated": model, **_facts(cfg, run), "split": split}
    facts.update({f"score card: {label}": value for label, value in card_rows(metrics, "eval/")})
    return write_report(
        out_dir,
        title=f"{cfg.name}: evaluation of {Path(cfg.run_dir).name} on {split}",
        cfg=cfg,
        columns=columns,
        predictions=predictions,
        rows=rows,
        run_dir=Path(cfg.run_dir),
        facts=facts,
        metric=None if same_prompt else metrics.get("eval/card/metric"),  # a preset scores with its own
    )
