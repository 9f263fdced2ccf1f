"""What tests share: the checkout's paths, the tiny-run overrides, config composition, ``train.py``
in a subprocess. Importable (``from tests.helpers import run_train``); ``conftest.py`` holds the fixtures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from idefics2_ft import demo
from idefics2_ft.config import CONF_DIR, register_configs

ROOT = Path(__file__).resolve().parents[1]
demo.register()  # model.name_or_path=tiny, as the idefics2-ft command has it
IDEFICS2_FT = str(Path(sys.executable).parent / "idefics2-ft")  # the console script of this venv
CONF = CONF_DIR

# A smaller tiny model than the demo's, no stage 1, a handful of steps: seconds per run.
TINY_RUN = [
    "model.tiny.vision_hidden=64",
    "model.tiny.text_hidden=64",
    "model.tiny.vision_layers=1",
    "model.tiny.text_layers=1",
    "model.tiny.vision_pretrain_steps=0",
    "model.tiny.pretrain_steps=0",
    "data.max_train_samples=64",
    "data.max_val_samples=12",
    "data.batch_size=4",
    "data.eval_batch_size=6",
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "optim.warmup_steps=1",
    "eval.before_training=false",
    "logger=csv",
]


class CaseTable(list):
    """The rows of a Markdown table of cases that a tier writes to ``outputs/<name>`` (``make
    test-faults`` prints ``fault_table.md``): tests append one tuple per row. The table stays whole
    when the cases run two at a time (``pytest -n 2``): conftest.py sends each test's new rows with
    its report to the controlling process, which writes the file at the end, in collection order."""

    tables: dict[str, CaseTable] = {}

    def __init__(self, name: str, columns: tuple[str, ...]):
        super().__init__()
        self.name, self.columns = name, columns
        CaseTable.tables[name] = self

    @staticmethod
    def markdown(columns: list[str], rows: list[list[str]]) -> str:
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |" for row in rows]
        return "\n".join(lines) + "\n"


def llava_every_other_answer_empty(folder: Path, rows: int) -> Path:
    """A LLaVA JSON file of easy-VQA rows whose every other answer is empty (a bad record, counted
    ``empty_answer``): with one record per rank, some steps give one rank nothing to learn."""
    import json

    from idefics2_ft.demo import formats

    path = formats.write_llava(folder, rows=rows)
    records = json.loads(path.read_text())
    for i, record in enumerate(records):
        if i % 2 == 1:
            record["conversations"][1]["value"] = ""
    path.write_text(json.dumps(records))
    return path


def run_train(*overrides: str, cwd: Path = ROOT, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``python train.py OVERRIDES`` in a subprocess (how users launch several processes)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    if expect_ok:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def compose_config(overrides: list[str] | None = None, config_name: str = "train"):
    """Compose ``conf/`` exactly as ``train.py`` does, with overrides."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides or [], return_hydra_config=False)


# ---------------------------------------------------------------- comparing two trainings
# The fraction of lr x steps that two runs of the same training may differ by (argued in
# training_tolerance; tests/unit/test_tolerance.py shows both sides of it).
TOLERANCE_FRACTION = 1e-2


def training_tolerance(lr: float, steps: int) -> float:
    """How far (absolute, per element) two runs of the same training may end apart: 1% of ``lr x steps``.

    The scale: under Adam(W) each step moves each element by ``lr x m/sqrt(v)``, about ``lr`` at most
    (exactly ``lr`` on the first step, which is sign(gradient)), so after ``steps`` steps an element
    has moved by at most about ``lr x steps``; LoRA B, which starts at zero, ends at 0.67-0.75 of it
    in the tiny runs here.

    What a real bug changes: two ranks that train on the same half of the batch instead of disjoint
    halves, a rank whose gradient is not averaged with the other's, a sample dropped, the wrong
    samples grouped together, the batches or Adam's moments not restored on resume, the schedule
    restarted. Each changes the direction of the gradient or the size of the step, so the elements
    it touches move by a sizeable fraction of ``lr`` in every step it touches: in
    tests/unit/test_tolerance.py such bugs end 1.2-1.7 x ``lr x steps`` apart, a resume without
    Adam's moments 0.7 x, and a single update halved 0.1 x (``lr / 2`` over 4 steps). Refused here
    when it touches more than 1% of the steps (in a run of up to 40 steps: any single step). A bug
    that only scales every gradient by one constant (a sum instead of a mean) changes nothing under
    Adam, which divides by the gradient's RMS: it does not matter, and is not looked for.

    Float32 noise: the same sums in another order (two half batches then an all-reduce, FSDP's
    sharded reduction, 1 thread against 2, AVX-512 or not) differ by ~1e-7 relative per sum, and
    Adam's first steps amplify that in the few elements whose moments nearly cancel: DDP and FSDP
    against one process end up to 4e-5 x ``lr x steps`` apart here (1 and 2 threads), and 3.4e-4 x
    on another CPU (1.35e-6 on a `lora_B` element, lr 1e-3, 4 steps: the failure that set this).

    1e-2 lies 30x above the worst noise seen and 10x below the smallest bug above. A comparison that
    expects the very same sums in the very same order (a resume in the same process layout, in one
    test) may stay exact (``torch.equal``): it is bit for bit on any CPU.
    """
    return TOLERANCE_FRACTION * lr * steps


def assert_same_training(a: dict, b: dict, *, lr: float, steps: int) -> None:
    """Two trainings' weights (name -> tensor: adapters, LoRA state) agree within
    :func:`training_tolerance`; and they moved (a LoRA ``B``, which starts at zero, ended well past
    the tolerance), so that a bug could have shown."""
    import torch

    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    tol = training_tolerance(lr, steps)
    worst = max(a, key=lambda k: float((a[k].float() - b[k].float()).abs().max()))
    diff = float((a[worst].float() - b[worst].float()).abs().max())
    assert diff <= tol, (
        f"{worst}: the runs differ by {diff:.3g}, over {tol:.3g} (1% of lr {lr:g} x {steps} steps): "
        "more than float summation order explains"
    )
    moved = [float(v.abs().max()) for k, v in b.items() if "lora_B" in k]
    if moved:
        assert max(moved) > 10 * tol, f"LoRA B moved by {max(moved):.3g} only: too little for this check"
    assert all(torch.isfinite(v).all() for v in b.values())


def adapter_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_same_adapters(run_a: Path, run_b: Path) -> None:
    """Two run folders trained the same adapter (:func:`assert_same_training`), with the learning
    rate and the steps the first one's ``config.yaml`` records."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_a / "config.yaml")
    assert_same_training(adapter_weights(run_a), adapter_weights(run_b), lr=cfg.optim.lr, steps=cfg.trainer.max_steps)
