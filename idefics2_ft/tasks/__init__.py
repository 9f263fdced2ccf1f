"""Tasks: what a command does, built from the components. ``train(cfg) -> metrics`` fine-tunes;
``evaluate`` answers a split with a finished run; ``export_run`` merges, checks and pushes;
``answer`` answers one question; ``prefetch`` fills the Hub cache for an offline node."""

from idefics2_ft.tasks.evaluate import answer, evaluate, load_run
from idefics2_ft.tasks.export import export_run
from idefics2_ft.tasks.train import train

__all__ = ["answer", "evaluate", "export_run", "load_run", "train"]
