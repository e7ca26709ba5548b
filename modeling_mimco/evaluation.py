"""Measuring a pre-trained backbone: the pieces of the fine-tuning recipe and the frozen-feature evaluation.

Used by `scripts/run_finetuning.py`, `scripts/run_linear_probe.py` and `scripts/demo.py`; the model files never import
this module.

Fine-tuning (with `transformers.Trainer`):

- `layer_decay_parameter_groups`: AdamW parameter groups with layer-wise learning-rate decay (BEiT / MAE): block `i`
  (counted from 1) of `L` gets `learning_rate * layer_decay ** (L + 1 - i)`, the embeddings (layer 0) the lowest rate,
  everything after the last block (final norm, pooler norm, classifier) the full rate. Norms, biases, the CLS / mask /
  register tokens and the position embeddings get no weight decay.
- `FineTuningTrainer`: a `Trainer` whose optimizer hook (`create_optimizer`) uses those groups and whose
  `training_step` applies MixUp / CutMix (`build_batch_mixer`) to the training batches only.
- `SoftTargetCrossEntropy`: the loss for `compute_loss_func`: cross-entropy against hard or mixed (soft) targets with
  label smoothing.
- `TopKAccuracy`: an `evaluate.Metric` for top-1 / top-k accuracy, defined here so that no metric script has to be
  fetched from the Hub (`evaluate.load("accuracy")` needs the network or a cached copy); `ClassificationMetrics` wraps it
  as the Trainer's `compute_metrics`, `top_k_predictions` as its `preprocess_logits_for_metrics`.

Frozen features:

- `load_classification_splits`: a labelled train split and an evaluation split (`validation`, else `test`, else a
  seeded stratified split of train).
- `load_backbone`: any MimCo checkpoint, a stage-1 output, any `AutoModel` vision backbone, or `"random-init"`.
- `extract_features`: CLS, mean-pooled or pooler features of a whole split, batched, under `torch.inference_mode`.
- `train_linear_probe` (MAE's protocol: `BatchNorm1d` without affine parameters, then `Linear`) and `knn_classify`
  (DINO's weighted k-NN: cosine similarity, the `k` nearest training images vote with weight `exp(sim / T)`).
- `plot_tsne`: a t-SNE of the test features, one panel per model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import datasets
import evaluate
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2
from tqdm.auto import tqdm
from transformers import Trainer
from transformers.modeling_outputs import BaseModelOutput

from .data import (
    MimCoPretrainingCollator,
    PretrainingExampleTransform,
    apply_example_transform,
    build_eval_transform,
    disable_image_decoding,
    load_image_dataset,
    resolve_image_column,
    resolve_label_column,
)
from .training import NO_WEIGHT_DECAY_NAMES, preset_backbone_kwargs


logger = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
"""The `--model_name_or_path` value that stands for an untrained `MimCoModel`."""
PIXELS = "pixels"
"""The `--model_name_or_path` value that stands for the normalised pixels: the baseline every feature must beat."""

FEATURE_POOLINGS = ("cls", "mean", "pooler")


# ---------------------------------------------------------------------------------------------------------------------
# metric


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


# ---------------------------------------------------------------------------------------------------------------------
# fine-tuning recipe

_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|blocks)\.(\d+)\.")
_EMBEDDING_NAMES = ("embeddings", "patch_embed", "pos_embed", "cls_token", "mask_token", "register_tokens")
_EXTRA_NO_WEIGHT_DECAY_NAMES = ("pos_embed", "register_tokens", "distillation_token")


def num_transformer_layers(model: nn.Module) -> int:
    """The number of transformer blocks: `config.num_hidden_layers`, else counted from the parameter names."""
    config = getattr(model, "config", None)
    num_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(num_layers, int) and num_layers > 0:
        return num_layers
    indices = [int(match.group(1)) for name, _ in model.named_parameters() if (match := _BLOCK_INDEX.search(name))]
    if not indices:
        raise ValueError(f"Cannot find the transformer blocks of {type(model).__name__} for layer-wise decay.")
    return max(indices) + 1


def parameter_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a parameter for layer-wise decay: 0 for the embeddings (patch projection, CLS / mask / register
    tokens, position embeddings), `i + 1` for block `i`, and `num_layers + 1` for everything after the last block (the
    final norm, the pooler norm, the classifier)."""
    match = _BLOCK_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(token in name for token in _EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def exclude_from_weight_decay(name: str, parameter: torch.Tensor) -> bool:
    """Norms and biases (every parameter of at most one dimension), tokens and position embeddings."""
    return parameter.ndim <= 1 or any(
        token in name for token in (*NO_WEIGHT_DECAY_NAMES, *_EXTRA_NO_WEIGHT_DECAY_NAMES)
    )


def layer_decay_parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    layer_decay: float = 0.65,
    num_layers: int | None = None,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups with layer-wise learning-rate decay.

    Every trainable parameter goes into the group of its layer id (`parameter_layer_id`) and its weight-decay kind.
    With `L = num_layers`, a parameter of layer id `j` gets `lr = learning_rate * layer_decay ** (L + 1 - j)`, so
    block `i` (id `i + 1`) gets `learning_rate * layer_decay ** (L - i)`, the embeddings `learning_rate *
    layer_decay ** (L + 1)` and the head `learning_rate`. `layer_decay=1` gives every parameter `learning_rate`.

    Each group also records `"layer_id"` and `"lr_scale"`; learning-rate schedulers scale every group's `lr` by the
    same factor, so the ratios hold throughout training.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"`layer_decay` must lie in (0, 1], got {layer_decay}.")
    if num_layers is None:
        num_layers = num_transformer_layers(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        layer_id = parameter_layer_id(name, num_layers)
        no_decay = exclude_from_weight_decay(name, parameter)
        key = (layer_id, no_decay)
        if key not in groups:
            scale = layer_decay ** (num_layers + 1 - layer_id)
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": learning_rate * scale,
                "weight_decay": 0.0 if no_decay else weight_decay,
                "layer_id": layer_id,
                "lr_scale": scale,
            }
        groups[key]["params"].append(parameter)
        groups[key]["param_names"].append(name)
    return [groups[key] for key in sorted(groups)]


class SoftTargetCrossEntropy:
    """The fine-tuning loss, as the Trainer's `compute_loss_func(outputs, labels, num_items_in_batch)`.

    `labels` are class indices `(B,)` (entries of -100 are ignored) or, after MixUp / CutMix, class probabilities
    `(B, C)`. Targets are smoothed to `(1 - label_smoothing) * target + label_smoothing / C` and the loss is
    `-sum(target * log_softmax(logits))`, summed over the examples and divided by `num_items_in_batch` when the
    Trainer gives it (gradient accumulation), else averaged.
    """

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"`label_smoothing` must lie in [0, 1), got {label_smoothing}.")
        self.label_smoothing = label_smoothing

    def __call__(self, outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        logits = logits.float()
        num_classes = logits.shape[-1]
        if labels.dtype.is_floating_point:
            if labels.shape != logits.shape:
                raise ValueError(
                    f"Soft labels of shape {tuple(labels.shape)} do not match logits {tuple(logits.shape)}."
                )
            targets, valid = labels.float(), torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
        else:
            valid = labels != -100
            targets = nn.functional.one_hot(labels.clamp(min=0), num_classes).float()
        if self.label_smoothing > 0:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / num_classes
        per_example = -(targets * nn.functional.log_softmax(logits, dim=-1)).sum(dim=-1)
        per_example = per_example * valid
        if num_items_in_batch is not None:
            return per_example.sum() / num_items_in_batch
        return per_example.sum() / valid.sum().clamp(min=1)


def build_batch_mixer(
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """MixUp / CutMix of a training batch with `torchvision.transforms.v2`, or `None` when both alphas are 0.

    With both enabled, each batch gets CutMix with probability `switch_prob`, else MixUp; the whole step happens with
    probability `prob`. The returned callable maps `(pixel_values, labels)` with integer labels `(B,)` to mixed images
    and soft labels `(B, num_classes)` (integer labels when the step is skipped).
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"MixUp / CutMix alphas must be >= 0, got {mixup_alpha} and {cutmix_alpha}.")
    if not 0.0 <= prob <= 1.0 or not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"Probabilities must lie in [0, 1], got prob={prob}, switch_prob={switch_prob}.")
    mixers = []
    if mixup_alpha > 0:
        mixers.append((v2.MixUp(alpha=mixup_alpha, num_classes=num_classes), 1.0 - switch_prob))
    if cutmix_alpha > 0:
        mixers.append((v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes), switch_prob))
    if not mixers or prob == 0:
        return None
    if len(mixers) == 1:
        mixer = mixers[0][0]
    else:
        mixer = v2.RandomChoice([m for m, _ in mixers], p=[p for _, p in mixers])
    return mixer if prob >= 1.0 else v2.RandomApply([mixer], p=prob)


class FineTuningTrainer(Trainer):
    """`transformers.Trainer` with the fine-tuning recipe's optimizer groups and batch mixing.

    Args:
        layer_decay: Layer-wise learning-rate decay (`layer_decay_parameter_groups`); 1.0 disables the decay but keeps
            the recipe's weight-decay exclusions.
        batch_mixer: Applied to `(pixel_values, labels)` of every training batch (`build_batch_mixer`); evaluation
            batches are never mixed. Pair it with `compute_loss_func=SoftTargetCrossEntropy(...)`.

    The optimizer class and its other settings (`--optim`, betas, epsilon) still come from `TrainingArguments`.
    """

    def __init__(self, *args, layer_decay: float = 0.65, batch_mixer: Callable | None = None, **kwargs):
        self.layer_decay = layer_decay
        self.batch_mixer = batch_mixer
        super().__init__(*args, **kwargs)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs = dict(optimizer_kwargs)
        if any(key in optimizer_kwargs for key in ("params", "model", "optimizer_dict")):
            raise ValueError(f"--optim {self.args.optim} builds its own parameter groups; it cannot use layer decay.")
        groups = layer_decay_parameter_groups(
            opt_model, self.args.learning_rate, self.args.weight_decay, self.layer_decay
        )
        for group in groups:
            group.pop("param_names")
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.batch_mixer is not None and inputs.get("labels") is not None and len(inputs["labels"]) > 0:
            inputs = dict(inputs)
            inputs["pixel_values"], inputs["labels"] = self.batch_mixer(inputs["pixel_values"], inputs["labels"])
        return super().training_step(model, inputs, num_items_in_batch)


# ---------------------------------------------------------------------------------------------------------------------
# labelled data


@dataclass
class LabelledDataArguments:
    """Where the labelled images of fine-tuning and frozen-feature evaluation come from (both scripts' flags).
    Without a source, the built-in digits data is used."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, local dataset folder, 'digits'."})
    dataset_config_name: str | None = field(default=None)
    train_dir: str | None = field(default=None, metadata={"help": "A local folder with one sub-folder per class."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Parquet files (image and label columns)."})
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None, metadata={"help": "Evaluation split; default: validation, else test, else --train_val_split."}
    )
    train_val_split: float = field(default=0.15, metadata={"help": "Fraction split off train when there is no eval."})
    image_column: str | None = field(default=None, metadata={"help": "Found automatically if unset."})
    label_column: str | None = field(default=None, metadata={"help": "Found automatically if unset."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of N train images."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use a seeded subset of N eval images."})

    def load_splits(
        self, seed: int, cache_dir: str | None = None, token: str | bool | None = None
    ) -> ClassificationData:
        """The training and evaluation splits these arguments describe (`load_classification_splits`)."""
        return load_classification_splits(
            dataset_name=self.dataset_name,
            dataset_config_name=self.dataset_config_name,
            train_dir=self.train_dir,
            data_files=self.data_files,
            train_split=self.train_split,
            eval_split=self.eval_split,
            train_val_split=self.train_val_split,
            image_column=self.image_column,
            label_column=self.label_column,
            max_train_samples=self.max_train_samples,
            max_eval_samples=self.max_eval_samples,
            cache_dir=cache_dir,
            token=token,
            seed=seed,
        )


@dataclass
class ClassificationData:
    """A labelled train split and evaluation split, images left undecoded (see `data.disable_image_decoding`)."""

    train: datasets.Dataset
    eval: datasets.Dataset
    image_column: str
    label_column: str
    class_names: list[str]
    eval_split: str
    """Where the evaluation images came from: a split name, or `"train[split off N%]"`."""

    @property
    def num_labels(self) -> int:
        return len(self.class_names)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.class_names))

    @property
    def label2id(self) -> dict[str, int]:
        return {name: index for index, name in enumerate(self.class_names)}


def load_classification_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_dir: str | None = None,
    data_files: str | list[str] | dict | None = None,
    train_split: str = "train",
    eval_split: str | None = None,
    train_val_split: float = 0.15,
    image_column: str | None = None,
    label_column: str | None = None,
    max_train_samples: int | None = None,
    max_eval_samples: int | None = None,
    cache_dir: str | None = None,
    token: str | bool | None = None,
    seed: int = 42,
    digits_image_size: int = 32,
) -> ClassificationData:
    """Loads a labelled image dataset (any source of `data.load_image_dataset`) as a train and an evaluation split.

    The evaluation split is `eval_split` when given; otherwise `"validation"`, else `"test"`, else a seeded split of
    `train_val_split` of the training images (stratified by class when the labels are a `ClassLabel`). Labels must be
    a `ClassLabel`, integers (class `i` is named `str(i)`) or strings (classes sorted by name).
    """
    source = dict(
        dataset_name=dataset_name,
        dataset_config_name=dataset_config_name,
        train_dir=train_dir,
        data_files=data_files,
        cache_dir=cache_dir,
        token=token,
        digits_image_size=digits_image_size,
    )
    train = load_image_dataset(split=train_split, **source)
    image_column = resolve_image_column(train, image_column)
    label_column = resolve_label_column(train, label_column)
    if label_column is None:
        raise ValueError(
            f"The dataset has no label column (tried 'label', 'labels' and any ClassLabel column) among "
            f"{train.column_names}; name it with --label_column."
        )
    train = disable_image_decoding(train, image_column)

    eval_dataset, eval_name = None, None
    for candidate in [eval_split] if eval_split is not None else ["validation", "test"]:
        if candidate == train_split:
            continue
        try:
            # the train split's load already warned about the folder's skipped links
            eval_dataset = load_image_dataset(split=candidate, report_skipped_links=False, **source)
        except ValueError:
            if eval_split is not None:
                raise
            continue
        eval_name = candidate
        break
    if eval_dataset is None:
        if not 0.0 < train_val_split < 1.0:
            raise ValueError(
                f"The dataset has no 'validation' or 'test' split; set --train_val_split in (0, 1) to split one off "
                f"the training images (got {train_val_split})."
            )
        train, _, class_names = _encode_labels(train, None, label_column)
        try:
            parts = train.train_test_split(test_size=train_val_split, seed=seed, stratify_by_column=label_column)
        except ValueError:  # a class too small to stratify
            parts = train.train_test_split(test_size=train_val_split, seed=seed)
        train, eval_dataset = parts["train"], parts["test"]
        eval_name = f"{train_split}[split off {train_val_split:.0%}]"
    else:
        eval_dataset = disable_image_decoding(eval_dataset, image_column)
        train, eval_dataset, class_names = _encode_labels(train, eval_dataset, label_column)
    if max_train_samples is not None:
        train = train.shuffle(seed=seed).select(range(min(max_train_samples, len(train))))
    if max_eval_samples is not None:
        eval_dataset = eval_dataset.shuffle(seed=seed).select(range(min(max_eval_samples, len(eval_dataset))))
    return ClassificationData(train, eval_dataset, image_column, label_column, class_names, eval_name)


def _encode_labels(
    train: datasets.Dataset, eval_dataset: datasets.Dataset | None, label_column: str
) -> tuple[datasets.Dataset, datasets.Dataset | None, list[str]]:
    """Casts the label column of both splits to one `ClassLabel` (integers keep their values, strings are numbered in
    sorted order) and returns the class names."""
    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return train, eval_dataset, list(feature.names)
    values = set(train[label_column]) | (set(eval_dataset[label_column]) if eval_dataset is not None else set())
    if values and all(isinstance(value, (int, np.integer)) for value in values):
        if min(values) < 0:
            raise ValueError(f"Integer labels must be >= 0, found {min(values)} in column {label_column!r}.")
        class_label = datasets.ClassLabel(names=[str(index) for index in range(max(values) + 1)])
    elif values and all(isinstance(value, str) for value in values):
        class_label = datasets.ClassLabel(names=sorted(values))
    else:
        raise ValueError(f"Labels in column {label_column!r} must be a ClassLabel, integers or strings.")
    train = train.cast_column(label_column, class_label)
    if eval_dataset is not None:
        eval_dataset = eval_dataset.cast_column(label_column, class_label)
    return train, eval_dataset, list(class_label.names)


# ---------------------------------------------------------------------------------------------------------------------
# backbones and features


@dataclass
class Backbone:
    """A frozen feature extractor and how its inputs are prepared."""

    model: nn.Module
    image_size: int
    image_mean: list[float]
    image_std: list[float]
    num_prefix_tokens: int = 1
    """Tokens before the patch tokens in `last_hidden_state` (CLS plus register tokens)."""
    source: str = ""
    """What was loaded, for the results: e.g. `"MimCoForPreTraining checkpoint (student)"`."""
    untrained_weights: tuple[str, ...] = ()
    """Weights the checkpoint did not hold, so they are freshly initialised: e.g. the pooler of a `ViTModel` loaded
    from a `ViTForMaskedImageModeling` checkpoint, which has none. Pooling through them is refused."""

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.hidden_size)


def load_backbone(
    name_or_path: str,
    random_init_config: str | None = None,
    model_preset: str = "tiny",
    trust_remote_code: bool = False,
    seed: int = 0,
    **hub_kwargs,
) -> Backbone:
    """Loads a frozen backbone (eval mode, no gradients) for feature extraction.

    - A MimCo checkpoint (`MimCoModel`, the student of a `MimCoForPreTraining`, the backbone of a
      `MimCoForImageClassification`, or a stage-1 output folder, which is a plain `MimCoModel`) loads as `MimCoModel`.
    - A stage-1 `contrastive_model` folder (`MimCoForContrastivePreTraining`) gives its momentum encoder.
    - Any other checkpoint loads with `AutoModel` (e.g. `ViTModel`, `Dinov2Model`).
    - `"random-init"` builds an untrained `MimCoModel` (seeded with `seed`) from `random_init_config` (a checkpoint
      folder or `config.json` whose MimCo backbone shape is copied) or else from `model_preset`.
    - `"pixels"` gives the normalised pixels at that shape's image size (`RawPixels`): the baseline.

    The input size and pixel normalisation come from the checkpoint's `preprocessor_config.json`, else its config,
    else ImageNet's mean and standard deviation.
    """
    from transformers import AutoModel, PreTrainedConfig

    from . import MimCoConfig, MimCoContrastiveConfig, MimCoForContrastivePreTraining, MimCoModel

    if name_or_path in (RANDOM_INIT, PIXELS):
        config, description = _untrained_shape(random_init_config, model_preset, **hub_kwargs)
        if name_or_path == PIXELS:
            model = RawPixels(config.num_channels * config.image_size**2)
            description = f"normalised pixels at {config.image_size} px (the shape of {description.split(', ')[-1]})"
            num_prefix_tokens = 0
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = MimCoModel(config)
            num_prefix_tokens = 1
        return _frozen(
            Backbone(
                model,
                config.image_size,
                list(config.image_mean),
                list(config.image_std),
                num_prefix_tokens,
                description,
            )
        )

    config_dict = PreTrainedConfig.get_config_dict(name_or_path, **hub_kwargs)[0]
    model_type = config_dict.get("model_type")
    architectures = config_dict.get("architectures") or ["?"]
    untrained_weights: tuple[str, ...] = ()
    if model_type == MimCoContrastiveConfig.model_type:
        contrastive = MimCoForContrastivePreTraining.from_pretrained(name_or_path, **hub_kwargs)
        config = contrastive.config.backbone_config
        model = MimCoModel(config)
        model.load_state_dict(contrastive.momentum_encoder.state_dict())
        source = "MimCoForContrastivePreTraining checkpoint (momentum encoder)"
    elif model_type == MimCoConfig.model_type:
        model = MimCoModel.from_pretrained(name_or_path, **hub_kwargs)
        part = {"MimCoForPreTraining": " (student)", "MimCoForImageClassification": " (backbone)"}
        source = f"{architectures[0]} checkpoint{part.get(architectures[0], '')}"
    else:
        model, loading_info = AutoModel.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True, **hub_kwargs
        )
        untrained_weights = tuple(sorted(loading_info.get("missing_keys", ())))
        source = f"{architectures[0]} checkpoint via AutoModel ({type(model).__name__})"

    config = model.config
    image_size = _as_side(getattr(config, "image_size", None)) or 224
    mean = list(getattr(config, "image_mean", None) or [0.485, 0.456, 0.406])
    std = list(getattr(config, "image_std", None) or [0.229, 0.224, 0.225])
    processor = _image_processor_dict(name_or_path, **hub_kwargs)
    if processor:
        image_size = _as_side(processor.get("crop_size")) or _as_side(processor.get("size")) or image_size
        mean = list(processor.get("image_mean") or mean)
        std = list(processor.get("image_std") or std)
    num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _frozen(Backbone(model, image_size, mean, std, num_prefix_tokens, source, untrained_weights))


def _untrained_shape(random_init_config: str | None, model_preset: str, **hub_kwargs) -> tuple:
    """The `MimCoConfig` (and a description) of `random-init` and `pixels`: the backbone shape of
    `random_init_config` (a checkpoint folder or `config.json`), else of `model_preset`."""
    from transformers import PreTrainedConfig

    from . import MimCoConfig, MimCoContrastiveConfig

    if random_init_config is None:
        return MimCoConfig(**preset_backbone_kwargs(model_preset)), f"untrained MimCoModel, preset {model_preset!r}"
    config_path = random_init_config
    if os.path.isfile(config_path):
        config_path = os.path.dirname(os.path.abspath(config_path))
    config_dict = PreTrainedConfig.get_config_dict(config_path, **hub_kwargs)[0]
    if config_dict.get("model_type") == MimCoContrastiveConfig.model_type:
        config = MimCoContrastiveConfig.from_dict(config_dict).backbone_config
    elif config_dict.get("model_type") == MimCoConfig.model_type:
        config = MimCoConfig.from_dict(config_dict)
    else:
        raise ValueError(
            f"--random_init_config {random_init_config!r} is not a MimCo config (model_type "
            f"{config_dict.get('model_type')!r})."
        )
    config = MimCoConfig.from_dict({**config.to_dict(), "teacher_config": None})
    return config, f"untrained MimCoModel shaped like {random_init_config}"


class RawPixels(nn.Module):
    """A "backbone" whose feature is the normalised image itself: `last_hidden_state` `(batch, 1, C*H*W)`."""

    def __init__(self, num_features: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=num_features)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=pixel_values.flatten(1)[:, None, :])


def _frozen(backbone: Backbone) -> Backbone:
    backbone.model.eval().requires_grad_(False)
    return backbone


def _as_side(size) -> int | None:
    if size is None:
        return None
    if isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)):
        return int(size[0])
    if isinstance(size, dict):
        for key in ("height", "shortest_edge", "width"):
            if size.get(key):
                return int(size[key])
    return None


def _image_processor_dict(name_or_path: str, **hub_kwargs) -> dict | None:
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        return ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_kwargs)[0]
    except (OSError, ValueError):
        return None


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `(N, D)` (float32, on the CPU) and labels `(N,)` of every readable image of `dataset`.

    Images go through the evaluation transform at the backbone's own size and normalisation
    (`data.build_eval_transform`); unreadable images are skipped with a warning. A tqdm bar shows the progress.
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
    prepared = apply_example_transform(dataset, PretrainingExampleTransform(transform, image_column, label_column))
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
    except ImportError as error:  # matplotlib is a development extra
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
    "PIXELS",
    "RANDOM_INIT",
    "RawPixels",
    "Backbone",
    "ClassificationData",
    "ClassificationMetrics",
    "FineTuningTrainer",
    "FrozenFeatureResult",
    "LinearProbeConfig",
    "SoftTargetCrossEntropy",
    "TopKAccuracy",
    "build_batch_mixer",
    "build_linear_probe",
    "classifier_accuracy",
    "evaluate_frozen_features",
    "exclude_from_weight_decay",
    "extract_features",
    "knn_accuracy",
    "knn_classify",
    "layer_decay_parameter_groups",
    "limit_cpu_threads",
    "load_accuracy_metric",
    "load_backbone",
    "load_classification_splits",
    "num_transformer_layers",
    "parameter_layer_id",
    "plot_tsne",
    "pool_features",
    "reported_top_k",
    "results_table",
    "top_k_predictions",
    "train_linear_probe",
    "tsne_embedding",
]
