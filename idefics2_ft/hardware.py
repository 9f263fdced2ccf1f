"""GPUs as the planner and the throughput line know them: memory, peak FLOP/s, what a device has free."""

from __future__ import annotations

GB = 1e9

# GPUs: memory (GB) and dense bf16 tensor-core peak (TFLOP/s) from the vendors' data sheets.
GPUS = {
    "A100-40": (40, 312),
    "A100-80": (80, 312),
    "H100": (80, 989),
    "L4": (24, 121),
    "RTX 4090": (24, 165),
    "RTX 3090": (24, 71),
}


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU named as ``torch.cuda.get_device_name`` names it (None if unknown)."""
    for name, (_, tflops) in GPUS.items():
        if name.split("-")[0].replace("RTX ", "") in device_name:  # "NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090"
            return tflops
    return None


def available_gb(device: str) -> float | None:
    """What this machine offers a run: the GPU's memory, or the memory Linux says is available."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return None
