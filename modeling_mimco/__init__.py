"""MimCo: masked image modeling pre-training with a contrastive teacher, for Hugging Face `transformers`.

Importing the package registers the MimCo classes with the Auto classes (and `ViTImageProcessor` as the image
processor of `model_type` "mimco" and "mimco_contrastive") and marks them for remote code, so that `save_pretrained`
writes an `auto_map` and the model files next to the weights, and `preprocessor_config.json`.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
    AutoModelForSemanticSegmentation,
)

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


__version__ = "0.1.0"

AutoConfig.register(MimCoConfig.model_type, MimCoConfig, exist_ok=True)
AutoConfig.register(MimCoContrastiveConfig.model_type, MimCoContrastiveConfig, exist_ok=True)
AutoModel.register(MimCoConfig, MimCoModel, exist_ok=True)
AutoModelForPreTraining.register(MimCoContrastiveConfig, MimCoForContrastivePreTraining, exist_ok=True)
AutoModelForPreTraining.register(MimCoConfig, MimCoForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MimCoConfig, MimCoForImageClassification, exist_ok=True)
AutoBackbone.register(MimCoConfig, MimCoBackbone, exist_ok=True)
# `model_type` "upernet" stays transformers' UperNet; the MimCo config class itself maps to the MimCo model
AutoModelForSemanticSegmentation.register(MimCoUperNetConfig, MimCoForSemanticSegmentation, exist_ok=True)


def _register_image_processors() -> None:
    """`AutoImageProcessor` for a MimCo folder whose `preprocessor_config.json` names no class: transformers' ViT
    processor (its torchvision and PIL variants), the class that `save_pretrained` writes."""
    try:
        from transformers import ViTImageProcessor, ViTImageProcessorPil
    except ImportError:  # no torchvision / PIL: nothing to register
        return
    classes = {"torchvision": ViTImageProcessor, "pil": ViTImageProcessorPil}
    for config_class in (MimCoConfig, MimCoContrastiveConfig):
        AutoImageProcessor.register(config_class, image_processor_classes=classes, exist_ok=True)


_register_image_processors()

MimCoConfig.register_for_auto_class()
MimCoContrastiveConfig.register_for_auto_class()
MimCoUperNetConfig.register_for_auto_class()
MimCoModel.register_for_auto_class("AutoModel")
MimCoForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MimCoForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MimCoBackbone.register_for_auto_class("AutoBackbone")
MimCoForContrastivePreTraining.register_for_auto_class("AutoModelForPreTraining")
MimCoForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")


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
