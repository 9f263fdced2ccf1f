"""The Hugging Face Hub: pushing (``push``) and, without a network, the cache check (``offline``)."""

from idefics2_ft.hub.offline import MODEL_PATTERNS, Need, cached_dataset, cached_model, needs, preflight
from idefics2_ft.hub.push import HubError, check_write_access, push_folder, push_targets

__all__ = [
    "MODEL_PATTERNS",
    "HubError",
    "Need",
    "cached_dataset",
    "cached_model",
    "check_write_access",
    "needs",
    "preflight",
    "push_folder",
    "push_targets",
]
