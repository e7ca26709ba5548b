"""Weight-name conversion between MimCo and timm's `VisionTransformer` layout.

A MimCo backbone and a timm ViT with a CLS token, absolute position embeddings and pre-norm blocks hold the same
tensors under different names; these functions rename them (never reshape them), so a conversion is exact.
"""

from __future__ import annotations

import re

import torch


# (MimCo backbone name, timm name); `{i}` stands for a block index.
_BACKBONE_RENAMES = [
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.weight", "patch_embed.proj.weight"),
    ("embeddings.patch_embeddings.projection.bias", "patch_embed.proj.bias"),
    ("layers.{i}.layernorm_before.weight", "blocks.{i}.norm1.weight"),
    ("layers.{i}.layernorm_before.bias", "blocks.{i}.norm1.bias"),
    ("layers.{i}.attention.qkv.weight", "blocks.{i}.attn.qkv.weight"),
    ("layers.{i}.attention.qkv.bias", "blocks.{i}.attn.qkv.bias"),
    ("layers.{i}.attention.proj.weight", "blocks.{i}.attn.proj.weight"),
    ("layers.{i}.attention.proj.bias", "blocks.{i}.attn.proj.bias"),
    ("layers.{i}.layernorm_after.weight", "blocks.{i}.norm2.weight"),
    ("layers.{i}.layernorm_after.bias", "blocks.{i}.norm2.bias"),
    ("layers.{i}.mlp.fc1.weight", "blocks.{i}.mlp.fc1.weight"),
    ("layers.{i}.mlp.fc1.bias", "blocks.{i}.mlp.fc1.bias"),
    ("layers.{i}.mlp.fc2.weight", "blocks.{i}.mlp.fc2.weight"),
    ("layers.{i}.mlp.fc2.bias", "blocks.{i}.mlp.fc2.bias"),
    ("layernorm.weight", "norm.weight"),
    ("layernorm.bias", "norm.bias"),
    ("pooler_norm.weight", "fc_norm.weight"),
    ("pooler_norm.bias", "fc_norm.bias"),
]


def _compile(pattern: str) -> re.Pattern:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(\d+)") + "$")


_MIMCO_TO_TIMM = [(_compile(mimco), timm) for mimco, timm in _BACKBONE_RENAMES]
_TIMM_TO_MIMCO = [(_compile(timm), mimco) for mimco, timm in _BACKBONE_RENAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> str | None:
    for pattern, target in table:
        match = pattern.match(name)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    return None


def timm_to_mimco_state_dict(timm_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a timm `VisionTransformer` state dict to `MimCoModel` names.

    The classification head (`head.*`) is dropped. Any other name that has no MimCo counterpart raises a
    `ValueError` naming it, so an incompatible checkpoint (layer scale, register tokens...) is never loaded
    partially.
    """
    converted = {}
    for name, tensor in timm_state_dict.items():
        if name.startswith("head."):
            continue
        new_name = _rename(name, _TIMM_TO_MIMCO)
        if new_name is None:
            raise ValueError(f"timm weight {name!r} has no counterpart in MimCoModel.")
        converted[new_name] = tensor
    return converted


def mimco_to_timm_state_dict(mimco_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames a `MimCoModel` (or `MimCoForImageClassification`) state dict to timm `VisionTransformer` names.

    The mask token, which timm's ViT lacks, is dropped; a classifier becomes timm's `head`.
    """
    converted = {}
    for name, tensor in mimco_state_dict.items():
        if name.startswith("mimco."):
            name = name[len("mimco.") :]
        if name == "embeddings.mask_token":
            continue
        if name.startswith("classifier."):
            converted["head." + name[len("classifier.") :]] = tensor
            continue
        new_name = _rename(name, _MIMCO_TO_TIMM)
        if new_name is None:
            raise ValueError(f"MimCo weight {name!r} has no counterpart in timm's VisionTransformer.")
        converted[new_name] = tensor
    return converted


__all__ = ["mimco_to_timm_state_dict", "timm_to_mimco_state_dict"]
