"""Evaluation: confusion matrix and mIoU, sliding-window / flip / multi-scale inference.

::

    from cps_fast.eval import ConfusionMatrix, evaluate, sliding_window_inference
    metrics = evaluate(model_fn, open_dataset("voc", root, "val"), 21, crop_size=512)
    print(metrics["miou"], metrics.table(class_names))
"""
from .inference import DEFAULT_MEAN, DEFAULT_STD, evaluate, predict, sliding_window_inference
from .metrics import ConfusionMatrix, SegMetrics

__all__ = [
    "ConfusionMatrix",
    "DEFAULT_MEAN",
    "DEFAULT_STD",
    "SegMetrics",
    "evaluate",
    "predict",
    "sliding_window_inference",
]
