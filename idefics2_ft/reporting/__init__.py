"""What a person reads of a run: ``report.html`` (page), the gallery of answers, and what W&B and
TensorBoard are given besides the metrics (trackers)."""

from idefics2_ft.reporting.gallery import gallery_items, pick_gallery
from idefics2_ft.reporting.page import evaluation_report, metric_table, training_report
from idefics2_ft.reporting.trackers import TrackerRecord

__all__ = ["TrackerRecord", "evaluation_report", "gallery_items", "metric_table", "pick_gallery", "training_report"]
