"""MimCo: masked image modeling pre-training with a contrastive teacher, for Hugging Face `transformers`.

Importing the package registers the MimCo classes with the Auto classes and marks them for remote code, so that
`save_pretrained` writes an `auto_map` and the model files next to the weights. It also lets
`AutoBackbone.from_pretrained` load a local MimCo folder, which transformers 5.25 does not do for any model
(`_let_auto_backbone_load_local_mimco_folders`).
"""

import functools
import json
import os

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


def _is_local_mimco_folder(path, subfolder: str = "") -> bool:
    """Whether `path` is a local folder whose `config.json` is a MimCo config (`model_type` "mimco")."""
    try:
        config_file = os.path.join(os.fspath(path), subfolder or "", "config.json")
        with open(config_file, encoding="utf-8") as handle:
            return json.load(handle).get("model_type") == MimCoConfig.model_type
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _let_auto_backbone_load_local_mimco_folders() -> None:
    """Makes `AutoBackbone.from_pretrained` load a local MimCo folder too.

    transformers 5.25's `AutoBackbone.from_pretrained` first asks the Hub whether its argument is a repository, and
    takes anything else for a timm model name: a local folder of any model fails there (an absolute path is not a
    valid repo id, a relative one needs the network). A local MimCo folder goes instead to the loading that
    `AutoBackbone` does for a Hub repository, the generic Auto-class loading (config, `auto_map`, weights). Hub ids and
    other models' folders are left to transformers as they are.
    """
    from transformers.models.auto.auto_factory import _BaseAutoModelClass

    upstream = AutoBackbone.from_pretrained
    if getattr(upstream, "loads_local_mimco_folders", False):
        return

    def from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs):
        if _is_local_mimco_folder(pretrained_model_name_or_path, kwargs.get("subfolder", "")):
            kwargs.pop("use_timm_backbone", None)
            generic = _BaseAutoModelClass.from_pretrained.__func__
            return generic(AutoBackbone, pretrained_model_name_or_path, *model_args, **kwargs)
        return upstream(pretrained_model_name_or_path, *model_args, **kwargs)

    functools.update_wrapper(from_pretrained, upstream)
    from_pretrained.loads_local_mimco_folders = True
    AutoBackbone.from_pretrained = staticmethod(from_pretrained)


_let_auto_backbone_load_local_mimco_folders()

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
