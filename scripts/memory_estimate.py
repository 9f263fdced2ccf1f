"""Estimated memory per GPU for each strategy on idefics2-8b (real shapes on the meta device).

    python scripts/memory_estimate.py [peft.r=8] [peft.target=text+connector] [gpus=1,2,4,8]

Prints a Markdown table: weights, gradients and optimizer state per GPU, in GB. An estimate, not a
measurement: activations (batch and sequence dependent), the CUDA context and fragmentation come on top.
"""

import sys

from idefics2_ft.memory import inventory, per_gpu_gb
from idefics2_ft.models.reference import idefics2_8b_on_meta

STRATEGIES = (
    ("ddp", "one GPU / `strategy=ddp`"),
    ("fsdp", "`strategy=fsdp`"),
    ("deepspeed_zero2", "`strategy=deepspeed_zero2`"),
    ("deepspeed_zero2_offload", "`strategy=deepspeed_zero2_offload`"),
    ("deepspeed_zero3", "`strategy=deepspeed_zero3`"),
    ("deepspeed_zero3_offload", "`strategy=deepspeed_zero3_offload`"),
)
SKIP = ["model.vision_model", "model.connector", "lm_head"]


def main(argv: list[str]) -> int:
    args = dict(a.split("=", 1) for a in argv)
    r = int(args.pop("peft.r", 8))
    target = args.pop("peft.target", "text+connector")
    gpus = [int(g) for g in args.pop("gpus", "1,2,4,8").split(",")]
    if args:
        sys.stderr.write(f"unknown arguments: {', '.join(args)} (peft.r=, peft.target=, gpus=)\n")
        return 2
    inv = inventory(idefics2_8b_on_meta(), SKIP, target, r)
    print(
        f"idefics2-8b: {inv.quantizable / 1e9:.2f} B weights quantizable to NF4, "
        f"{inv.frozen_other / 1e9:.2f} B kept in bf16; LoRA r={r} on {target}: {inv.lora / 1e6:.1f} M weights.\n"
    )
    header = " | ".join(f"{g} GPU{'s' if g > 1 else ''}" for g in gpus)
    print(f"| strategy | base | {header} |")
    print("|---|---|" + "---|" * len(gpus))
    for four_bit, base in ((True, "NF4 (`peft=qlora`)"), (False, "bf16 (`peft=lora`)")):
        for key, label in STRATEGIES:
            cells = []
            for g in gpus:
                gb = per_gpu_gb(inv, key, g, four_bit)
                cells.append("refused" if gb is None else f"{gb:.1f}")
            print(f"| {label} | {base} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
