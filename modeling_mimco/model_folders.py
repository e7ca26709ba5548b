"""TODO docstring."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput

from .configuration_mimco import preset_backbone_kwargs


logger = logging.getLogger(__name__)


def save_image_processor(output_dir: str, image_size: int, image_mean: list[float], image_std: list[float]) -> None:
    """Writes the `preprocessor_config.json` that turns images into this model's `pixel_values`."""
    from transformers import ViTImageProcessor

    ViTImageProcessor(
        size={"height": image_size, "width": image_size}, image_mean=image_mean, image_std=image_std
    ).save_pretrained(output_dir)


RANDOM_INIT = "random-init"


PIXELS = "pixels"


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
