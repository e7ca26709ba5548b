"""Checkpoint folders: what kind of model a folder (or Hub id) holds, and how each command loads it.

This module is the one place that loads a MimCo, stage-1, ViT, DINOv2 or other `transformers` checkpoint for the
tooling. `read_folder_kind` reads a folder's `config.json` and says which kind it is (a stage-1 `contrastive_model`
folder, any other MimCo checkpoint, or anything else, loaded through the Auto classes); `momentum_encoder_state`
gives the stage-1 momentum encoder as a `MimCoModel` state. On these rest `load_backbone` (a frozen feature
extractor for the linear probe and k-NN, or the `random-init` and `pixels` baselines) and `load_classifier` (a model
with a fresh head, to fine-tune). `save_image_processor` is the commands' writer of `preprocessor_config.json` (a
model's own `save_pretrained` writes the same `ViTImageProcessor` for its config where the folder has none);
`load_image_processor` reads one back; `load_mimco_checkpoint` reads a MimCo folder's config and raw weights
without building the model (the export to timm). It imports torch, transformers, the package's model classes and
`vit_checkpoints` (reading weight files), never the commands.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    PreTrainedConfig,
    PreTrainedModel,
    ViTImageProcessor,
)
from transformers.image_processing_base import ImageProcessingMixin
from transformers.image_utils import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    IMAGENET_STANDARD_MEAN,
    IMAGENET_STANDARD_STD,
    PILImageResampling,
)
from transformers.modeling_outputs import BaseModelOutput
from transformers.utils import logging as transformers_logging

from modeling_mimco import (
    MimCoConfig,
    MimCoContrastiveConfig,
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoModel,
)
from modeling_mimco.configuration_mimco import preset_backbone_kwargs
from modeling_mimco.interop.vit_checkpoints import load_checkpoint_file, select_state_dict


logger = logging.getLogger(__name__)


RANDOM_INIT = "random-init"
"""The `--model_name_or_path` value that stands for an untrained `MimCoModel`."""
PIXELS = "pixels"
"""The `--model_name_or_path` value that stands for the normalised pixels: the baseline every feature must beat."""

CONTRASTIVE_FOLDER = "contrastive"
"""A stage-1 `contrastive_model` folder (`MimCoForContrastivePreTraining`): its momentum encoder is the backbone."""
MIMCO_FOLDER = "mimco"
"""Any other MimCo checkpoint: `MimCoModel` (e.g. a stage-1 output folder), `MimCoForPreTraining` (its student),
`MimCoForImageClassification` (its backbone)."""
OTHER_FOLDER = "other"
"""Any other `transformers` checkpoint (ViT, DINOv2...), loaded through the Auto classes."""


# ---------------------------------------------------------------------------------------------------------------------
# folder kinds


def read_folder_kind(name_or_path: str, **hub_kwargs) -> tuple[str, dict[str, Any]]:
    """Reads the `config.json` of a checkpoint folder or Hub id; returns its kind (`CONTRASTIVE_FOLDER`,
    `MIMCO_FOLDER` or `OTHER_FOLDER`, by its `model_type`) and the config dict."""
    config_dict = PreTrainedConfig.get_config_dict(name_or_path, **hub_kwargs)[0]
    model_type = config_dict.get("model_type")
    if model_type == MimCoContrastiveConfig.model_type:
        return CONTRASTIVE_FOLDER, config_dict
    if model_type == MimCoConfig.model_type:
        return MIMCO_FOLDER, config_dict
    return OTHER_FOLDER, config_dict


def momentum_encoder_state(name_or_path: str, **hub_kwargs) -> tuple[MimCoConfig, dict[str, torch.Tensor]]:
    """The momentum encoder of a stage-1 folder: its `MimCoConfig` and its weights as a `MimCoModel` state dict (the
    projector and predictor are left out)."""
    contrastive = MimCoForContrastivePreTraining.from_pretrained(name_or_path, **hub_kwargs)
    return contrastive.config.backbone_config, contrastive.momentum_encoder.state_dict()


# ---------------------------------------------------------------------------------------------------------------------
# image processors


def build_image_processor(image_size: int, image_mean: list[float], image_std: list[float]) -> ViTImageProcessor:
    """The `ViTImageProcessor` that turns images into this model's `pixel_values`: a bicubic resize to `image_size`
    (the interpolation of `data.build_eval_transform`), then rescaling and normalisation."""
    return ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        resample=PILImageResampling.BICUBIC,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def save_image_processor(
    output_dir: str | os.PathLike, image_size: int, image_mean: list[float], image_std: list[float]
) -> None:
    """Writes the `preprocessor_config.json` that turns images into this model's `pixel_values`
    (`build_image_processor`)."""
    build_image_processor(image_size, image_mean, image_std).save_pretrained(output_dir)


def load_image_processor(
    name_or_path: str | None, config: PreTrainedConfig, trust_remote_code: bool = False, **hub_kwargs
) -> ImageProcessingMixin:
    """The checkpoint's image processor if it has one, else `build_image_processor` for the model's `config` (its
    `image_size`, `image_mean` and `image_std`, defaulting to 224 px and `ViTImageProcessor`'s 0.5 / 0.5)."""
    if name_or_path is not None:
        try:
            return AutoImageProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **hub_kwargs)
        except (OSError, ValueError):
            logger.info("The checkpoint has no image processor; building a ViTImageProcessor from its config.")
    return build_image_processor(
        getattr(config, "image_size", 224),
        getattr(config, "image_mean", None) or IMAGENET_STANDARD_MEAN,
        getattr(config, "image_std", None) or IMAGENET_STANDARD_STD,
    )


def image_side(size) -> int | None:
    """The side of a square image from an image size as configs and processors give it: an int, a `[height, width]`
    list, or a dict or `SizeDict` with `height` or `shortest_edge` (or `width`); `None` when there is none."""
    if size is None or isinstance(size, int):
        return size
    if isinstance(size, (list, tuple)):
        return int(size[0])
    for key in ("height", "shortest_edge", "width"):
        value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
        if value:
            return int(value)
    return None


def processor_side(image_processor: ImageProcessingMixin) -> int:
    """The side of the images the model sees: the processor's crop size if it crops, else its resize size."""
    side = image_side(getattr(image_processor, "crop_size", None)) or image_side(
        getattr(image_processor, "size", None)
    )
    if side is None:
        raise ValueError(f"Cannot read the image size of {type(image_processor).__name__}.")
    return side


def _image_processor_dict(name_or_path: str, **hub_kwargs) -> dict | None:
    try:
        return ImageProcessingMixin.get_image_processor_dict(name_or_path, **hub_kwargs)[0]
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------------
# frozen backbones


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


class RawPixels(nn.Module):
    """A "backbone" whose feature is the normalised image itself: `last_hidden_state` `(batch, 1, C*H*W)`."""

    def __init__(self, num_features: int):
        super().__init__()
        self.config = SimpleNamespace(hidden_size=num_features)

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=pixel_values.flatten(1)[:, None, :])


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
    if name_or_path in (RANDOM_INIT, PIXELS):
        return _frozen(_untrained_backbone(name_or_path, random_init_config, model_preset, seed, **hub_kwargs))
    model, source, untrained_weights = _pretrained_backbone_model(name_or_path, trust_remote_code, **hub_kwargs)
    config = model.config
    image_size = image_side(getattr(config, "image_size", None)) or 224
    mean = list(getattr(config, "image_mean", None) or IMAGENET_DEFAULT_MEAN)
    std = list(getattr(config, "image_std", None) or IMAGENET_DEFAULT_STD)
    processor = _image_processor_dict(name_or_path, **hub_kwargs)
    if processor:
        image_size = image_side(processor.get("crop_size")) or image_side(processor.get("size")) or image_size
        mean = list(processor.get("image_mean") or mean)
        std = list(processor.get("image_std") or std)
    num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
    return _frozen(Backbone(model, image_size, mean, std, num_prefix_tokens, source, untrained_weights))


def _pretrained_backbone_model(
    name_or_path: str, trust_remote_code: bool, **hub_kwargs
) -> tuple[nn.Module, str, tuple[str, ...]]:
    """`load_backbone`'s model for a checkpoint, by the folder's kind; returns the model, what was loaded (for the
    results) and the weights the checkpoint did not hold."""
    kind, config_dict = read_folder_kind(name_or_path, **hub_kwargs)
    architecture = (config_dict.get("architectures") or ["?"])[0]
    if kind == CONTRASTIVE_FOLDER:
        config, state = momentum_encoder_state(name_or_path, **hub_kwargs)
        model = MimCoModel(config)
        model.load_state_dict(state)
        return model, "MimCoForContrastivePreTraining checkpoint (momentum encoder)", ()
    if kind == MIMCO_FOLDER:
        part = {"MimCoForPreTraining": " (student)", "MimCoForImageClassification": " (backbone)"}
        model = MimCoModel.from_pretrained(name_or_path, **hub_kwargs)
        return model, f"{architecture} checkpoint{part.get(architecture, '')}", ()
    # a pre-training folder (e.g. `ViTForMaskedImageModeling`) holds heads the backbone drops and lacks the pooler:
    # transformers' warning table about them would alarm for nothing, and the results record the untrained weights
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        model, loading_info = AutoModel.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code, output_loading_info=True, **hub_kwargs
        )
    finally:
        transformers_logging.set_verbosity(verbosity)
    untrained_weights = tuple(sorted(loading_info.get("missing_keys", ())))
    return model, f"{architecture} checkpoint via AutoModel ({type(model).__name__})", untrained_weights


def _untrained_backbone(
    name_or_path: str, random_init_config: str | None, model_preset: str, seed: int, **hub_kwargs
) -> Backbone:
    """`load_backbone` for `"random-init"` (an untrained `MimCoModel`, seeded) and `"pixels"` (`RawPixels`)."""
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
    mean, std = list(config.image_mean), list(config.image_std)
    return Backbone(model, config.image_size, mean, std, num_prefix_tokens, description)


def _untrained_shape(random_init_config: str | None, model_preset: str, **hub_kwargs) -> tuple[MimCoConfig, str]:
    """The `MimCoConfig` (and a description) of `random-init` and `pixels`: the backbone shape of
    `random_init_config` (a checkpoint folder or `config.json`), else of `model_preset`."""
    if random_init_config is None:
        return MimCoConfig(**preset_backbone_kwargs(model_preset)), f"untrained MimCoModel, preset {model_preset!r}"
    config_path = random_init_config
    if os.path.isfile(config_path):
        config_path = os.path.dirname(os.path.abspath(config_path))
    kind, config_dict = read_folder_kind(config_path, **hub_kwargs)
    if kind == CONTRASTIVE_FOLDER:
        config = MimCoContrastiveConfig.from_dict(config_dict).backbone_config
    elif kind == MIMCO_FOLDER:
        config = MimCoConfig.from_dict(config_dict)
    else:
        raise ValueError(
            f"--random_init_config {random_init_config!r} is not a MimCo config (model_type "
            f"{config_dict.get('model_type')!r})."
        )
    config = MimCoConfig.from_dict({**config.to_dict(), "teacher_config": None})
    return config, f"untrained MimCoModel shaped like {random_init_config}"


def _frozen(backbone: Backbone) -> Backbone:
    backbone.model.eval().requires_grad_(False)
    return backbone


# ---------------------------------------------------------------------------------------------------------------------
# classifiers to fine-tune


def load_classifier(
    name_or_path: str | None,
    id2label: dict[int, str],
    label2id: dict[str, int],
    *,
    pooling: str = "mean",
    drop_path_rate: float = 0.1,
    model_preset: str = "vit-small-patch16",
    image_size: int | None = None,
    trust_remote_code: bool = False,
    **hub_kwargs,
) -> PreTrainedModel:
    """An image classifier with a fresh head for the classes of `id2label`, to fine-tune.

    - A MimCo checkpoint (a stage-2 `MimCoForPreTraining`, whose teacher and heads are skipped; a `MimCoModel`, e.g.
      a stage-1 output folder; a `MimCoForImageClassification`) loads as `MimCoForImageClassification` with
      `pooling` and `drop_path_rate`.
    - A stage-1 `contrastive_model` folder gives a `MimCoForImageClassification` on its momentum encoder.
    - Any other checkpoint loads with `AutoModelForImageClassification` (with `drop_path_rate` where its config has
      one).
    - `None` builds an untrained `MimCoForImageClassification` of `model_preset`'s shape (at `image_size`, if given).
    """
    labels = {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}
    if name_or_path is None:
        backbone = preset_backbone_kwargs(model_preset, image_size)
        return MimCoForImageClassification(
            MimCoConfig(**backbone, pooling=pooling, drop_path_rate=drop_path_rate, **labels)
        )
    kind, config_dict = read_folder_kind(name_or_path, **hub_kwargs)
    if kind == MIMCO_FOLDER:
        return MimCoForImageClassification.from_pretrained(
            name_or_path,
            pooling=pooling,
            drop_path_rate=drop_path_rate,
            ignore_mismatched_sizes=True,
            **labels,
            **hub_kwargs,
        )
    if kind == CONTRASTIVE_FOLDER:
        return _classifier_on_momentum_encoder(name_or_path, pooling, drop_path_rate, labels, **hub_kwargs)
    extra = {}
    if "drop_path_rate" in config_dict:
        extra["drop_path_rate"] = drop_path_rate
    else:
        logger.warning(
            f"{config_dict.get('model_type')} models have no `drop_path_rate`; --drop_path_rate is ignored."
        )
    return AutoModelForImageClassification.from_pretrained(
        name_or_path,
        ignore_mismatched_sizes=True,
        trust_remote_code=trust_remote_code,
        **labels,
        **extra,
        **hub_kwargs,
    )


def _classifier_on_momentum_encoder(
    name_or_path: str, pooling: str, drop_path_rate: float, labels: dict[str, Any], **hub_kwargs
) -> MimCoForImageClassification:
    """`load_classifier` for a stage-1 folder: a `MimCoForImageClassification` whose backbone is the momentum
    encoder; only the head, and a pooler norm that the encoder lacks (mean pooling), start untrained."""
    config, state = momentum_encoder_state(name_or_path, **hub_kwargs)
    config_dict = {**config.to_dict(), "pooling": pooling, "drop_path_rate": drop_path_rate, **labels}
    model = MimCoForImageClassification(MimCoConfig.from_dict(config_dict))
    missing, unexpected = model.mimco.load_state_dict(state, strict=False)
    if unexpected or any(not key.startswith("pooler_norm.") for key in missing):
        raise ValueError(f"{name_or_path}: encoder weights do not fit (missing {missing}, unexpected {unexpected}).")
    return model


__all__ = [
    "load_mimco_checkpoint",
    "CONTRASTIVE_FOLDER",
    "MIMCO_FOLDER",
    "OTHER_FOLDER",
    "PIXELS",
    "RANDOM_INIT",
    "Backbone",
    "RawPixels",
    "build_image_processor",
    "image_side",
    "load_backbone",
    "load_classifier",
    "load_image_processor",
    "momentum_encoder_state",
    "processor_side",
    "read_folder_kind",
    "save_image_processor",
]


def load_mimco_checkpoint(folder: str | Path) -> tuple[MimCoConfig, dict[str, torch.Tensor]]:
    """The config and the raw state dict of a saved MimCo model (`MimCoModel`, `MimCoForImageClassification` or
    `MimCoForPreTraining`), read from `config.json` and the safetensors file(s) without building the model."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{folder}: no config.json; a MimCo checkpoint folder (from `save_pretrained`) was expected.")
    try:
        config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error}).") from None
    if config_dict.get("model_type") != MimCoConfig.model_type:
        raise ValueError(f"{config_file}: model_type is {config_dict.get('model_type')!r}, not 'mimco'.")
    config = MimCoConfig.from_pretrained(folder)

    index_file = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index_file.is_file():
        weight_map = json.loads(index_file.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ValueError(f"{folder}: no model.safetensors (or sharded index, or pytorch_model.bin) found.")
    state_dict = {}
    for file in files:
        state_dict.update(select_state_dict(load_checkpoint_file(file), str(file)))
    return config, state_dict
