"""AdamW and its parameter groups, for pre-training and for fine-tuning.

This module owns which parameters get weight decay (not norms, biases, the learned tokens and the position
embeddings), the fused AdamW of the pre-training loops (`build_adamw`) and their device-side skip of a bad update
(`skip_update_if`), and the fine-tuning recipe's layer-wise learning-rate decay (`layer_decay_parameter_groups`:
block `i` of `L` gets `learning_rate * layer_decay ** (L - i)`, the embeddings the lowest rate, the head the full
one). It imports torch and accelerate, nothing else of the package.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn


# Parameters that AdamW must not decay: norms and biases (1-D) and the learned tokens and position embeddings.
NO_WEIGHT_DECAY_NAMES = ("cls_token", "mask_token", "position_embeddings")


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Splits the trainable parameters into a decayed and a non-decayed AdamW group."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or any(token in name for token in NO_WEIGHT_DECAY_NAMES):
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_adamw(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, fused into one kernel per device where PyTorch offers it."""
    groups = parameter_groups(model, weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, foreach=True)


def skip_update_if(optimizer, bad: torch.Tensor, accelerator: Accelerator) -> None:
    """Makes the coming `optimizer.step()` a no-op when `bad` (a 0-dim bool tensor) is true.

    The fused AdamW kernel reads a `found_inf` flag on the device, so the decision costs no host-device sync. With
    fp16 loss scaling, Accelerate's gradient scaler already skips non-finite steps; an unfused optimizer needs one
    synchronising check.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    if accelerator.scaler is not None:
        return
    if inner.defaults.get("fused"):
        inner.found_inf = bad.float()
    elif bool(bad):
        optimizer.zero_grad(set_to_none=True)


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


__all__ = ["build_adamw", "layer_decay_parameter_groups", "parameter_groups", "skip_update_if"]
