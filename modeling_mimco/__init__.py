"""MimCo: masked image modeling pre-training with a contrastive teacher, for Hugging Face `transformers`.

The package imports lazily: `import modeling_mimco` loads neither torch nor transformers' models, so that the
console commands answer `--help` and argument errors at once. The first use of one of its public names
(`from modeling_mimco import MimCoModel`, `modeling_mimco.MimCoConfig`) loads the model code and registers the
MimCo classes with the Auto classes (and `ViTImageProcessor` as the image processor of `model_type` "mimco" and
"mimco_contrastive") and marks them for remote code, so that `save_pretrained` writes an `auto_map` and the model
files next to the weights, and `preprocessor_config.json`. Code that imports only the package and then loads a MimCo
folder through an Auto class calls `modeling_mimco.register_auto_classes()` first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any


__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC_NAMES = {
    "MimCoConfig": "configuration_mimco",
    "MimCoContrastiveConfig": "configuration_mimco",
    "MimCoUperNetConfig": "configuration_mimco",
    "MimCoMaskGenerator": "masking",
    "MimCoBackbone": "modeling_mimco",
    "MimCoForImageClassification": "modeling_mimco",
    "MimCoForPreTraining": "modeling_mimco",
    "MimCoForPreTrainingOutput": "modeling_mimco",
    "MimCoModel": "modeling_mimco",
    "MimCoPreTrainedModel": "modeling_mimco",
    "MimCoForContrastivePreTraining": "modeling_mimco_contrastive",
    "MimCoForSemanticSegmentation": "modeling_mimco_segmentation",
}

__all__ = [
    "MimCoBackbone",
    "MimCoConfig",
    "MimCoContrastiveConfig",
    "MimCoForContrastivePreTraining",
    "MimCoForImageClassification",
    "MimCoForPreTraining",
    "MimCoForPreTrainingOutput",
    "MimCoForSemanticSegmentation",
    "MimCoMaskGenerator",
    "MimCoModel",
    "MimCoPreTrainedModel",
    "MimCoUperNetConfig",
]

if TYPE_CHECKING:
    from .configuration_mimco import MimCoConfig, MimCoContrastiveConfig, MimCoUperNetConfig
    from .masking import MimCoMaskGenerator
    from .modeling_mimco import (
        MimCoBackbone,
        MimCoForImageClassification,
        MimCoForPreTraining,
        MimCoForPreTrainingOutput,
        MimCoModel,
        MimCoPreTrainedModel,
    )
    from .modeling_mimco_contrastive import MimCoForContrastivePreTraining
    from .modeling_mimco_segmentation import MimCoForSemanticSegmentation


_registered = False


def register_auto_classes() -> None:
    """Registers the MimCo classes with transformers' Auto classes and for remote code; runs once, on the first use of
    a public name (or a call)."""
    global _registered
    if _registered:
        return
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForPreTraining,
        AutoModelForSemanticSegmentation,
    )

    from .configuration_mimco import MimCoConfig, MimCoContrastiveConfig, MimCoUperNetConfig
    from .modeling_mimco import MimCoBackbone, MimCoForImageClassification, MimCoForPreTraining, MimCoModel
    from .modeling_mimco_contrastive import MimCoForContrastivePreTraining
    from .modeling_mimco_segmentation import MimCoForSemanticSegmentation

    AutoConfig.register(MimCoConfig.model_type, MimCoConfig, exist_ok=True)
    AutoConfig.register(MimCoContrastiveConfig.model_type, MimCoContrastiveConfig, exist_ok=True)
    AutoModel.register(MimCoConfig, MimCoModel, exist_ok=True)
    AutoModelForPreTraining.register(MimCoContrastiveConfig, MimCoForContrastivePreTraining, exist_ok=True)
    AutoModelForPreTraining.register(MimCoConfig, MimCoForPreTraining, exist_ok=True)
    AutoModelForImageClassification.register(MimCoConfig, MimCoForImageClassification, exist_ok=True)
    AutoBackbone.register(MimCoConfig, MimCoBackbone, exist_ok=True)
    # `model_type` "upernet" stays transformers' UperNet; the MimCo config class itself maps to the MimCo model
    AutoModelForSemanticSegmentation.register(MimCoUperNetConfig, MimCoForSemanticSegmentation, exist_ok=True)

    _register_image_processors(MimCoConfig, MimCoContrastiveConfig)
    _registered = True


def _register_image_processors(*config_classes: type) -> None:
    """`AutoImageProcessor` for a MimCo folder whose `preprocessor_config.json` names no class: transformers' ViT
    processor (its torchvision and PIL variants), the class that `save_pretrained` writes."""
    from transformers import AutoImageProcessor

    try:
        from transformers import ViTImageProcessor, ViTImageProcessorPil
    except ImportError:  # no torchvision / PIL: nothing to register
        return
    classes = {"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil}
    for config_class in config_classes:
        AutoImageProcessor.register(config_class, image_processor_classes=classes, exist_ok=True)


def __getattr__(name: str) -> Any:
    module_name = _PUBLIC_NAMES.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{module_name}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC_NAMES))
