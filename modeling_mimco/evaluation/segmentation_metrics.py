"""Semantic-segmentation metrics that need no network: mean IoU, mean accuracy, pixel accuracy, per-class IoU.

`MeanIoU` is an `evaluate.Metric` defined here with the inputs, arguments and outputs of the Hub's `mean_iou` metric
(`evaluate.load("mean_iou")` fetches a script from the Hub, which is not always reachable); `tests/test_segmentation.py`
compares the two when the Hub's script is in the local cache. Both are computed from one confusion matrix
(`confusion_matrix`, `scores_from_confusion`), which `SegmentationMetrics`, the `Trainer`'s `compute_metrics`, fills
batch by batch (`batch_eval_metrics`), so an evaluation never holds every predicted mask at once.
Imports numpy, torch, datasets and evaluate, nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch
from torch import nn


def confusion_matrix(
    predictions: np.ndarray | Sequence, references: np.ndarray | Sequence, num_labels: int, ignore_index: int = 255
) -> np.ndarray:
    """`(num_labels + 1, num_labels + 1)` int64 counts, rows the true class, columns the predicted one; the last row
    and column count the values outside `0..num_labels-1` (other than the ignore index).

    Pixels labelled `ignore_index` are left out. The extra row and column keep the Hub metric's areas exact: a
    labelled pixel predicted as no class still counts in its class's label area, and a prediction on a pixel whose
    label is no class still counts in the predicted class's area."""
    predictions = np.asarray(predictions, dtype=np.int64).ravel()
    references = np.asarray(references, dtype=np.int64).ravel()
    keep = references != ignore_index
    predictions, references = predictions[keep], references[keep]
    outside = num_labels
    predictions = np.where((predictions >= 0) & (predictions < num_labels), predictions, outside)
    references = np.where((references >= 0) & (references < num_labels), references, outside)
    size = num_labels + 1
    return np.bincount(references * size + predictions, minlength=size * size).reshape(size, size)


def scores_from_confusion(confusion: np.ndarray, nan_to_num: float | None = None) -> dict:
    """`mean_iou`, `mean_accuracy`, `overall_accuracy`, `per_category_iou`, `per_category_accuracy` of a
    `confusion_matrix`, as the Hub's `mean_iou` reports them: a class with no pixels in the labels nor the
    predictions has NaN IoU (one absent from the labels NaN accuracy); the means skip NaNs; `nan_to_num` then
    replaces any NaN left, in the per-class arrays and the means alike."""
    confusion = np.asarray(confusion, dtype=np.float64)
    num_labels = confusion.shape[0] - 1
    intersection = np.diag(confusion)[:num_labels]
    area_label = confusion[:num_labels].sum(axis=1)
    area_prediction = confusion[:, :num_labels].sum(axis=0)
    union = area_label + area_prediction - intersection
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = intersection / union
        accuracy = intersection / area_label
        overall = intersection.sum() / area_label.sum()
    with np.errstate(invalid="ignore"):
        mean_iou = float(np.nanmean(iou)) if not np.all(np.isnan(iou)) else float("nan")
        mean_accuracy = float(np.nanmean(accuracy)) if not np.all(np.isnan(accuracy)) else float("nan")
    scores = {
        "mean_iou": mean_iou,
        "mean_accuracy": mean_accuracy,
        "overall_accuracy": float(overall),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }
    if nan_to_num is not None:
        scores = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in scores.items()}
        scores.update({key: float(scores[key]) for key in ("mean_iou", "mean_accuracy", "overall_accuracy")})
    return scores


def _reduce(labels: np.ndarray) -> np.ndarray:
    reduced = labels - 1
    reduced[(labels == 0) | (labels == 255)] = 255
    return reduced


class MeanIoU(evaluate.Metric):
    """Mean intersection-over-union, as an `evaluate` metric that works with no network.

    `compute(predictions=[masks], references=[masks], num_labels=N, ignore_index=255, nan_to_num=None,
    label_map=None, reduce_labels=False)`, each mask an integer array `(H, W)`, returns `mean_iou`, `mean_accuracy`,
    `overall_accuracy`, `per_category_iou` and `per_category_accuracy` (arrays of N). `label_map` renames label
    values first; `reduce_labels` makes label 0 the ignore index and lowers the others by one (ADE20K).
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Intersection over union per class and its mean, from predicted and true label masks.",
            citation="",
            inputs_description="predictions, references: integer label masks (H, W); num_labels; ignore_index.",
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("int64"))),
                }
            ),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int = 255,
        nan_to_num: float | None = None,
        label_map: dict[int, int] | None = None,
        reduce_labels: bool = False,
    ) -> dict:
        confusion = np.zeros((num_labels + 1, num_labels + 1), dtype=np.int64)
        for prediction, reference in zip(predictions, references):
            reference = np.array(reference, dtype=np.int64)
            if label_map:
                original = reference.copy()
                for old, new in label_map.items():
                    reference[original == old] = new
            if reduce_labels:
                reference = _reduce(reference)
            confusion += confusion_matrix(prediction, reference, num_labels, ignore_index)
        return scores_from_confusion(confusion, nan_to_num)


def load_mean_iou_metric(**kwargs) -> MeanIoU:
    """A `MeanIoU` metric kept in memory (no cache files, no network)."""
    kwargs.setdefault("keep_in_memory", True)
    return MeanIoU(**kwargs)


def upsampled_predictions(logits: torch.Tensor | tuple, labels: torch.Tensor) -> torch.Tensor:
    """`preprocess_logits_for_metrics`: the logits `(B, C, h, w)` resized bilinearly to the labels' `(H, W)`, then
    the best class per pixel `(B, H, W)`; the Trainer then gathers masks instead of logits."""
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = nn.functional.interpolate(logits.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


class SegmentationMetrics:
    """`compute_metrics` for the Trainer: mean IoU, mean accuracy, pixel accuracy and one `iou_<class>` per class.

    Works per batch (`batch_eval_metrics=True`: the confusion matrix accumulates until `compute_result`) or on the
    whole evaluation set at once. Expects the predicted masks of `upsampled_predictions`; logits work too.
    """

    def __init__(self, id2label: dict[int, str], ignore_index: int = 255):
        self.id2label = id2label
        self.num_labels = len(id2label)
        self.ignore_index = ignore_index
        self.confusion = np.zeros((self.num_labels + 1, self.num_labels + 1), dtype=np.int64)

    def __call__(self, eval_prediction, compute_result: bool = True) -> dict[str, float]:
        predictions, references = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, torch.Tensor):
            predictions, references = predictions.cpu().numpy(), references.cpu().numpy()
        predictions, references = np.asarray(predictions), np.asarray(references)
        if predictions.ndim == references.ndim + 1:  # logits
            predictions = upsampled_predictions(torch.from_numpy(predictions), torch.from_numpy(references)).numpy()
        self.confusion += confusion_matrix(predictions, references, self.num_labels, self.ignore_index)
        if not compute_result:
            return {}
        scores = scores_from_confusion(self.confusion)
        self.confusion = np.zeros_like(self.confusion)
        metrics = {key: scores[key] for key in ("mean_iou", "mean_accuracy", "overall_accuracy")}
        for index, value in enumerate(scores["per_category_iou"]):
            metrics[f"iou_{self.id2label[index]}"] = float(value)
        return metrics


__all__ = [
    "MeanIoU",
    "SegmentationMetrics",
    "confusion_matrix",
    "load_mean_iou_metric",
    "scores_from_confusion",
    "upsampled_predictions",
]
