"""A plan as Markdown: the model by part, every term, the verdict, the time per step."""

from __future__ import annotations

from idefics2_ft.hardware import GB
from idefics2_ft.planning.verdict import MFU, Plan


def format_parts(plan: Plan) -> str:
    lines = ["| part | parameters | stored as | GB |", "|---|---|---|---|"]
    for row in plan.parts:
        lines.append(f"| {row['part']} | {row['params'] / 1e6:,.1f} M | {row['storage']} | {row['bytes'] / GB:.2f} |")
    return "\n".join(lines)


def format_plan(plan: Plan) -> str:
    """The plan as a Markdown report: the parts, the terms, the verdict, the time per step."""
    w, s = plan.workload, plan.setup
    rows = f"{w.batch} sample(s)" if w.rows_per_sample == 1 else f"{w.samples} pair(s), {w.batch} text rows"
    reference = f", the reference's pass ({s.reference}) without grad" if s.reference else ""
    lines = [
        f"Batch: {rows} x {w.seq_len} tokens, {w.images} image(s) of {w.patches} patches{reference}; "
        f"{s.device}, {'NF4 ' if s.quantize else ''}{s.method} r={s.r} on {s.target}, checkpointing "
        f"{'on' if s.checkpointing else 'off'}, attention {s.attn}, {s.optimizer}, {s.strategy} x {s.gpus}",
        "",
        format_parts(plan),
        "",
        "| term | GB |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.2f} |" for k, v in plan.rows.items()]
    lines.append(f"| **total at the peak ({plan.peak_at})** | **{plan.total_gb:.2f}** |")
    lines += [f"| ({k}: not at the peak) | ({v:.2f}) |" for k, v in plan.off_peak.items()]
    if plan.verdict:
        lines += ["", f"Verdict: {plan.verdict}" + (f"; cheapest change: {plan.fix}" if plan.fix else "")]
    times = ", ".join(f"{name} {sec:.1f} s" for name, sec in plan.times.items())
    lines += ["", f"Time per optimizer step at {MFU:.0%} MFU ({plan.flops / 1e12:.1f} TFLOP): {times}"]
    return "\n".join(lines)
