"""Tasks: what a command does, built from the components. ``train.train(cfg) -> metrics``
fine-tunes; ``evaluate`` answers a split with a finished run (and one question: ``answer``);
``export.export_run`` merges, checks and pushes. Each is imported from its own module
(``from idefics2_ft.tasks.train import train``), or from the top level (``from idefics2_ft import train``)."""
