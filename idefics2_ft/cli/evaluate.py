"""Evaluate a finished run: batched greedy generation on a split, metrics and predictions.jsonl.

    idefics2-ft evaluate run_dir=RUN [data.split=test] [model_dir=RUN/export] [out_dir=...] [key=value ...]

Loads the run's adapter on its base as trained (or a merged model folder with model_dir=), answers
every question of the split, prints a summary table and writes predictions.jsonl,
eval_metrics.json and report.html (metrics, curves, a gallery of answers) to out_dir (default
RUN/eval/<split>).
"""

import sys
from pathlib import Path

from idefics2_ft.cli.arguments import parse_overrides, setup_logging
from idefics2_ft.config import ConfigError
from idefics2_ft.data import DataError
from idefics2_ft.run_folder import RunFolder
from idefics2_ft.tasks.evaluate import config_for_split, evaluate, format_table, load_run


def main(argv: list[str]) -> int:
    setup_logging()
    cfg, own = parse_overrides(argv, {"data.split": None, "model_dir": None, "out_dir": None})
    split = own["data.split"] or cfg.data.val_split
    try:
        cfg = config_for_split(cfg, split)  # a split the source does not have is refused here
        model, processor = load_run(cfg, model_dir=own["model_dir"])
        out_dir = Path(own["out_dir"] or RunFolder(cfg.run_dir).eval(split))
        label = f"merged model {own['model_dir']}" if own["model_dir"] else "the run's adapter on its base, as trained"
        metrics = evaluate(cfg, model, processor, split, out_dir, label)
    except (ConfigError, DataError, FileNotFoundError) as err:
        sys.stderr.write(f"evaluate failed: {err}\n")
        return 2
    sys.stdout.write(
        format_table(metrics) + f"\n\nwrote {out_dir}/predictions.jsonl, eval_metrics.json and report.html\n"
    )
    return 0
