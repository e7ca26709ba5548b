"""Top-k classification accuracy that needs no network: the metric of fine-tuning and of frozen-feature evaluation.

This module owns `TopKAccuracy`, an `evaluate.Metric` defined here so that no metric script is fetched from the Hub
(`evaluate.load("accuracy")` needs the network or a cached copy), `load_accuracy_metric` (one kept in memory),
and the `Trainer` hooks built on it: `top_k_predictions` (`preprocess_logits_for_metrics`: keep the `k` best classes)
and `ClassificationMetrics` (`compute_metrics`: top-1, and top-5 with at least 5 classes, `reported_top_k`). It
imports numpy, torch, datasets and evaluate, nothing else of the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import datasets
import evaluate
import numpy as np
import torch


class TopKAccuracy(evaluate.Metric):
    """Top-1 and top-k accuracy, as an `evaluate` metric that works with no network.

    Inputs: `predictions`, either one predicted class per example or, per example, the classes ranked best first (at
    least `max(top_k)` of them, e.g. `logits.topk(k).indices`); `references`, the true class of each example.

    `compute(..., top_k=(1, 5))` returns `{"accuracy": top-1, "top5_accuracy": top-5}` (top-1 is always reported as
    `"accuracy"`, as in the Hub's `accuracy` metric; every other k as `"top{k}_accuracy"`).

    Instantiate it directly (`TopKAccuracy()`); nothing is downloaded. `keep_in_memory=True` (the default of
    `load_accuracy_metric`) keeps `add_batch` results out of the `evaluate` cache folder.
    """

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description="Fraction of examples whose true class is among the k best-ranked predicted classes.",
            citation="",
            inputs_description=(
                "predictions: ranked class indices per example (or one class index); references: the true class "
                "index per example; top_k: the values of k to report."
            ),
            features=[
                datasets.Features(
                    {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
                ),
                datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
            ],
        )

    def _compute(self, predictions, references, top_k: Sequence[int] = (1,)) -> dict[str, float]:
        ranked = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if ranked.ndim == 1:
            ranked = ranked[:, None]
        results = {}
        for k in top_k:
            if k < 1 or k > ranked.shape[1]:
                raise ValueError(
                    f"top_k={k} needs at least {k} ranked predictions per example, got {ranked.shape[1]}."
                )
            hits = (ranked[:, :k] == references[:, None]).any(axis=1)
            results["accuracy" if k == 1 else f"top{k}_accuracy"] = float(hits.mean()) if len(hits) else 0.0
        return results


def load_accuracy_metric(**kwargs) -> TopKAccuracy:
    """A `TopKAccuracy` metric kept in memory (no cache files, no network)."""
    kwargs.setdefault("keep_in_memory", True)
    return TopKAccuracy(**kwargs)


def reported_top_k(num_labels: int) -> tuple[int, ...]:
    """Top-1 always, and top-5 when there are at least 5 classes."""
    return (1, 5) if num_labels >= 5 else (1,)


def top_k_predictions(logits: torch.Tensor | tuple, labels: torch.Tensor | None = None, k: int = 5) -> torch.Tensor:
    """`preprocess_logits_for_metrics` for the Trainer: keeps only the `k` best classes per example, best first.

    The Trainer then gathers `(N, k)` class indices instead of `(N, num_labels)` logits.
    """
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    return logits.topk(min(k, logits.shape[-1]), dim=-1).indices


class ClassificationMetrics:
    """`compute_metrics` for the Trainer: top-1 (and top-5 with at least 5 classes) accuracy via `TopKAccuracy`.

    Expects the predictions that `top_k_predictions` leaves (ranked class indices); plain logits work too.
    """

    def __init__(self, num_labels: int):
        self.top_k = reported_top_k(num_labels)
        self.metric = load_accuracy_metric()

    def __call__(self, eval_prediction) -> dict[str, float]:
        predictions = np.asarray(eval_prediction.predictions)
        references = np.asarray(eval_prediction.label_ids)
        if predictions.dtype.kind == "f":  # logits: rank them here
            predictions = np.argsort(-predictions, axis=-1)[:, : max(self.top_k)]
        return self.metric.compute(predictions=predictions, references=references, top_k=self.top_k)


__all__ = ["ClassificationMetrics", "TopKAccuracy", "load_accuracy_metric", "reported_top_k", "top_k_predictions"]
