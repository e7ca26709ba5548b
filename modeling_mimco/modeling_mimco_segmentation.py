"""Semantic segmentation on a MimCo backbone: transformers' UperNet head (and auxiliary FCN head) on `MimCoBackbone`.

`MimCoForSemanticSegmentation` is what `mimco-segment` trains. Its weights carry the names of transformers'
`UperNetForSemanticSegmentation` (`backbone.*`, `decode_head.*`, `auxiliary_head.*`) and its config is an UperNet
config (`MimCoUperNetConfig`, `model_type` "upernet"), so that a saved folder loads in two ways with the same outputs:
with `UperNetForSemanticSegmentation` where `modeling_mimco` is installed, and with
`AutoModelForSemanticSegmentation` and `trust_remote_code=True` from the folder's own copy of these files anywhere.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import PreTrainedModel
from transformers.modeling_outputs import SemanticSegmenterOutput
from transformers.models.upernet.modeling_upernet import UperNetFCNHead, UperNetHead

from .configuration_mimco import MimCoUperNetConfig
from .modeling_mimco import MimCoBackbone, MimCoPreTrainedModel, pixel_normalisation, stock_image_processor


class MimCoForSemanticSegmentation(MimCoPreTrainedModel):
    """UperNet on a MimCo backbone: the feature maps of `MimCoBackbone` (its `out_features`, through its pyramid
    when `use_feature_pyramid`) feed transformers' `UperNetHead`, and in training its `UperNetFCNHead` too; the
    logits are upsampled to the input's size. The same model as transformers' `UperNetForSemanticSegmentation` with
    this backbone, weight for weight and output for output."""

    config_class = MimCoUperNetConfig
    config: MimCoUperNetConfig
    base_model_prefix = ""
    _no_split_modules = []
    _keys_to_ignore_on_load_unexpected = None

    def __init__(self, config: MimCoUperNetConfig):
        super().__init__(config)
        self.backbone = MimCoBackbone(config.backbone_config)
        self.decode_head = UperNetHead(config, in_channels=self.backbone.channels)
        self.auxiliary_head = (
            UperNetFCNHead(config, in_channels=self.backbone.channels) if config.use_auxiliary_head else None
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # the heads start as in `UperNetForSemanticSegmentation` (the backbone, a model of its own, inits itself)
        PreTrainedModel._init_weights(self, module)

    def freeze_untrained_parameters(self) -> None:
        self.backbone.freeze_untrained_parameters()

    def default_image_processor(self):
        """The processor of `mimco-segment`'s folders: `SegformerImageProcessor` at the backbone's image size, with
        its normalisation; `None` where transformers' image processors cannot be imported."""
        return _segmentation_image_processor(*pixel_normalisation(self.config.backbone_config))

    def _remote_auto_map(self) -> dict[str, str]:
        return dict(MIMCO_SEGMENTATION_AUTO_MAP)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> tuple | SemanticSegmenterOutput:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images; `height` and `width` are multiples of the backbone's `patch_size`.
            output_attentions (`bool`, *optional*): Also return the backbone's attention probabilities.
            output_hidden_states (`bool`, *optional*): Also return the backbone's hidden states.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class per pixel (`config.loss_ignore_index` where unlabelled), for the cross-entropy loss of the
                UperNet head plus `config.auxiliary_loss_weight` times that of the auxiliary head.
            return_dict (`bool`, *optional*): `False` returns a tuple.

        Returns:
            `SemanticSegmenterOutput`: `logits` `(batch_size, num_labels, height, width)`, at the input's size.
        """
        if labels is not None and self.config.num_labels == 1:
            raise ValueError("The number of labels should be greater than one")
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        output_attentions = output_attentions if output_attentions is not None else config.output_attentions

        outputs = self.backbone.forward_with_filtered_kwargs(
            pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
        )
        features = outputs.feature_maps
        size = pixel_values.shape[2:]
        logits = nn.functional.interpolate(self.decode_head(features), size=size, mode="bilinear", align_corners=False)
        auxiliary_logits = None
        if self.auxiliary_head is not None:
            auxiliary_logits = nn.functional.interpolate(
                self.auxiliary_head(features), size=size, mode="bilinear", align_corners=False
            )

        loss = None
        if labels is not None:
            loss_function = CrossEntropyLoss(ignore_index=config.loss_ignore_index)
            loss = loss_function(logits, labels)
            if auxiliary_logits is not None:
                loss = loss + config.auxiliary_loss_weight * loss_function(auxiliary_logits, labels)

        if not return_dict:
            output = (logits,) + (outputs[1:] if output_hidden_states else outputs[2:])
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


def _segmentation_image_processor(image_size: int, image_mean: list[float], image_std: list[float]):
    """`SegformerImageProcessor` (the one UperNet checkpoints use) resizing to `image_size` with this normalisation;
    its PIL variant where torchvision is missing, `None` where neither imports."""
    return stock_image_processor(
        ("SegformerImageProcessor", "SegformerImageProcessorPil"),
        size={"height": image_size, "width": image_size},
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


# What a saved segmentation folder loads into as remote code: its config class and the model.
MIMCO_SEGMENTATION_AUTO_MAP = {
    "AutoConfig": "configuration_mimco.MimCoUperNetConfig",
    "AutoModelForSemanticSegmentation": "modeling_mimco_segmentation.MimCoForSemanticSegmentation",
}


# Marked for remote code where the class is defined, so that every `save_pretrained` writes the `auto_map` and copies
# the model files, however the class was imported (the package's Auto-class registration is separate, and lazy).
MimCoForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")


__all__ = ["MIMCO_SEGMENTATION_AUTO_MAP", "MimCoForSemanticSegmentation"]
