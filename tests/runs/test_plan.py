"""The plan: checked against measured peaks on the CPU, its verdicts and fixes, the model by part,
`idefics2-ft plan` (the table in docs/memory.md) and the dry run of `scripts/bench_gpu.py`.

The measured peak is the fit's peak RSS above what the process held before the weights loaded,
with `MALLOC_MMAP_THRESHOLD_=65536` so that glibc returns freed tensors at once and RSS follows
the live tensors (the CPU's counterpart of `torch.cuda.max_memory_allocated`). The checkpoints are
random-init bf16 ones written here, loaded like the 8B: converted to fp32 and quantized, nothing
left mapped from the files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from idefics2_ft.data.synthetic import write_docs
from idefics2_ft.demo import tiny_config
from idefics2_ft.models import write_random_checkpoint
from idefics2_ft.models.reference import idefics2_8b_config
from idefics2_ft.planning import Setup, Workload, plan_run
from tests.helpers import IDEFICS2_FT, ROOT

MID = dict(vision_hidden=256, text_hidden=512, text_layers=4, patch_size=14, n_latents=64)
TEXT_HEAVY = dict(vision_hidden=128, text_hidden=1024, text_layers=8, patch_size=14, n_latents=64)
SPLIT = ["data.do_image_splitting=true", "data.longest_edge=490"]
CONFIGS = {
    "tiny, batch 1": ({}, ["data.batch_size=1"]),
    "tiny, batch 4": ({}, ["data.batch_size=4"]),
    "mid, batch 2, checkpointing off": (MID, ["data.batch_size=2", "model.gradient_checkpointing=false"]),
    "mid, batch 4, checkpointing on": (MID, ["data.batch_size=4"]),
    "text-heavy, batch 2, splitting, checkpointing off": (
        TEXT_HEAVY,
        ["data.batch_size=2", *SPLIT, "model.gradient_checkpointing=false"],
    ),
    "text-heavy, batch 2, splitting, checkpointing on": (TEXT_HEAVY, ["data.batch_size=2", *SPLIT]),
    "text-heavy, batch 2, splitting, connector recompute off": (
        TEXT_HEAVY,
        ["data.batch_size=2", *SPLIT, "model.checkpoint_connector=false"],
    ),
}
# objective=dpo on pairs of the same pages (ms-swift's JSONL), the reference the base with the adapters off
DPO = ["objective=dpo", "model.adapter=null"]
DPO_CONFIGS = {
    "DPO, tiny, 2 pairs": ({}, ["data.batch_size=2"]),
    "DPO, mid, 2 pairs, splitting": (MID, ["data.batch_size=2", *SPLIT]),
    "DPO, text-heavy, 2 pairs, splitting, checkpointing off": (
        TEXT_HEAVY,
        ["data.batch_size=2", *SPLIT, "model.gradient_checkpointing=false"],
    ),
}
TABLE: list[str] = []


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_docs(tmp_path_factory.mktemp("docs"), 4, 2, sizes=((760, 980),))  # one page size: uniform batches


def write_page_pairs(docs: dict) -> dict:
    """The pages' questions as preference pairs (ms-swift's JSONL, beside the pages): the page's answer
    chosen, another page's rejected."""
    out = {}
    for split, path in docs.items():
        records = [json.loads(line) for line in path.read_text().splitlines()]
        lines = []
        for i, record in enumerate(records):
            question = record["messages"][0]["content"][1]["text"]
            answer = record["answers"][0]
            other = records[(i + 1) % len(records)]["answers"][0]
            rejected = other if other != answer else f"not {answer}"
            messages = [{"role": "user", "content": f"<image>{question}"}, {"role": "assistant", "content": answer}]
            row = {"messages": messages, "images": record["images"], "rejected_response": rejected}
            lines.append(json.dumps(row))
        out[split] = path.with_name(f"pairs-{split}.jsonl")
        out[split].write_text("\n".join(lines) + "\n")
    return out


@pytest.fixture(scope="module")
def page_pairs(docs):
    return write_page_pairs(docs)


@pytest.fixture(scope="module", autouse=True)
def validation_table():
    yield
    if TABLE:
        out = ROOT / "outputs" / "plan_validation.md"
        out.parent.mkdir(exist_ok=True)
        header = ["| configuration | planned GB | measured GB | difference |", "|---|---|---|---|"]
        out.write_text("\n".join(header + TABLE) + "\n")


CALIBRATED_ON = "2.13"  # the torch whose CPU kernels the plan's activation terms were measured with


def torch_older_than_calibration() -> bool:
    from packaging.version import Version

    return Version(torch.__version__.split("+")[0]) < Version(CALIBRATED_ON)


def small_checkpoint(sizes: dict, tmp_path_factory):
    key = "-".join(f"{k}{v}" for k, v in sorted(sizes.items())) or "default"
    return write_random_checkpoint(tmp_path_factory.getbasetemp() / f"checkpoint-{key}", tiny_config(**sizes))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_plan_predicts_the_measured_peak_within_15_percent(name, docs, tmp_path_factory):
    sizes, overrides = CONFIGS[name]
    check_against_measured(name, small_checkpoint(sizes, tmp_path_factory), overrides, docs, tmp_path_factory)


@pytest.mark.parametrize(
    "name",
    # mid peaks where its SFT runs do (the connector's backward): in the slow tier, to keep the fast one short
    [pytest.param(n, marks=pytest.mark.slow) if n.startswith("DPO, mid") else n for n in DPO_CONFIGS],
)
def test_the_plan_predicts_a_dpo_runs_measured_peak_within_15_percent(name, page_pairs, tmp_path_factory):
    """A pair: two text rows, its pictures once, the reference's pass without grad (docs/memory.md)."""
    sizes, overrides = DPO_CONFIGS[name]
    checkpoint = small_checkpoint(sizes, tmp_path_factory)
    plan = check_against_measured(name, checkpoint, [*DPO, *overrides], page_pairs, tmp_path_factory)
    assert plan["setup"]["reference"] == "base" and plan["workload"]["rows_per_sample"] == 2


@pytest.mark.slow  # the 8B's vision tower and connector at full size, 2 decoder layers: 8 min CPU (make test-slow)
def test_the_plan_predicts_a_dpo_run_of_the_8bs_shapes_within_15_percent(page_pairs, tmp_path_factory):
    """One pair of 490-px pages with splitting (5 pictures), the 8B's shapes with 2 decoder layers (the
    checkpoint ``scripts/build_8b.py --text-layers 2`` writes, in the same cache)."""
    from idefics2_ft.models.random_checkpoint import default_cache_dir

    config = idefics2_8b_config()
    config.text_config.num_hidden_layers = 2
    cache = Path(os.environ.get("IDEFICS2_FT_CACHE", default_cache_dir()))
    checkpoint = write_random_checkpoint(cache / "idefics2-8b-random-L2", config)
    name = "DPO, the 8B's shapes with 2 decoder layers, 1 pair, splitting"
    overrides = [*DPO, "data.batch_size=1", *SPLIT]
    plan = check_against_measured(name, checkpoint, overrides, page_pairs, tmp_path_factory, timeout=1800)
    assert plan["setup"]["reference"] == "base"


def check_against_measured(
    name: str, checkpoint, overrides: list[str], data: dict, tmp_path_factory, timeout: int = 600
) -> dict:
    """Train ``recipe=docvqa_qlora`` 2 steps from ``checkpoint`` with ``overrides``: the plan's allocated
    GB within 15% of the measured peak (the row is added to the table). Returns plan.json."""
    run_dir = tmp_path_factory.mktemp("run")
    args = [
        "recipe=docvqa_qlora",
        f"model.name_or_path={checkpoint}",
        "data=jsonl",
        f"data.train_file={data['train']}",
        f"data.val_file={data['val']}",
        "trainer.max_steps=2",
        "optim.warmup_steps=1",
        "trainer.accumulate_grad_batches=1",
        "eval.at_end=false",
        "logger=csv",
        "data.num_workers=0",
        f"run_dir={run_dir}",
        *overrides,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())
    planned, measured = plan["allocated_gb"], plan["measured_gb"]
    TABLE.append(f"| {name} | {planned:.2f} | {measured:.2f} | {100 * (planned - measured) / measured:+.0f}% |")
    if abs(planned - measured) > 0.15 * measured and torch_older_than_calibration():
        # make test-min: torch 2.7's CPU kernels keep more for one configuration (+19%); the plan's
        # activation terms are calibrated on the torch the fast tier runs, where this stays strict
        pytest.xfail(f"{name}: planned {planned:.2f} GB, measured {measured:.2f} GB under torch {torch.__version__}")
    assert abs(planned - measured) <= 0.15 * measured, (name, plan)
    phases = json.loads((run_dir / "phases.json").read_text())["phases"]
    assert phases["fit"]["steps"] == 2 and phases["load"]["wall_s"] > 0
    log = (run_dir / "train.log").read_text()
    assert "The model by part" in log and "Memory: planned" in log
    assert "Total estimated model params size" not in log  # Lightning's summary, wrong for 4-bit weights
    return plan


def test_the_docvqa_recipe_fits_24_gb_and_a_larger_batch_gets_the_cheapest_fix():
    config = idefics2_8b_config()
    recipe = Workload(batch=2, images=2, patches=4900, seq_len=192)
    plan = plan_run(config, recipe, Setup(), gpu_gb=24)
    assert plan.verdict.startswith("fits") and plan.fix is None
    # batch 8 with image splitting (5 crops per page) at 980 px, without checkpointing
    big = Workload(batch=8, images=40, patches=4900, seq_len=448, crops=5)
    setup = Setup(checkpointing=False)
    plan = plan_run(config, big, setup, gpu_gb=24)
    assert plan.verdict.startswith("does not fit by")
    assert plan.fix.startswith("data.batch_size=")  # the cheapest: the same effective batch
    batch = int(plan.fix.split("data.batch_size=")[1].split()[0])
    accumulate = int(plan.fix.split("trainer.accumulate_grad_batches=")[1].split()[0])
    assert batch * accumulate == 8
    fixed = plan_run(config, replace(big, batch=batch, images=5 * batch), replace(setup, accumulate=accumulate), 24)
    assert fixed.total_gb <= 24
    # more memory than any single change can save
    assert plan_run(config, big, setup, gpu_gb=4).fix == "no single change makes it fit"


def test_checkpointing_and_splitting_move_the_plan_the_way_they_should():
    config = idefics2_8b_config()
    w = Workload(batch=2, images=2, patches=4900, seq_len=1024)
    on, off = plan_run(config, w, Setup()), plan_run(config, w, Setup(checkpointing=False))
    assert off.rows["activations: text model"] > 10 * on.rows["activations: text model"]
    split = plan_run(config, replace(w, images=10, crops=5), Setup())
    assert split.total_gb > on.total_gb
    eager = plan_run(config, w, Setup(attn="eager", checkpointing=False))
    assert eager.rows["activations: text model"] > off.rows["activations: text model"]


def test_the_model_by_part_stores_the_8b_as_qlora_does():
    parts = {p["part"]: p for p in plan_run(idefics2_8b_config(), Workload(1, 1, 4900, 128), Setup()).parts}
    assert sum(p["params"] for p in parts.values()) == pytest.approx(8.426e9, rel=1e-3)  # with LoRA's 23.3 M
    assert "NF4" in parts["text"]["storage"] and "NF4" not in parts["vision"]["storage"]
    assert parts["vision"]["bytes"] == parts["vision"]["params"] * 2  # bf16 on CUDA
    total_gb = sum(p["bytes"] for p in parts.values()) / 1e9
    assert 6.0 < total_gb < 7.0  # not Lightning's "19,745 MB" (packed bytes counted as fp32 parameters)


def test_the_memory_pages_table_is_the_commands():
    out = subprocess.run(
        [IDEFICS2_FT, "plan", "recipe=docvqa_qlora"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith(("| A100-40 ", "| H100 ", "| RTX 4090 "))]
    assert len(rows) == 3
    page = (ROOT / "docs" / "memory.md").read_text()
    for row in rows:
        assert row in page, row
    assert "Verdict: fits" in out.stdout


def test_bench_gpu_says_so_without_cuda():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0 and "no CUDA GPU here" in out.stdout


@pytest.mark.slow  # the 8B's shapes with 2 decoder layers, loaded twice: 2 min (make test-slow)
def test_bench_gpus_dry_run_measures_two_rows(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    table = tmp_path / "bench.md"
    out = subprocess.run(
        [sys.executable, "scripts/bench_gpu.py", "--dry-run", "--out", str(table)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in table.read_text().splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert len(rows) == 2 and all("| fits | yes |" in row for row in rows), table.read_text()


def test_connector_recompute_and_learned_logits_fit_image_splitting_in_24_gb():
    from idefics2_ft.planning import setup_from_cfg, workload_from_cfg
    from idefics2_ft.planning.batch import largest_batch
    from tests.helpers import compose_config

    config = idefics2_8b_config()

    def plan_of(*overrides: str):
        cfg = compose_config(["recipe=docvqa_qlora", "data.do_image_splitting=true", *overrides])
        return plan_run(config, workload_from_cfg(cfg, config), setup_from_cfg(cfg, "cuda"), gpu_gb=24), cfg

    before, _ = plan_of("data.batch_size=2", "model.checkpoint_connector=false")
    after, _ = plan_of("data.batch_size=2")
    assert before.verdict.startswith("does not fit") and before.fix.startswith("model.checkpoint_connector=true")
    assert after.total_gb <= 15 and after.rows["activations: connector"] < before.rows["activations: connector"] / 10
    four, cfg = plan_of("data.batch_size=4")
    assert four.verdict.startswith("fits")
    assert largest_batch(cfg, config, "cuda", 24)[0] >= 4  # data.batch_size=auto on a 24 GB GPU
    # with a global batch of 12 on one device, only batches that divide it are tried
    twelve = compose_config(["recipe=docvqa_qlora", "data.do_image_splitting=true", "trainer.global_batch_size=12"])
    assert 12 % largest_batch(twelve, config, "cuda", 24)[0] == 0
    # the head runs on the learned positions only: the logits term shrinks with them
    w = Workload(batch=2, images=2, patches=4900, seq_len=1024)
    full, learned = plan_run(config, w, Setup()), plan_run(config, replace(w, learned=32), Setup())
    assert learned.off_peak.get("activations: logits and loss", learned.rows.get("activations: logits and loss", 0)) < (
        full.off_peak.get("activations: logits and loss", full.rows.get("activations: logits and loss", 0)) / 10
    )


def test_the_rlaifv_dpo_recipe_fits_24_gb_at_one_pair_with_and_without_splitting():
    """A pair (two text rows, its pictures once) and the reference's pass, counted: one pair per device."""
    from idefics2_ft.planning import setup_from_cfg, workload_from_cfg
    from tests.helpers import compose_config

    config = idefics2_8b_config()
    plans = {}
    for splitting in ("false", "true"):
        cfg = compose_config(["recipe=rlaifv_dpo", f"data.do_image_splitting={splitting}"])
        assert cfg.data.batch_size == 1 and cfg.objective.name == "dpo"
        w, s = workload_from_cfg(cfg, config), setup_from_cfg(cfg, "cuda")
        assert (w.batch, w.samples, w.images) == (2, 1, 5 if splitting == "true" else 1) and s.reference == "base"
        plans[splitting] = plan_run(config, w, s, gpu_gb=24)
        assert plans[splitting].verdict.startswith("fits") and plans[splitting].fix is None
        # the reference's pass is a moment of its own: everything the policy saved, and its transient
        terms = {**plans[splitting].rows, **plans[splitting].off_peak}
        assert terms["temporaries: the reference's connector (no grad)"] > 0
        # from an SFT run, its adapter loaded again as the frozen reference
        adapter = plan_run(config, w, replace(s, reference="adapter"), gpu_gb=24)
        assert adapter.rows["LoRA weights of the reference (frozen)"] == pytest.approx(0.0933, abs=0.01)
    assert plans["true"].total_gb > plans["false"].total_gb
    # the longest pair the recipe keeps (data.max_length=2048 tokens a side) fits too
    cfg = compose_config(["recipe=rlaifv_dpo", "data.do_image_splitting=true"])
    w = workload_from_cfg(cfg, config, text_tokens=2048, answer_tokens=1024)
    assert w.seq_len == 2048 and plan_run(config, w, setup_from_cfg(cfg, "cuda"), gpu_gb=24).verdict.startswith("fits")
    # too many pairs: the cheapest change halves the pairs (two rows each), keeping the effective batch
    eight = compose_config(["recipe=rlaifv_dpo", "data.do_image_splitting=true", "data.batch_size=8"])
    plan = plan_run(config, workload_from_cfg(eight, config), setup_from_cfg(eight, "cuda"), gpu_gb=24)
    assert plan.verdict.startswith("does not fit")
    assert plan.fix.startswith("data.batch_size=4 trainer.accumulate_grad_batches=32 (the same effective batch)")
