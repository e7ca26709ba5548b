"""Frozen-feature evaluation of a pre-trained backbone: features, linear probe, weighted k-NN, t-SNE, results table.

This module owns how a frozen backbone is measured, for `mimco-probe` (`commands/run_linear_probe.py`),
`scripts/demo.py` and `scripts/reproduce.py`:

- `extract_features`: CLS, mean-pooled or pooler features (`pool_features`) of a whole split, batched, under
  `torch.inference_mode`, through the evaluation transform at the backbone's own size and normalisation.
- `train_linear_probe` (MAE's protocol: `BatchNorm1d` without affine parameters, then `Linear`, trained on the cached
  features) and `knn_classify` (DINO's weighted k-NN: cosine similarity, the `k` nearest training images vote with
  weight `exp(sim / T)`); `evaluate_frozen_features` measures both on one set of features, `evaluate_backbone` on a
  backbone and a labelled train / eval split (`FrozenFeatureResult`).
- `plot_tsne`: a t-SNE of the test features, one panel per model; `results_table`: the Markdown table of results.

Backbones are loaded by `modeling_mimco.interop.model_folders.load_backbone`, accuracies computed with
`modeling_mimco.evaluation.metrics`; the fine-tuning recipe is in `modeling_mimco.evaluation.finetuning`. It imports torch, datasets and
tqdm (and, where they are used, transformers' scheduler, threadpoolctl, scikit-learn and matplotlib), and `data`,
`metrics` and `model_folders` of this package; the model files never import it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from modeling_mimco.data.decoding import DEFAULT_MAX_IMAGE_PIXELS
from modeling_mimco.data.pipeline import MimCoPretrainingCollator, PretrainingExampleTransform, apply_example_transform
from modeling_mimco.data.transforms import build_eval_transform
from modeling_mimco.evaluation.metrics import load_accuracy_metric
from modeling_mimco.interop.model_folders import Backbone


if TYPE_CHECKING:
    from modeling_mimco.data.sources import ClassificationData


logger = logging.getLogger(__name__)

FEATURE_POOLINGS = ("cls", "mean", "pooler")


# ---------------------------------------------------------------------------------------------------------------------
# features


def pool_features(outputs, pooling: str, num_prefix_tokens: int = 1) -> torch.Tensor:
    """One feature per image from a backbone's output.

    `"cls"`: the CLS token of `last_hidden_state`; `"mean"`: the mean of the patch tokens of `last_hidden_state`
    (prefix tokens skipped); `"pooler"`: the model's own `pooler_output` (for a MimCo model, the CLS token or the
    normalised patch mean that `config.pooling` selects).
    """
    if pooling == "cls":
        return outputs.last_hidden_state[:, 0]
    if pooling == "mean":
        return outputs.last_hidden_state[:, num_prefix_tokens:].mean(dim=1)
    if pooling == "pooler":
        pooled = getattr(outputs, "pooler_output", None)
        if pooled is None:
            raise ValueError("This backbone returns no `pooler_output`; use --pooling cls or mean.")
        return pooled.flatten(1)
    raise ValueError(f"`pooling` must be one of {FEATURE_POOLINGS}, got {pooling!r}.")


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    dataset: datasets.Dataset,
    image_column: str,
    label_column: str,
    pooling: str = "cls",
    batch_size: int = 128,
    crop_pct: float = 0.875,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "Extracting features",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `(N, D)` (float32, on the CPU) and labels `(N,)` of every readable image of `dataset`.

    Images go through the evaluation transform at the backbone's own size and normalisation
    (`data.build_eval_transform`); unreadable images, and images of more than `max_image_pixels` pixels (never
    decoded; `None` or 0: no limit), are skipped with a warning. A tqdm bar shows the progress.
    """
    if pooling not in FEATURE_POOLINGS:
        raise ValueError(f"`pooling` must be one of {FEATURE_POOLINGS}, got {pooling!r}.")
    untrained_pooler = [name for name in backbone.untrained_weights if name.startswith("pooler.")]
    if pooling == "pooler" and untrained_pooler:
        raise ValueError(
            f"--pooling pooler: the {backbone.source} has no trained pooler ({', '.join(untrained_pooler)} were not in "
            "the checkpoint), so its `pooler_output` would come from random weights. Use --pooling cls or mean."
        )
    transform = build_eval_transform(backbone.image_size, backbone.image_mean, backbone.image_std, crop_pct=crop_pct)
    example_transform = PretrainingExampleTransform(
        transform, image_column, label_column, max_image_pixels=max_image_pixels
    )
    prepared = apply_example_transform(dataset, example_transform)
    loader = DataLoader(
        prepared,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=MimCoPretrainingCollator(image_size=backbone.image_size),
    )
    model = backbone.model.to(device).eval()
    features, labels, skipped = [], [], 0
    for batch in tqdm(loader, desc=desc, unit="batch"):
        skipped += int(batch["num_skipped"])
        if batch["pixel_values"].shape[0] == 0:
            continue
        outputs = model(pixel_values=batch["pixel_values"].to(device))
        features.append(pool_features(outputs, pooling, backbone.num_prefix_tokens).float().cpu())
        labels.append(batch["labels"])
    if skipped:
        logger.warning("%d unreadable images were skipped.", skipped)
    if not features:
        raise ValueError("No readable image in the dataset.")
    return torch.cat(features), torch.cat(labels)


# ---------------------------------------------------------------------------------------------------------------------
# linear probe and k-NN


@contextlib.contextmanager
def limit_cpu_threads(num_threads: int | None = 1) -> Iterator[None]:
    """Runs the block with at most `num_threads` CPU threads in torch and in the OpenMP / BLAS pools (threadpoolctl),
    then restores the previous settings; `None` changes nothing.

    The probe's, the k-NN's and the t-SNE's operations are small: on a CPU shared with other processes, their thread
    synchronisation costs far more than the work (the t-SNE of a few hundred points took 30-40 s with two threads on
    a loaded 2-core machine and under 1.5 s with one).
    """
    if num_threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, min(num_threads, previous)))
    try:
        with threadpool_limits(limits=num_threads):
            yield
    finally:
        torch.set_num_threads(previous)


def build_linear_probe(feature_dim: int, num_classes: int) -> nn.Sequential:
    """MAE's linear-probe head: `BatchNorm1d` without affine parameters (it only standardises the features), then a
    `Linear` layer initialised with a truncated normal of std 0.01 and a zero bias."""
    linear = nn.Linear(feature_dim, num_classes)
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(feature_dim, affine=False, eps=1e-6), linear)


@dataclass
class LinearProbeConfig:
    """Training settings of the linear probe (on cached features, so epochs are cheap)."""

    epochs: int = 100
    batch_size: int = 256
    optimizer: str = "sgd"
    """`"sgd"` (momentum 0.9) or `"adamw"`."""
    learning_rate: float = 0.5
    weight_decay: float = 0.0
    warmup_epochs: int = 5
    seed: int = 0
    cpu_threads: int | None = 1
    """Threads used when training on a CPU (`limit_cpu_threads`); `None` keeps the process setting."""

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise ValueError(f"The linear probe's optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}.")
        if self.epochs <= 0 or self.batch_size <= 0 or self.learning_rate <= 0:
            raise ValueError("The linear probe needs positive epochs, batch size and learning rate.")


def train_linear_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    config: LinearProbeConfig | None = None,
    device: str | torch.device = "cpu",
) -> nn.Sequential:
    """Trains `build_linear_probe` on cached features with a warmup + cosine learning-rate schedule (the BatchNorm
    standardises each batch with its own statistics); returns it in eval mode, its BatchNorm set to the mean and
    variance of all training features."""
    from transformers import get_cosine_schedule_with_warmup

    config = config or LinearProbeConfig()
    generator = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        probe = build_linear_probe(features.shape[1], num_classes).to(device)
    features, labels = features.to(device), labels.to(device)
    num_examples = features.shape[0]
    batch_size = min(config.batch_size, num_examples)
    steps_per_epoch = max(num_examples // batch_size, 1)  # the last partial batch is dropped (BatchNorm needs > 1)
    total_steps = steps_per_epoch * config.epochs
    if config.optimizer == "sgd":
        optimizer = torch.optim.SGD(
            probe.parameters(), lr=config.learning_rate, momentum=0.9, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.AdamW(probe.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=min(config.warmup_epochs, config.epochs // 2) * steps_per_epoch,
        num_training_steps=total_steps,
    )
    probe.train()
    threads = limit_cpu_threads(config.cpu_threads) if features.device.type == "cpu" else contextlib.nullcontext()
    with threads:
        _fit(probe, features, labels, optimizer, scheduler, config.epochs, steps_per_epoch, batch_size, generator)
        # Evaluation standardises with the statistics of all training features, not a running average of a few
        # batches (which, after only a few steps, still remembers its initial mean 0 and variance 1).
        with torch.no_grad():
            probe[0].running_mean.copy_(features.mean(dim=0))
            probe[0].running_var.copy_(features.var(dim=0) if num_examples > 1 else torch.ones_like(features[0]))
    return probe.eval()


def _fit(probe, features, labels, optimizer, scheduler, epochs, steps_per_epoch, batch_size, generator) -> None:
    device, num_examples = features.device, features.shape[0]
    for _ in range(epochs):
        order = torch.randperm(num_examples, generator=generator).to(device)
        for step in range(steps_per_epoch):
            index = order[step * batch_size : (step + 1) * batch_size]
            loss = nn.functional.cross_entropy(probe(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()


@torch.no_grad()
def classifier_accuracy(probe: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of a trained probe, computed with `TopKAccuracy`."""
    device = next(probe.parameters()).device
    predictions = probe.eval()(features.to(device)).argmax(dim=-1).cpu()
    return load_accuracy_metric().compute(predictions=predictions.numpy(), references=labels.numpy())["accuracy"]


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    cpu_threads: int | None = 1,
) -> torch.Tensor:
    """DINO's weighted k-NN classifier; returns the predicted class of each test feature.

    Features are L2-normalised; each test feature finds its `k` most cosine-similar training features, and each of
    them votes for its class with weight `exp(similarity / temperature)`; the class with the largest total wins.
    """
    if k <= 0 or temperature <= 0:
        raise ValueError(f"k-NN needs k > 0 and temperature > 0, got k={k}, temperature={temperature}.")
    with limit_cpu_threads(cpu_threads):
        return _knn_votes(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size)


def _knn_votes(train_features, train_labels, test_features, num_classes, k, temperature, chunk_size) -> torch.Tensor:
    train = nn.functional.normalize(train_features.float(), dim=1)
    test = nn.functional.normalize(test_features.float(), dim=1)
    k = min(k, train.shape[0])
    predictions = []
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        votes = torch.zeros(similarity.shape[0], num_classes, dtype=weights.dtype)
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions.append(votes.argmax(dim=1))
    return torch.cat(predictions) if predictions else torch.zeros(0, dtype=torch.long)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of `knn_classify`, computed with `TopKAccuracy`."""
    predictions = knn_classify(train_features, train_labels, test_features, num_classes, k, temperature)
    return load_accuracy_metric().compute(predictions=predictions.numpy(), references=test_labels.numpy())["accuracy"]


@dataclass
class FrozenFeatureResult:
    """Results of one backbone; `to_json()` gives the record written to the results file."""

    name: str
    model_name_or_path: str
    source: str
    feature_dim: int
    pooling: str
    num_train_images: int
    num_test_images: int
    linear_probe_top1: float
    knn_top1: float
    test_features: torch.Tensor | None = field(default=None, repr=False)
    test_labels: torch.Tensor | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model_name_or_path": self.model_name_or_path,
            "source": self.source,
            "feature_dim": self.feature_dim,
            "pooling": self.pooling,
            "num_train_images": self.num_train_images,
            "num_test_images": self.num_test_images,
            "linear_probe_top1": self.linear_probe_top1,
            "knn_top1": self.knn_top1,
        }


def mean_pairwise_cosine(features: torch.Tensor) -> float:
    """Mean cosine similarity over all pairs of different rows of `features` `(N, D)`, `N >= 2`.

    Near 1 when every feature points the same way: after L2 normalisation, as an InfoNCE target is, nearly every
    image then gives the same vector. Near 0 when the features spread over the sphere.
    """
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"`features` must be (N, D) with N >= 2, got shape {tuple(features.shape)}.")
    unit = torch.nn.functional.normalize(features.double(), dim=1)
    summed = unit.sum(dim=0)
    # the sum of <u_i, u_j> over all ordered pairs is |sum u|^2; the N diagonal terms (|u_i|^2) are taken out
    diagonal = (unit * unit).sum()
    num_rows = features.shape[0]
    return float((summed @ summed - diagonal) / (num_rows * (num_rows - 1)))


def evaluate_frozen_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    probe_config: LinearProbeConfig | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Linear-probe and k-NN top-1 accuracy of one set of cached features."""
    probe = train_linear_probe(train_features, train_labels, num_classes, probe_config, device=device)
    return {
        "linear_probe_top1": classifier_accuracy(probe, test_features, test_labels),
        "knn_top1": knn_accuracy(
            train_features, train_labels, test_features, test_labels, num_classes, knn_k, knn_temperature
        ),
    }


def evaluate_backbone(
    backbone: Backbone,
    data: ClassificationData,
    name: str,
    model_name_or_path: str,
    pooling: str = "cls",
    probe_config: LinearProbeConfig | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    batch_size: int = 128,
    crop_pct: float = 0.875,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
) -> FrozenFeatureResult:
    """The frozen-feature results of one backbone: features of both splits of `data` (`extract_features`), then the
    linear probe and the k-NN on them (`evaluate_frozen_features`). The backbone is moved back to the CPU before the
    probe trains; the result keeps the test features and labels for the t-SNE."""
    common = dict(
        pooling=pooling,
        batch_size=batch_size,
        crop_pct=crop_pct,
        num_workers=num_workers,
        device=device,
        max_image_pixels=max_image_pixels,
    )
    train_features, train_labels = extract_features(
        backbone, data.train, data.image_column, data.label_column, desc=f"{name}: train features", **common
    )
    test_features, test_labels = extract_features(
        backbone, data.eval, data.image_column, data.label_column, desc=f"{name}: eval features", **common
    )
    backbone.model.cpu()
    scores = evaluate_frozen_features(
        train_features,
        train_labels,
        test_features,
        test_labels,
        data.num_labels,
        probe_config,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        device=device,
    )
    return FrozenFeatureResult(
        name=name,
        model_name_or_path=model_name_or_path,
        source=backbone.source,
        feature_dim=int(train_features.shape[1]),
        pooling=pooling,
        num_train_images=int(train_features.shape[0]),
        num_test_images=int(test_features.shape[0]),
        test_features=test_features,
        test_labels=test_labels,
        **scores,
    )


# ---------------------------------------------------------------------------------------------------------------------
# t-SNE picture


def tsne_embedding(
    features: torch.Tensor, seed: int = 0, perplexity: float = 30.0, cpu_threads: int | None = 1
) -> np.ndarray:
    """2-D t-SNE (scikit-learn, PCA initialisation) of `features`; the perplexity is capped for small sets. Runs on
    `cpu_threads` threads (`limit_cpu_threads`)."""
    from sklearn.manifold import TSNE

    values = features.float().numpy()
    perplexity = float(min(perplexity, max((len(values) - 1) / 3.0, 1.0)))
    with limit_cpu_threads(cpu_threads):
        return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(values)


def plot_tsne(
    panels: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    output_path: str,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
    seed: int = 0,
) -> str:
    """Writes a PNG with one t-SNE panel per `(title, features, labels)`, points coloured by class.

    At most `max_points` test images are drawn (the same seeded subset in every panel when the panels share their
    labels). Rendered with matplotlib's Agg canvas, so no display is needed. Returns `output_path`.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # a runtime dependency, but an environment may still lack it
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from error

    if not panels:
        raise ValueError("plot_tsne needs at least one panel.")
    columns = min(len(panels), 3)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 4.4 * rows + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    num_classes = int(max(int(labels.max()) for _, _, labels in panels if len(labels)) + 1)
    colormap = _class_colormap(num_classes)
    subsets: dict[int, np.ndarray] = {}  # one seeded subset per set size, shared by panels of the same images
    scatter = None
    for index, (title, features, labels) in enumerate(panels):
        axes = figure.add_subplot(rows, columns, index + 1)
        if len(features) > max_points:
            if len(features) not in subsets:
                rng = np.random.default_rng(seed)
                subsets[len(features)] = np.sort(rng.choice(len(features), size=max_points, replace=False))
            subset = torch.from_numpy(subsets[len(features)])
            features, labels = features[subset], labels[subset]
        points = tsne_embedding(features, seed=seed)
        scatter = axes.scatter(
            points[:, 0], points[:, 1], c=labels.numpy(), cmap=colormap, vmin=-0.5, vmax=num_classes - 0.5, s=6
        )
        axes.set_title(title, fontsize=10)
        axes.set_xticks([])
        axes.set_yticks([])
    if scatter is not None and num_classes <= 20:
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        handles = [
            _legend_marker(colormap(i / max(num_classes - 1, 1) if num_classes > 1 else 0.0), names[i])
            for i in range(num_classes)
        ]
        figure.legend(handles=handles, loc="outside lower center", ncols=min(num_classes, 10), fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    figure.savefig(output_path, dpi=120)
    return output_path


def _class_colormap(num_classes: int):
    from matplotlib import colormaps

    name = "tab10" if num_classes <= 10 else "tab20" if num_classes <= 20 else "turbo"
    return colormaps[name].resampled(max(num_classes, 1))


def _legend_marker(color, label: str):
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="o", linestyle="", markersize=5, color=color, label=label)


def results_table(
    results: Sequence[FrozenFeatureResult | dict], knn_k: int = 20, knn_temperature: float = 0.07
) -> str:
    """A plain-text / Markdown table of the frozen-feature results; `knn_k` and `knn_temperature` are the k-NN
    settings the results were measured with (`knn_classify`), named in the k-NN column's header."""
    rows = [result.to_json() if isinstance(result, FrozenFeatureResult) else result for result in results]
    header = (
        f"| model | linear probe top-1 | kNN top-1 (k={knn_k}, T={knn_temperature:g}) | feature dim | "
        "train / test images |"
    )
    lines = [header, "|---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['linear_probe_top1']:.1%} | {row['knn_top1']:.1%} | {row['feature_dim']} | "
            f"{row['num_train_images']} / {row['num_test_images']} |"
        )
    return "\n".join(lines)


__all__ = [
    "FEATURE_POOLINGS",
    "FrozenFeatureResult",
    "LinearProbeConfig",
    "build_linear_probe",
    "classifier_accuracy",
    "evaluate_backbone",
    "evaluate_frozen_features",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "limit_cpu_threads",
    "mean_pairwise_cosine",
    "plot_tsne",
    "pool_features",
    "results_table",
    "train_linear_probe",
    "tsne_embedding",
]
