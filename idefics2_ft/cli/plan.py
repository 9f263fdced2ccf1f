"""Will a recipe fit a GPU, and how long will a step take? Memory and time from the real shapes.

    idefics2-ft plan recipe=docvqa_qlora [plan.gpu_gb=24] [any train.py override]
    idefics2-ft plan recipe=docvqa_qlora data.batch_size=4 data.do_image_splitting=true plan.gpu_gb=80

Plans the largest batch the data settings allow (square pages at ``data.longest_edge``,
``plan.images`` per sample, ``plan.text_tokens`` of text), on one GPU of ``plan.gpu_gb`` GB
(default 24) unless the strategy and ``trainer.devices`` say more. Prints the model by part, every
term, the verdict with the cheapest change that makes it fit, and a table for common GPUs. Nothing
is loaded: the shapes come from the config (``model.name_or_path``'s config.json when it is a
folder; the published idefics2-8b's for its Hub id; a stand-in's own).
"""

from __future__ import annotations

import json

from idefics2_ft.cli import compose_config
from idefics2_ft.hardware import GPUS
from idefics2_ft.models import base_config
from idefics2_ft.planning import format_plan, plan_run, setup_from_cfg, workload_from_cfg
from idefics2_ft.planning.batch import largest_batch
from idefics2_ft.run_folder import OutputRefused, atomic_write_text, claim_output_file

PLAN_KIND = "idefics2-ft plan"  # plan.json=FILE is replaced only when it says it was written by this command
OWN = {"plan.gpu_gb": 24.0, "plan.text_tokens": 128, "plan.images": 1, "plan.answer_tokens": 32, "plan.json": None}


def main(argv: list[str]) -> int:
    import sys

    own = dict(OWN)
    overrides = []
    for arg in argv:
        key = arg.split("=", 1)[0]
        if key in own:
            own[key] = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    if own["plan.json"]:
        try:  # refused before any work: an existing file that is not an earlier plan is kept
            claim_output_file(own["plan.json"], PLAN_KIND, "plan.json")
        except OutputRefused as err:
            print(f"plan refused: {err}", file=sys.stderr)
            return 2
    cfg = compose_config(overrides)
    config = base_config(cfg)
    if cfg.data.batch_size == "auto":
        cfg.data.batch_size, _ = largest_batch(cfg, config, "cuda", float(own["plan.gpu_gb"]))
        print(f"data.batch_size=auto: {cfg.data.batch_size} per device on {float(own['plan.gpu_gb']):g} GB\n")
    workload = workload_from_cfg(
        cfg, config, int(own["plan.text_tokens"]), int(own["plan.images"]), int(own["plan.answer_tokens"])
    )
    setup = setup_from_cfg(cfg, "cuda")
    plan = plan_run(config, workload, setup, float(own["plan.gpu_gb"]))
    gpus = f"{setup.gpus} GPUs" if setup.gpus > 1 else "one GPU"
    print(f"# Plan: {cfg.name} on {gpus} of {float(own['plan.gpu_gb']):g} GB (per GPU)\n")
    print(format_plan(plan))
    print("\n| GPU | memory | planned | verdict | s/step | hours for trainer.max_steps |")
    print("|---|---|---|---|---|---|")
    for name, (memory, _) in GPUS.items():
        p = plan_run(config, workload, setup, memory)
        hours = p.times[name] * cfg.trainer.max_steps / 3600
        fix = f" ({p.fix})" if p.fix else ""
        print(
            f"| {name} | {memory} GB | {p.total_gb:.1f} GB | {p.verdict.split(':')[0]}{fix} | {p.times[name]:.1f} | {hours:.1f} |"
        )
    if own["plan.json"]:
        atomic_write_text(own["plan.json"], json.dumps({"written_by": PLAN_KIND, **plan.to_json()}, indent=2) + "\n")
    return 0
