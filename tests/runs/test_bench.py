"""The benchmarks run (a few steps each) so that they cannot rot; their numbers are measured by make bench
and make bench-mixed."""

import re
import subprocess
import sys

import pytest

from tests.helpers import ROOT


def bench(tmp_path, script: str, *args: str) -> str:
    out = tmp_path / "bench.md"
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "benchmarks" / script),
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert out.read_text() in run.stdout
    return out.read_text()


def rate(table: str, row: str) -> float:
    line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
    return float(line.split("|")[2].split("/")[1])  # the median samples/s


def test_four_loops_name_the_loop_overhead_and_the_user_visible_ratio_and_the_8b_worth(tmp_path):
    table = bench(tmp_path, "loops.py", "--steps", "3")
    losses = {}
    for loop in ("ours", "bare, same work", "bare, full head", "HF Trainer"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {loop} |"))
        losses[loop] = float(line.split("|")[3])
        assert float(line.split("|")[4].split("/")[1]) > 0  # the median samples/s
    # the same model, batch and objective: the four first-step losses agree (ours and the bare loop through
    # the head where learned, the other two through transformers' full head and loss)
    assert all(loss == pytest.approx(losses["ours"], rel=1e-5) for loss in losses.values()), losses
    ratios = re.search(
        r"loop overhead \(ours / bare, same work\) = ([\d.]+); user-visible \(ours / HF Trainer\) = ([\d.]+)", table
    )
    assert ratios and float(ratios[1]) > 0 and float(ratios[2]) > 0
    for label in ("loop overhead: ours / bare, same work", "user-visible: ours / HF Trainer"):
        assert f"| {label} |" in table
    # at the 8B's shapes (the planner): the head where learned holds a smaller share of the FLOPs and less memory
    rows = [line for line in table.splitlines() if line.startswith("| the plan's DocVQA sample")]
    assert len(rows) == 1
    cells = [cell.strip() for cell in rows[0].split("|")[1:-1]]
    share_full, share_learned = (float(x.rstrip("%")) for x in cells[3].split(" / "))
    logits_full, logits_learned = (float(x.split()[0].replace(",", "")) for x in cells[5].split(" / "))
    assert 0 < share_learned < share_full < 5 and 0 < logits_learned < logits_full


def test_mixed_pages_compare_group_by_with_hf_group_by_length(tmp_path):
    table = bench(
        tmp_path, "mixed_pages.py", "--steps", "2", "--n-train", "32", "--batch-size", "4", "--longest-edge", "64"
    )
    rows = ("group_by=none", "group_by=length", "group_by=aspect", "HF Trainer, group_by_length")
    for row in rows:
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        pad, pixel_pad = (float(x.strip().rstrip("%")) for x in line.split("|")[4:6])
        assert rate(table, row) > 0 and 0 <= pad < 100 and 0 <= pixel_pad < 100
    assert "group_by=aspect / HF group_by_length" in table


def test_a_three_format_mixture_against_one_source_and_the_shapes_of_a_large_mixture(tmp_path):
    table = bench(
        tmp_path, "mixture.py", "--steps", "2", "--n-train", "30", "--batch-size", "4", "--longest-edge", "64",
        "--shape-rows", "300",
    )  # fmt: skip
    assert rate(table, "one source (JSONL)") > 0
    assert rate(table, "three sources (JSONL, LLaVA JSON, TRL parquet)") > 0
    assert "three sources / one source = " in table
    assert re.search(r"record_shapes over a 300-row mixture .*: [\d.]+ s", table)


def test_our_dpo_against_trls_sends_each_picture_through_the_vision_tower_once_per_pair(tmp_path):
    pytest.importorskip("trl")  # the peer, in the test-only `oracle` extra (make test-min has none)
    table = bench(tmp_path, "dpo.py", "--shapes", "tiny", "--steps", "1")
    cells = {}
    for row in ("ours DPO", "TRL DPO", "ours SFT (chosen answers)"):
        line = next(line for line in table.splitlines() if line.startswith(f"| {row} |"))
        cells[row] = [cell.strip() for cell in line.split("|")[2:7]]
        assert rate(table, row) > 0 and float(cells[row][1]) > 0 and float(cells[row][2]) > 0  # pairs/s, CPU, GB
    # ours: the prompt's picture once per pair; TRL 1.16: chosen and rejected, policy and reference
    assert float(cells["ours DPO"][4]) == 1 and float(cells["TRL DPO"][4]) == 4
    assert float(cells["ours SFT (chosen answers)"][4]) == 1
    assert re.search(r"ours/TRL pairs/s = [\d.]+, ours/TRL peak = [\d.]+, DPO/SFT step time = [\d.]+", table)
