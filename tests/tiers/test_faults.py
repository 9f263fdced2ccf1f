"""Fault injection through `python train.py`, as a user meets faults (`make test-faults`).

Every bad input is generated here and run in both `data.on_bad_sample` modes; runs are killed with
SIGKILL at random points and once in the middle of a checkpoint save (with $TMPDIR on another
filesystem), then resumed; a run is made to diverge; a finished run's folder is reused. For each
case the test asserts what the user sees (a named count, or one line naming the file, the line
and the fix), that a resumed adapter equals the uninterrupted one, and that nothing is lost or
silently replaced. The table of cases is written to outputs/fault_table.md (`make test-faults`
prints it).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from idefics2_ft.run_folder import run_outputs
from tests.helpers import ROOT, TINY_RUN

pytestmark = pytest.mark.faults

TABLE: list[tuple[str, str, str, str]] = []


@pytest.fixture(scope="module", autouse=True)
def fault_table():
    yield
    lines = ["| case | what the user sees | time to error | nothing lost |", "|---|---|---|---|"]
    lines += [f"| {c} | {seen.replace('|', '/')} | {t} | {lost} |" for c, seen, t, lost in TABLE]
    out = ROOT / "outputs" / "fault_table.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_base")


def train_py(*overrides: str, env: dict | None = None, wrapper: str | None = None, **popen) -> subprocess.Popen:
    args = [sys.executable, *([wrapper] if wrapper else []), str(ROOT / "train.py"), *overrides]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        args, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def run(*overrides: str, **kw) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = train_py(*overrides, **kw)
    out, _ = proc.communicate(timeout=600)
    return proc.returncode, out, time.perf_counter() - start


def base_overrides(cache: Path, run_dir: Path, *extra: str) -> list[str]:
    return [*TINY_RUN, f"model.tiny.cache_dir={cache}", f"run_dir={run_dir}", "trainer.max_steps=2", *extra]


def short(line: str, tmp_path: Path, width: int = 220) -> str:
    """The line as the table shows it: the test's temporary folder as `<tmp>`, at most `width` characters."""
    line = line.replace(str(tmp_path), "<tmp>")
    return line if len(line) <= width else line[: width - 3] + "..."


def last_error_line(out: str) -> str:
    lines = [line for line in out.splitlines() if "ERROR" in line]
    return lines[-1].split(" - ", 1)[-1] if lines else ""


# ---------------------------------------------------------------- bad inputs, both modes
def _image(folder: Path, name: str, kind: str = "rgb") -> str:
    if kind == "corrupt":
        (folder / name).write_bytes(b"\x89PNG but not really")
    elif kind == "16bit":
        Image.fromarray(np.full((64, 64), 30000, dtype=np.uint16)).save(folder / name)
    else:
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / name)
    return name


def _record(image: str | None, question="What color is the shape?", answer="red", role="assistant", images=None):
    content = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": content}]
    if answer is not None:
        messages.append({"role": role, "content": [{"type": "text", "text": answer}]})
    return {"images": images if images is not None else ([image] if image else []), "messages": messages}


# case name -> (the bad line, the kind counted in skip mode, what the raise-mode line must say);
# a kind of None: the input is fine and must train (a 16-bit image) or is refused in both modes.
def bad_inputs(folder: Path) -> dict[str, tuple]:
    good = _image(folder, "good.png")
    return {
        "missing image file": (_record("nowhere.png"), "missing_image", "image not found"),
        "corrupt image file": (
            _record(_image(folder, "corrupt.png", "corrupt")),
            "unreadable_image",
            "unreadable image",
        ),
        "16-bit grayscale image": (_record(_image(folder, "scan16.png", "16bit")), None, None),
        "unknown role": (_record(good, role="bot"), "unknown_role", "unknown role"),
        "no assistant turn": (_record(good, answer=None), "no_assistant_turn", "no assistant turn"),
        "empty answer": (_record(good, answer=""), "empty_answer", "empty assistant answer"),
        "more placeholders than images": (_record(good, images=[]), "too_many_placeholders", "image placeholders"),
        "more images than placeholders": (_record(good, images=[good, good]), "too_many_images", "images but 1"),
        "answer cut by max_length": (
            _record(good, answer="a long answer " * 40),
            "answer_truncated",
            "cut by max_length",
        ),
    }


def write_case(folder: Path, bad: dict, n_good: int = 7) -> Path:
    good = _record(_image(folder, "good.png"))
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good] * 3 + [bad] + [good] * (n_good - 3)))
    return path


@pytest.mark.parametrize("mode", ["skip", "raise"])
@pytest.mark.parametrize(
    "case",
    [
        "missing image file",
        "corrupt image file",
        "16-bit grayscale image",
        "unknown role",
        "no assistant turn",
        "empty answer",
        "more placeholders than images",
        "more images than placeholders",
        "answer cut by max_length",
    ],
)
def test_bad_input(case, mode, cache, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    bad, kind, says = bad_inputs(folder)[case]
    data = write_case(folder, bad)
    max_length = ["data.max_length=60"] if case == "answer cut by max_length" else []
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "data=jsonl", f"data.train_file={data}", f"data.val_file={data}",
        f"data.on_bad_sample={mode}", "data.batch_size=8", *max_length,
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    if kind is None:  # a fine input: it trains, nothing is skipped
        assert rc == 0, out[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["data/skipped"] == 0
        TABLE.append((f"{case} ({mode})", "trains; read as faithful 8-bit RGB, nothing skipped", "-", "yes"))
        return
    if mode == "skip":
        assert rc == 0, out[-2000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics[f"data/skipped/train/{kind}"] == 1, metrics  # one record, counted once, named
        seen = f"trains; metrics.json data/skipped/train/{kind}=1 and a warning naming it"
        TABLE.append((f"{case} (skip)", seen, "-", "yes"))
    else:
        assert rc == 2, out[-2000:]
        line = last_error_line(out)
        assert "train.jsonl:4: " in line and says in line, line  # the file, the line, what is wrong
        assert "data.on_bad_sample=skip" in line  # and the fix
        assert "Traceback" not in out
        assert run_outputs(run_dir) == []  # refused before any weight loaded: no checkpoint, no adapter
        TABLE.append((f"{case} (raise)", short(line, tmp_path), f"{seconds:.0f} s", "yes"))


@pytest.mark.parametrize(
    "case, content, says",
    [
        ("non-UTF-8 line", b'{"messages": []}\n{"x": "caf\xe9"}\n', "val.jsonl:2: not UTF-8"),
        ("invalid JSON line", b'{"messages": [}\n', "val.jsonl:1: not valid JSON"),
    ],
)
@pytest.mark.parametrize("mode", ["skip", "raise"])
def test_unreadable_validation_file_fails_before_any_training(case, content, says, mode, cache, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    train_file = write_case(folder, _record(_image(folder, "good.png")))
    (folder / "val.jsonl").write_bytes(content)
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "data=jsonl", f"data.train_file={train_file}", f"data.val_file={folder / 'val.jsonl'}",
        f"data.on_bad_sample={mode}", "model.tiny.vision_pretrain_steps=50",  # stage 1 would run for a while
        f"model.tiny.cache_dir={tmp_path / 'fresh'}",
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    assert rc == 2 and says in last_error_line(out) and "Traceback" not in out
    assert not (tmp_path / "fresh").exists()  # stage 1 never started
    TABLE.append(
        (f"{case} in the validation file ({mode})", short(last_error_line(out), tmp_path), f"{seconds:.0f} s", "yes")
    )


# ---------------------------------------------------------------- kills and resumes
KILL_IN_SAVE = """
import os, runpy, signal, sys, torch
from idefics2_ft.training import checkpoints

step = int(os.environ["KILL_AT_SAVE_OF_STEP"])
real_save = torch.save
def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("global_step") == step:
        real_save({"half": torch.zeros(10)}, f)   # part of the file is on disk...
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)      # ...when the kill comes
    return real_save(obj, f, *a, **k)
checkpoints.torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RESUMABLE = ("trainer.max_steps=8", "trainer.checkpoint_every_n_steps=1", "peft.dropout=0.1", "eval.at_end=false")


@pytest.fixture(scope="module")
def uninterrupted(cache, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE))
    assert rc == 0, out[-2000:]
    return adapter(run_dir)


def test_a_kill_during_a_checkpoint_save_with_tmpdir_elsewhere(cache, tmp_path, uninterrupted):
    run_dir = tmp_path / "run"
    wrapper = tmp_path / "kill_in_save.py"
    wrapper.write_text(KILL_IN_SAVE)
    env = {"KILL_AT_SAVE_OF_STEP": "4", "TMPDIR": "/dev/shm"}  # a tmpfs: another filesystem than the run folder
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE), env=env, wrapper=str(wrapper))
    assert rc == -signal.SIGKILL
    checkpoints = run_dir / "checkpoints"
    kept = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert kept["global_step"] == 3  # the previous checkpoint, whole
    assert [p.name for p in checkpoints.iterdir() if ".tmp-" in p.name]  # the killed save's partial file
    rc, out, _ = run(*base_overrides(cache, run_dir, *RESUMABLE, "resume=true"), env={"TMPDIR": "/dev/shm"})
    assert rc == 0, out[-2000:]
    assert "partial checkpoint file" in out
    assert not [p for p in checkpoints.iterdir() if ".tmp-" in p.name]
    assert same(adapter(run_dir), uninterrupted)
    TABLE.append(
        (
            "kill -9 during a checkpoint save, $TMPDIR on tmpfs",
            "resume=true continues from the step before; the partial file is removed with a warning",
            "-",
            "yes (adapter equal to the uninterrupted run's)",
        )
    )


def test_kills_at_random_points_then_resume(cache, tmp_path, uninterrupted):
    rng = random.Random(11)
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE))
    kills = 0
    for _ in range(2):
        started = time.time()
        while proc.poll() is None and not (last.is_file() and last.stat().st_mtime > started):
            time.sleep(0.02)  # training under way: a checkpoint newer than this process's start
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            break  # it finished first
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += 1
        proc = train_py(*base_overrides(cache, run_dir, *RESUMABLE, "resume=true"))
    out, _ = proc.communicate(timeout=600)
    assert kills >= 1 and proc.returncode == 0, out[-2000:]
    assert same(adapter(run_dir), uninterrupted)
    seen = f"resume=true continues after each of {kills} kills; the adapter equals the uninterrupted run's"
    TABLE.append((f"kill -9 at random points ({kills} kills)", seen, "-", "yes"))


# ---------------------------------------------------------------- divergence, reuse
def test_a_diverging_run_stops_at_once_and_keeps_the_last_good_checkpoint(cache, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(
        cache, run_dir, "optim.lr=1e20", "optim.warmup_steps=0", "trainer.gradient_clip_val=null",
        "trainer.max_steps=20", "trainer.checkpoint_every_n_steps=1",
    )  # fmt: skip
    rc, out, seconds = run(*overrides)
    line = last_error_line(out)
    assert rc == 3 and "Training diverged" in line and "Traceback" not in out
    assert not (run_dir / "adapter").exists() and not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        state = torch.load(last, weights_only=False)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values())
    TABLE.append(
        (
            "divergence (lr 1e20)",
            short(line, tmp_path),
            f"{seconds:.0f} s",
            "yes (last good checkpoint kept, no NaN adapter)",
        )
    )


def test_reusing_a_finished_runs_folder_is_refused_untouched(cache, tmp_path):
    run_dir = tmp_path / "run"
    rc, out, _ = run(*base_overrides(cache, run_dir))
    assert rc == 0, out[-2000:]
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    rc, out, seconds = run(*base_overrides(cache, run_dir, "seed=3"))
    line = last_error_line(out)
    assert rc == 2 and "already holds a run" in line and "resume=true" in line and "overwrite=true" in line
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before
    TABLE.append(
        ("reusing a finished run's folder", short(line, tmp_path), f"{seconds:.0f} s", "yes (not a byte changed)")
    )
