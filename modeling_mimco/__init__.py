"""MimCo: masked image modeling pre-training with a contrastive teacher, for Hugging Face `transformers`.

Importing the package registers the MimCo classes with the Auto classes and marks them for remote code, so that
`save_pretrained` writes an `auto_map` and the model files next to the weights.
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_mimco import MimCoConfig, MimCoContrastiveConfig
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


__version__ = "0.1.0"

AutoConfig.register(MimCoConfig.model_type, MimCoConfig, exist_ok=True)
AutoConfig.register(MimCoContrastiveConfig.model_type, MimCoContrastiveConfig, exist_ok=True)
AutoModel.register(MimCoConfig, MimCoModel, exist_ok=True)
AutoModelForPreTraining.register(MimCoContrastiveConfig, MimCoForContrastivePreTraining, exist_ok=True)
AutoModelForPreTraining.register(MimCoConfig, MimCoForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(MimCoConfig, MimCoForImageClassification, exist_ok=True)
AutoBackbone.register(MimCoConfig, MimCoBackbone, exist_ok=True)

MimCoConfig.register_for_auto_class()
MimCoModel.register_for_auto_class("AutoModel")
MimCoForPreTraining.register_for_auto_class("AutoModelForPreTraining")
MimCoForImageClassification.register_for_auto_class("AutoModelForImageClassification")
MimCoBackbone.register_for_auto_class("AutoBackbone")


__all__ = [
    "MimCoBackbone",
    "MimCoConfig",
    "MimCoContrastiveConfig",
    "MimCoForContrastivePreTraining",
    "MimCoForImageClassification",
    "MimCoForPreTraining",
    "MimCoForPreTrainingOutput",
    "MimCoMaskGenerator",
    "MimCoModel",
    "MimCoPreTrainedModel",
]
