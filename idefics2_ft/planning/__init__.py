"""Will a run fit, and how long will a step take? Memory and time per step from the real shapes.

``shapes`` (the batch and the setup), ``weights`` (parameters by role, per strategy),
``activations`` (what autograd saves, layer by layer), ``verdict`` (the plan, its peak and the
cheapest change that fits), ``tables`` (Markdown), ``profiling`` (measured phases: ``phases.json``).
The method and its check against measured peaks are in ``docs/memory.md``.
"""

from idefics2_ft.planning.profiling import Phases
from idefics2_ft.planning.shapes import Setup, Workload, setup_from_cfg, workload_from_batch, workload_from_cfg
from idefics2_ft.planning.tables import format_parts, format_plan
from idefics2_ft.planning.verdict import Plan, plan_run
from idefics2_ft.planning.weights import inventory, per_gpu_gb

__all__ = [
    "Phases",
    "Plan",
    "Setup",
    "Workload",
    "format_parts",
    "format_plan",
    "inventory",
    "per_gpu_gb",
    "plan_run",
    "setup_from_cfg",
    "workload_from_batch",
    "workload_from_cfg",
]
