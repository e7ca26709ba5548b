"""Checkpoint conversion between MimCo and timm-style Vision Transformers (timm, MoCo v3, DINO).

A MimCo backbone and a timm `VisionTransformer` with a CLS token, absolute position embeddings and pre-norm blocks
hold the same tensors under different names. `timm_to_mimco_state_dict` and `mimco_to_timm_state_dict` rename them
(never reshape them), so a conversion is exact. Around them this module

* reads checkpoints safely: `.safetensors` with safetensors, every pickle with `torch.load(..., weights_only=True)`
  (a pickle that needs anything but tensors and plain containers is refused with a `ValueError`);
* unpacks the official layouts: MoCo v3 (`state_dict` with `module.base_encoder.*` / `module.momentum_encoder.*`,
  projector `head.*` and `module.predictor.*` ignored), DINO (a plain timm-style state dict, or a full training
  checkpoint whose `teacher` / `student` entries hold `backbone.*` keys) and any timm `VisionTransformer`;
* infers the `MimCoConfig` from the tensors' shapes (see `infer_mimco_config`), checks every tensor against the
  target config (a mismatch raises `ValueError` naming the key and both shapes) and resamples the position
  embeddings bicubically when the target resolution differs;
* writes a `MimCoModel` folder (safetensors, `config.json`, `preprocessor_config.json` for `ViTImageProcessor`) that
  `MimCoForPreTraining.from_teacher(folder)` takes as a stage-2 teacher, or a timm state dict as `.safetensors`
  together with the `timm.create_model` keyword arguments that rebuild the architecture.

The command-line front end is `scripts/convert_checkpoint.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .configuration_mimco import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MimCoConfig
from .modeling_mimco import MimCoModel


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


# ------------------------------------------------------------------------------------------------------------------
# Reading checkpoints safely

SOURCE_FORMATS = ("auto", "mocov3", "dino", "timm")
MOCOV3_ENCODERS = ("momentum", "base")

# Classes a weights-only unpickler may rebuild besides tensors and plain containers. `argparse.Namespace` only sets
# attributes (no code runs); DINO's full training checkpoints store their arguments in one.
_EXTRA_SAFE_GLOBALS = [argparse.Namespace]
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL\s+([\w.]+)")


def load_checkpoint_file(path: str | Path) -> Any:
    """Reads a checkpoint file without ever running code from it.

    `.safetensors` files are read with safetensors; anything else is unpickled by `torch.load` with
    `weights_only=True`, which rebuilds tensors and plain containers only. A pickle that references any other
    callable (a class with a malicious `__reduce__`, for instance) is refused with a `ValueError` naming the file and
    the callable.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such checkpoint file.")
    if path.name.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{path}: not a readable safetensors file ({error}).") from None
    try:
        with torch.serialization.safe_globals(_EXTRA_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = _GLOBAL_IN_MESSAGE.search(str(error))
        if found is not None:
            raise ValueError(
                f"{path}: refused to load. The pickle references `{found.group(1)}`, which a weights-only load does "
                "not allow: the file holds more than tensors and plain containers and could run code when unpickled. "
                "Convert only checkpoints from sources you trust, saved as a plain state dict (or as safetensors)."
            ) from None
        raise ValueError(
            f"{path}: not a PyTorch checkpoint that a weights-only load can read ({_first_line(error)})."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: could not be read as a PyTorch checkpoint ({_first_line(error)}).") from None


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _is_tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def select_state_dict(checkpoint: Any, source: str, checkpoint_key: str | None = None) -> dict[str, torch.Tensor]:
    """The `{name: tensor}` dict inside a loaded checkpoint.

    With `checkpoint_key`, that top-level entry; otherwise the checkpoint itself when it is a flat dict of tensors, or
    else its first entry among `state_dict` (MoCo v3, timm training checkpoints), `model`, `teacher` (DINO training
    checkpoints) and `module`.
    """
    if checkpoint_key is not None:
        if not isinstance(checkpoint, dict) or checkpoint_key not in checkpoint:
            entries = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else []
            raise ValueError(f"{source}: no top-level entry {checkpoint_key!r}; the entries are {entries}.")
        checkpoint = checkpoint[checkpoint_key]
    elif isinstance(checkpoint, dict) and not _is_tensor_dict(checkpoint):
        for key in ("state_dict", "model", "teacher", "module"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not checkpoint:
        raise ValueError(
            f"{source}: no state dict found (expected a dict of tensors, got {type(checkpoint).__name__})."
        )
    for name, value in checkpoint.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{source}: entry {name!r} is a {type(value).__name__}, not a tensor; pass `--checkpoint_key` to pick "
                "the entry that holds the model's state dict."
            )
    return dict(checkpoint)


def _strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {(name[len(prefix) :] if name.startswith(prefix) else name): tensor for name, tensor in state_dict.items()}


def detect_source_format(state_dict: dict[str, torch.Tensor]) -> str:
    """`"mocov3"` when the keys hold MoCo v3's base/momentum encoders, else `"timm"` (timm and DINO share a layout)."""
    for name in state_dict:
        if name.removeprefix("module.").startswith(("base_encoder.", "momentum_encoder.")):
            return "mocov3"
    return "timm"


def extract_vit_state_dict(
    state_dict: dict[str, torch.Tensor], source_format: str, source: str, encoder: str = "momentum"
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """A timm-named ViT backbone state dict out of a MoCo v3, DINO or timm state dict.

    Returns the backbone tensors, a map from each returned name to the key it had in the file (for error messages),
    and notes on what was skipped.

    * MoCo v3: the `module.{encoder}_encoder.*` tensors (`encoder` is `"momentum"` or `"base"`); the other encoder,
      the predictor (`module.predictor.*`) and the encoder's projector (`head.*`) are skipped.
    * DINO / timm: a `module.` (DDP) prefix is removed; when `backbone.*` keys exist (a DINO training checkpoint),
      only they are kept; a classification or DINO head (`head.*`) is skipped.
    """
    if source_format not in SOURCE_FORMATS:
        raise ValueError(f"`source_format` must be one of {list(SOURCE_FORMATS)}, got {source_format!r}.")
    if source_format == "auto":
        source_format = detect_source_format(state_dict)
    original = {}
    for name in state_dict:
        original[name.removeprefix("module.")] = name
    stripped = _strip_prefix(state_dict, "module.")
    notes = []

    if source_format == "mocov3":
        if encoder not in MOCOV3_ENCODERS:
            raise ValueError(f"`encoder` must be one of {list(MOCOV3_ENCODERS)}, got {encoder!r}.")
        prefix = f"{encoder}_encoder."
        present = sorted({name.split(".", 1)[0] for name in stripped if name.split(".", 1)[0].endswith("_encoder")})
        if not any(name.startswith(prefix) for name in stripped):
            raise ValueError(
                f"{source}: no `module.{prefix}*` keys, so this is not a MoCo v3 checkpoint with a {encoder} encoder "
                f"(encoders found: {present or 'none'}; first keys: {list(state_dict)[:4]})."
            )
        selected = {name[len(prefix) :]: tensor for name, tensor in stripped.items() if name.startswith(prefix)}
        origin = {name[len(prefix) :]: original[name] for name in stripped if name.startswith(prefix)}
        skipped = len(stripped) - len(selected)
        notes.append(f"MoCo v3: loaded the {encoder} encoder; skipped {skipped} tensors (other encoder, predictor).")
    else:
        selected, origin = stripped, {name: original[name] for name in stripped}
        if any(name.startswith("backbone.") for name in selected):
            kept = [name for name in selected if name.startswith("backbone.")]
            notes.append(f"kept the {len(kept)} `backbone.*` tensors, skipped {len(selected) - len(kept)} others.")
            origin = {name[len("backbone.") :]: origin[name] for name in kept}
            selected = {name[len("backbone.") :]: selected[name] for name in kept}

    head = [name for name in selected if name.startswith("head.")]
    if head:
        notes.append(f"skipped the {len(head)} head tensors (`head.*`: projector or classifier).")
    backbone = {name: tensor for name, tensor in selected.items() if not name.startswith("head.")}
    for name in backbone:
        if _rename(name, _TIMM_TO_MIMCO) is None:
            raise ValueError(
                f"{source}: weight {origin[name]!r} has no counterpart in MimCoModel (supported: a timm ViT with a "
                "CLS token, absolute position embeddings, a linear patch embedding and plain pre-norm blocks; layer "
                "scale, register tokens, attention pooling and convolutional stems are not)."
            )
    return backbone, {name: origin[name] for name in backbone}, notes


# ------------------------------------------------------------------------------------------------------------------
# Architecture inference

# timm / DeiT / DINO ViT families: a family word in the model name -> (width, attention heads).
TIMM_VIT_FAMILIES = {
    "tiny": (192, 3),
    "small": (384, 6),
    "base": (768, 12),
    "large": (1024, 16),
    "huge": (1280, 16),
}
# MoCo v3's own ViTs, named by the checkpoint's `arch` entry: its ViT-S has 12 heads of 32 channels (timm's has 6).
MOCOV3_ARCH_HEADS = {"vit_small": (384, 12), "vit_base": (768, 12)}
DEFAULT_HEAD_DIM = 64


def infer_num_attention_heads(
    hidden_size: int, names: list[str | None] | tuple[str | None, ...] = (), source_format: str = "timm"
) -> tuple[int, str]:
    """The number of attention heads, which no tensor shape reveals (the fused qkv projection is `3*D x D` for any
    head count). Returns it with a sentence saying where it came from.

    In order: a MoCo v3 `arch` name (`vit_small`, `vit_base`: 12 heads), or, for a MoCo v3 checkpoint without a
    known `arch`, 12 heads at widths 384 and 768; a family word (`tiny`, `small`, `base`, `large`, `huge`) in one of
    `names` (model name, `arch`, file name) whose timm width equals `hidden_size`; else 64-channel heads. Pass the
    number explicitly (`--num_attention_heads`) whenever the checkpoint follows none of these conventions.
    """
    names = [name.lower() for name in names if name]
    if source_format == "mocov3":
        for name in names:
            if name in MOCOV3_ARCH_HEADS and MOCOV3_ARCH_HEADS[name][0] == hidden_size:
                return MOCOV3_ARCH_HEADS[name][1], f"MoCo v3 arch {name!r}"
        for width, heads in MOCOV3_ARCH_HEADS.values():
            if width == hidden_size:
                return heads, f"MoCo v3 ViT of width {hidden_size}"
    for name in names:
        for family, (width, heads) in TIMM_VIT_FAMILIES.items():
            if family in name and width == hidden_size:
                return heads, f"ViT-{family} preset (from {name!r})"
    if hidden_size % DEFAULT_HEAD_DIM == 0:
        return hidden_size // DEFAULT_HEAD_DIM, f"default {DEFAULT_HEAD_DIM}-channel heads"
    raise ValueError(
        f"Cannot infer the number of attention heads for width {hidden_size} (not a multiple of {DEFAULT_HEAD_DIM}); "
        "pass `--num_attention_heads`."
    )


def _square_root(value: int) -> int | None:
    root = math.isqrt(value)
    return root if root * root == value else None


def _shape(tensor: torch.Tensor) -> tuple[int, ...]:
    return tuple(tensor.shape)


def _require(state_dict: dict[str, torch.Tensor], name: str, source: str) -> torch.Tensor:
    if name not in state_dict:
        raise ValueError(
            f"{source}: weight {name!r} is missing; a ViT with a CLS token, absolute position embeddings and a linear "
            f"patch embedding was expected (first keys: {list(state_dict)[:4]})."
        )
    return state_dict[name]


def add_class_position(
    state_dict: dict[str, torch.Tensor], source: str, origin: dict[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """Checks `pos_embed` and gives it a position for the CLS token when it has none.

    timm models built with `no_embed_class=True` add position embeddings to the patch tokens only; a zero CLS
    position is exactly equivalent, and is what MimCo's layout needs.
    """
    pos_embed = _require(state_dict, "pos_embed", source)
    key = (origin or {}).get("pos_embed", "pos_embed")
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"{source}: weight {key!r} has shape {_shape(pos_embed)}; (1, tokens, width) was expected.")
    tokens = pos_embed.shape[1]
    if _square_root(tokens - 1) is not None:
        return state_dict
    if _square_root(tokens) is not None:
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = torch.cat([pos_embed.new_zeros(1, 1, pos_embed.shape[2]), pos_embed], dim=1)
        return state_dict
    raise ValueError(
        f"{source}: weight {key!r} has shape {_shape(pos_embed)}: {tokens} positions are neither a square grid nor a "
        "square grid plus one CLS position."
    )


def _default_mask_patch_size(image_size: int, patch_size: int, target: int = 32) -> int:
    """The largest multiple of `patch_size` that divides `image_size` and is at most `target` pixels (or one patch)."""
    grid = image_size // patch_size
    best = 1
    for multiple in range(1, grid + 1):
        if grid % multiple == 0 and multiple * patch_size <= max(target, patch_size):
            best = multiple
    return best * patch_size


def infer_mimco_config(
    state_dict: dict[str, torch.Tensor],
    source: str = "state dict",
    source_format: str = "timm",
    num_attention_heads: int | None = None,
    names: list[str | None] | tuple[str | None, ...] = (),
    image_size: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    origin: dict[str, str] | None = None,
) -> tuple[MimCoConfig, list[str]]:
    """Builds the `MimCoConfig` that a timm-named ViT state dict fits, from the tensors' shapes.

    * `hidden_size`, `num_channels`, `patch_size`: `patch_embed.proj.weight` `(D, C, P, P)`;
    * `num_hidden_layers`: the number of `blocks.{i}` (indices must run from 0 without gaps);
    * `intermediate_size`: `blocks.0.mlp.fc1.weight` (the MLP ratio is its width over `hidden_size`);
    * `qkv_bias`: whether `blocks.0.attn.qkv.bias` exists;
    * `image_size`: the `pos_embed` grid times the patch size, unless `image_size` asks for another resolution
      (the position embeddings are then resampled by `build_mimco_model`);
    * `pooling`: `"mean"` when the checkpoint has timm's `fc_norm` (average pooling), else `"cls"`;
    * `num_attention_heads`: given, or `infer_num_attention_heads(hidden_size, names, source_format)`;
    * `position_embedding_type`: `"sincos"` for MoCo v3 (fixed 2-D sin-cos, kept as stored), else `"learned"`.

    timm, MoCo v3 and DINO ViTs all use exact GELU and LayerNorm eps 1e-6, which the config keeps. Shapes that
    contradict each other raise `ValueError` naming the key and the shapes.
    """
    origin = origin or {}

    def key(name: str) -> str:
        return origin.get(name, name)

    notes = []
    projection = _require(state_dict, "patch_embed.proj.weight", source)
    if projection.ndim != 4 or projection.shape[2] != projection.shape[3]:
        raise ValueError(
            f"{source}: weight {key('patch_embed.proj.weight')!r} has shape {_shape(projection)}; a square "
            "convolution kernel (width, channels, patch, patch) was expected."
        )
    hidden_size, num_channels, patch_size = projection.shape[0], projection.shape[1], projection.shape[2]
    cls_token = _require(state_dict, "cls_token", source)
    if _shape(cls_token) != (1, 1, hidden_size):
        raise ValueError(
            f"{source}: weight {key('cls_token')!r} has shape {_shape(cls_token)} but the patch embedding "
            f"{key('patch_embed.proj.weight')!r} {_shape(projection)} implies (1, 1, {hidden_size})."
        )
    pos_embed = _require(state_dict, "pos_embed", source)
    grid = _square_root(pos_embed.shape[1] - 1)
    if pos_embed.ndim != 3 or grid is None:
        raise ValueError(
            f"{source}: weight {key('pos_embed')!r} has shape {_shape(pos_embed)}; (1, 1 + grid**2, width) was expected."
        )
    checkpoint_image_size = grid * patch_size

    block_indices = sorted(
        {int(match.group(1)) for name in state_dict if (match := re.match(r"blocks\.(\d+)\.", name))}
    )
    if not block_indices:
        raise ValueError(f"{source}: no transformer blocks (`blocks.{{i}}.*` weights) found.")
    for expected, index in enumerate(block_indices):
        if expected != index:
            raise ValueError(f"{source}: the block indices are not contiguous: block {expected} is missing.")
    fc1 = _require(state_dict, "blocks.0.mlp.fc1.weight", source)
    if fc1.ndim != 2:
        raise ValueError(
            f"{source}: weight {key('blocks.0.mlp.fc1.weight')!r} has shape {_shape(fc1)}; 2 dims expected."
        )
    intermediate_size = fc1.shape[0]
    qkv_bias = "blocks.0.attn.qkv.bias" in state_dict
    pooling = "mean" if "fc_norm.weight" in state_dict else "cls"

    if num_attention_heads is None:
        num_attention_heads, reason = infer_num_attention_heads(hidden_size, names, source_format)
        notes.append(f"num_attention_heads={num_attention_heads} ({reason}).")
    elif num_attention_heads <= 0 or hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"`num_attention_heads` ({num_attention_heads}) must divide the width {hidden_size} of "
            f"{key('patch_embed.proj.weight')!r}."
        )

    if image_size is None:
        image_size = checkpoint_image_size
    elif image_size <= 0 or image_size % patch_size != 0:
        raise ValueError(
            f"`image_size` ({image_size}) must be a positive multiple of the patch size {patch_size} of "
            f"{key('patch_embed.proj.weight')!r} {_shape(projection)}."
        )
    if image_size != checkpoint_image_size:
        notes.append(
            f"position embeddings resampled (bicubic) from {grid}x{grid} to {image_size // patch_size}x"
            f"{image_size // patch_size} patches ({checkpoint_image_size} -> {image_size} px)."
        )

    if image_mean is None and image_std is None and num_channels != len(IMAGENET_DEFAULT_MEAN):
        image_mean, image_std = [0.5] * num_channels, [0.5] * num_channels
        notes.append(f"{num_channels} input channels: pixel mean/std set to 0.5 (pass --image_mean/--image_std).")
    config = MimCoConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=len(block_indices),
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias=qkv_bias,
        position_embedding_type="sincos" if source_format == "mocov3" else "learned",
        pooling=pooling,
        mask_patch_size=_default_mask_patch_size(image_size, patch_size),
        image_mean=list(image_mean) if image_mean is not None else list(IMAGENET_DEFAULT_MEAN),
        image_std=list(image_std) if image_std is not None else list(IMAGENET_DEFAULT_STD),
    )
    return config, notes


def resample_position_embeddings(position_embeddings: torch.Tensor, grid_size: int) -> torch.Tensor:
    """Resamples `(1, 1 + g*g, D)` position embeddings to a `grid_size` x `grid_size` patch grid.

    The CLS position is kept; the patch positions are resized bicubically with antialiasing, exactly as
    `MimCoEmbeddings.interpolate_pos_encoding` (and timm's `resample_abs_pos_embed`) do at run time.
    """
    class_position, patch_positions = position_embeddings[:, :1], position_embeddings[:, 1:]
    old_grid = _square_root(patch_positions.shape[1])
    if old_grid is None:
        raise ValueError(f"Position embeddings of shape {_shape(position_embeddings)} are not 1 + a square grid.")
    if old_grid == grid_size:
        return position_embeddings
    dim = patch_positions.shape[-1]
    patch_positions = patch_positions.float().reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2)
    patch_positions = F.interpolate(
        patch_positions, size=(grid_size, grid_size), mode="bicubic", align_corners=False, antialias=True
    )
    patch_positions = patch_positions.permute(0, 2, 3, 1).reshape(1, grid_size * grid_size, dim)
    return torch.cat([class_position, patch_positions.to(class_position.dtype)], dim=1)


# ------------------------------------------------------------------------------------------------------------------
# timm / MoCo v3 / DINO -> MimCo


def build_mimco_model(
    state_dict: dict[str, torch.Tensor],
    config: MimCoConfig,
    source: str = "state dict",
    origin: dict[str, str] | None = None,
) -> tuple[MimCoModel, list[str]]:
    """A `MimCoModel` for `config` holding the tensors of a timm-named ViT state dict.

    Every tensor is checked against the model that `config` describes: a missing or extra weight, or a shape that
    differs, raises `ValueError` naming the checkpoint key and both shapes. The position embeddings are resampled
    when `config.image_size` asks for another grid. timm has no mask token: it is set to zeros (a teacher never
    uses it; a student learns it).
    """
    origin = origin or {}
    notes = []
    state_dict = add_class_position(state_dict, source, origin)
    grid_size = config.image_size // config.patch_size
    if _square_root(state_dict["pos_embed"].shape[1] - 1) != grid_size:
        state_dict = dict(state_dict)
        state_dict["pos_embed"] = resample_position_embeddings(state_dict["pos_embed"], grid_size)

    mimco_names = {}
    for name in state_dict:
        mimco_name = _rename(name, _TIMM_TO_MIMCO)
        if mimco_name is None and not name.startswith("head."):
            raise ValueError(f"{source}: weight {origin.get(name, name)!r} has no counterpart in MimCoModel.")
        mimco_names[mimco_name] = origin.get(name, name)
    converted = timm_to_mimco_state_dict(state_dict)

    model = MimCoModel(config)
    expected = model.state_dict()
    if config.pooling == "mean" and "layernorm.weight" not in converted and "pooler_norm.weight" in converted:
        # timm's average-pooled ViTs normalise only the pooled feature (fc_norm); MimCo also normalises the tokens.
        converted["layernorm.weight"] = torch.ones_like(expected["layernorm.weight"])
        converted["layernorm.bias"] = torch.zeros_like(expected["layernorm.bias"])
        notes.append("the checkpoint has no final `norm` (timm average pooling): `layernorm` set to identity weights.")
    converted.setdefault("embeddings.mask_token", torch.zeros_like(expected["embeddings.mask_token"]))

    for name, tensor in converted.items():
        source_key = mimco_names.get(name, name)
        if name not in expected:
            raise ValueError(f"{source}: weight {source_key!r} has no place in a MimCoModel with the target config.")
        if _shape(tensor) != _shape(expected[name]):
            raise ValueError(
                f"{source}: weight {source_key!r} has shape {_shape(tensor)} but the target config expects "
                f"{_shape(expected[name])} (MimCo {name!r})."
            )
    missing = [name for name in expected if name not in converted]
    if missing:
        timm_missing = [_rename(name, _MIMCO_TO_TIMM) or name for name in missing]
        raise ValueError(f"{source}: weights missing for the target config: {timm_missing}.")
    model.load_state_dict(converted, strict=True)
    model.eval()
    return model, notes


def save_mimco_folder(model: MimCoModel, output_dir: str | Path) -> None:
    """Writes `model` with `save_pretrained` (safetensors, `config.json` with `auto_map`, code files) and a
    `ViTImageProcessor` (`preprocessor_config.json`) that resizes to the model's resolution bicubically and normalises
    with its `image_mean`/`image_std`."""
    from transformers import ViTImageProcessor
    from transformers.image_utils import PILImageResampling

    config = model.config
    model.save_pretrained(output_dir)
    processor = ViTImageProcessor(
        do_resize=True,
        size={"height": config.image_size, "width": config.image_size},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        do_normalize=True,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )
    processor.save_pretrained(output_dir)


def convert_checkpoint_to_mimco(
    input_path: str | Path,
    output_dir: str | Path | None = None,
    source_format: str = "auto",
    encoder: str = "momentum",
    checkpoint_key: str | None = None,
    num_attention_heads: int | None = None,
    model_name: str | None = None,
    image_size: int | None = None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    config: MimCoConfig | None = None,
) -> tuple[MimCoModel, list[str]]:
    """Converts a MoCo v3, DINO or timm ViT checkpoint file into a `MimCoModel`, saved to `output_dir` if given.

    `config`, when given, is the target: the checkpoint is checked against it instead of against the inferred one
    (its `image_size` still triggers position-embedding resampling). Returns the model and notes on what was done.
    """
    source = str(input_path)
    checkpoint = load_checkpoint_file(input_path)
    arch = checkpoint.get("arch") if isinstance(checkpoint, dict) and isinstance(checkpoint.get("arch"), str) else None
    state_dict = select_state_dict(checkpoint, source, checkpoint_key)
    if source_format == "auto":
        source_format = detect_source_format(state_dict)
    backbone, origin, notes = extract_vit_state_dict(state_dict, source_format, source, encoder)
    backbone = add_class_position(backbone, source, origin)
    if config is None:
        config, config_notes = infer_mimco_config(
            backbone,
            source=source,
            source_format=source_format,
            num_attention_heads=num_attention_heads,
            names=(model_name, arch, Path(input_path).name),
            image_size=image_size,
            image_mean=image_mean,
            image_std=image_std,
            origin=origin,
        )
        notes += config_notes
    elif image_size is not None and image_size != config.image_size:
        values = config.to_dict()
        values.update(image_size=image_size, mask_patch_size=_default_mask_patch_size(image_size, config.patch_size))
        config = MimCoConfig.from_dict(values)
    model, build_notes = build_mimco_model(backbone, config, source, origin)
    notes += build_notes
    if output_dir is not None:
        save_mimco_folder(model, output_dir)
    return model, notes


# ------------------------------------------------------------------------------------------------------------------
# MimCo -> timm

# MimCo `hidden_act` -> timm `act_layer` (None: timm's default, exact GELU).
_TIMM_ACT_LAYERS = {
    "gelu": None,
    "gelu_pytorch_tanh": "gelu_tanh",
    "quick_gelu": "quick_gelu",
    "relu": "relu",
    "silu": "silu",
}
TIMM_LAYER_NORM_EPS = 1e-6


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


def timm_model_name_for(config: MimCoConfig) -> str:
    """A timm model name whose defaults are closest to `config` (`vit_small_patch16_224`...). The keyword arguments
    of `timm_create_model_kwargs` set every architecture field anyway; the name only picks timm's defaults and
    checkpoint filter. Falls back to `vit_base_patch16_224` when timm has no such model."""
    candidates = []
    for family, (width, _) in TIMM_VIT_FAMILIES.items():
        if width == config.hidden_size:
            candidates += [
                f"vit_{family}_patch{config.patch_size}_{config.image_size}",
                f"vit_{family}_patch{config.patch_size}_224",
            ]
    try:
        import timm
    except ImportError:
        return candidates[0] if candidates else "vit_base_patch16_224"
    for name in candidates:
        if timm.is_model(name):
            return name
    return "vit_base_patch16_224"


def timm_create_model_kwargs(config: MimCoConfig, num_classes: int = 0, image_size: int | None = None) -> dict:
    """Keyword arguments of `timm.create_model` that build the `VisionTransformer` matching `config`.

    Raises `ValueError` naming the field when timm's ViT cannot express the config (a LayerNorm eps other than
    timm's 1e-6, an activation without a timm equivalent, an MLP width that no ratio reproduces).
    """
    if not math.isclose(config.layer_norm_eps, TIMM_LAYER_NORM_EPS, rel_tol=1e-9):
        raise ValueError(
            f"`layer_norm_eps` is {config.layer_norm_eps}, but timm's VisionTransformer uses {TIMM_LAYER_NORM_EPS}."
        )
    if config.hidden_act not in _TIMM_ACT_LAYERS:
        raise ValueError(
            f"`hidden_act` {config.hidden_act!r} has no timm equivalent here; supported: {sorted(_TIMM_ACT_LAYERS)}."
        )
    mlp_ratio = config.intermediate_size / config.hidden_size
    if int(config.hidden_size * mlp_ratio) != config.intermediate_size:
        raise ValueError(
            f"`intermediate_size` {config.intermediate_size} cannot be expressed as timm's int(hidden_size * mlp_ratio)."
        )
    kwargs = dict(
        img_size=image_size or config.image_size,
        patch_size=config.patch_size,
        in_chans=config.num_channels,
        embed_dim=config.hidden_size,
        depth=config.num_hidden_layers,
        num_heads=config.num_attention_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias,
        class_token=True,
        no_embed_class=False,
        global_pool="avg" if config.pooling == "mean" else "token",
        num_classes=num_classes,
    )
    if config.pooling == "mean":
        kwargs["fc_norm"] = True
    if _TIMM_ACT_LAYERS[config.hidden_act] is not None:
        kwargs["act_layer"] = _TIMM_ACT_LAYERS[config.hidden_act]
    return kwargs


def expected_timm_shapes(kwargs: dict) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the timm `VisionTransformer` that `timm_create_model_kwargs` describes."""
    dim, depth, channels, patch = kwargs["embed_dim"], kwargs["depth"], kwargs["in_chans"], kwargs["patch_size"]
    hidden = int(dim * kwargs["mlp_ratio"])
    grid = kwargs["img_size"] // patch
    shapes = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, 1 + grid * grid, dim),
        "patch_embed.proj.weight": (dim, channels, patch, patch),
        "patch_embed.proj.bias": (dim,),
    }
    for i in range(depth):
        block = f"blocks.{i}."
        shapes.update(
            {
                block + "norm1.weight": (dim,),
                block + "norm1.bias": (dim,),
                block + "attn.qkv.weight": (3 * dim, dim),
                block + "attn.proj.weight": (dim, dim),
                block + "attn.proj.bias": (dim,),
                block + "norm2.weight": (dim,),
                block + "norm2.bias": (dim,),
                block + "mlp.fc1.weight": (hidden, dim),
                block + "mlp.fc1.bias": (hidden,),
                block + "mlp.fc2.weight": (dim, hidden),
                block + "mlp.fc2.bias": (dim,),
            }
        )
        if kwargs["qkv_bias"]:
            shapes[block + "attn.qkv.bias"] = (3 * dim,)
    norm = "fc_norm" if kwargs.get("fc_norm") else "norm"
    shapes.update({f"{norm}.weight": (dim,), f"{norm}.bias": (dim,)})
    if kwargs["num_classes"] > 0:
        shapes.update({"head.weight": (kwargs["num_classes"], dim), "head.bias": (kwargs["num_classes"],)})
    return shapes


def mimco_checkpoint_to_timm(
    config: MimCoConfig,
    state_dict: dict[str, torch.Tensor],
    source: str = "MimCo checkpoint",
    image_size: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict, list[str]]:
    """Converts a MimCo state dict (with its config) to a timm `VisionTransformer` state dict.

    A pre-training checkpoint's teacher and heads are skipped (only the student is exported); the mask token, which
    timm lacks, is dropped; a classifier becomes timm's `head`. With `pooling="mean"`, timm keeps only the pooled
    feature's norm (`fc_norm`), so MimCo's token `layernorm` is dropped: pooled features and logits match, the token
    sequence is not normalised. `image_size` resamples the position embeddings for another resolution. Returns the
    state dict, the `timm.create_model` keyword arguments, and notes.
    """
    notes = []
    student = {}
    skipped = 0
    for name, tensor in state_dict.items():
        if name.startswith(("teacher.", "patch_head.", "image_head.")):
            skipped += 1
            continue
        student[name] = tensor
    if skipped:
        notes.append(f"skipped {skipped} pre-training tensors (teacher and heads); exported the student.")
    try:
        converted = mimco_to_timm_state_dict(student)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    if config.pooling == "mean":
        for name in ("norm.weight", "norm.bias"):
            if converted.pop(name, None) is not None and name.endswith("weight"):
                notes.append("pooling='mean': MimCo's token `layernorm` has no place in timm (fc_norm only); dropped.")
    if image_size is not None and image_size != config.image_size:
        if image_size <= 0 or image_size % config.patch_size != 0:
            raise ValueError(
                f"`image_size` ({image_size}) must be a positive multiple of `patch_size` ({config.patch_size})."
            )
        converted["pos_embed"] = resample_position_embeddings(converted["pos_embed"], image_size // config.patch_size)
        notes.append(f"position embeddings resampled (bicubic) from {config.image_size} to {image_size} px.")
    num_classes = converted["head.weight"].shape[0] if "head.weight" in converted else 0
    kwargs = timm_create_model_kwargs(config, num_classes=num_classes, image_size=image_size)

    expected = expected_timm_shapes(kwargs)
    for name, tensor in converted.items():
        if name not in expected:
            raise ValueError(f"{source}: weight {name!r} has no place in the timm ViT that the config describes.")
        if _shape(tensor) != expected[name]:
            raise ValueError(
                f"{source}: weight {name!r} has shape {_shape(tensor)} but the config implies {expected[name]}."
            )
    missing = sorted(set(expected) - set(converted))
    if missing:
        raise ValueError(f"{source}: weights missing for the config: {missing}.")
    return converted, kwargs, notes


def convert_mimco_to_timm(
    input_dir: str | Path, output_file: str | Path, image_size: int | None = None, model_name: str | None = None
) -> tuple[str, dict, dict, list[str]]:
    """Writes a MimCo checkpoint folder's backbone (and classifier) as a timm `VisionTransformer` `.safetensors`.

    Returns the timm model name, the `create_model` keyword arguments, the `pretrained_cfg_overlay` that loads the
    file, and notes; `format_timm_create_model_call` prints them as one call. The file's metadata repeats the name
    and keyword arguments.
    """
    from safetensors.torch import save_file

    output_file = Path(output_file)
    if not output_file.name.endswith(".safetensors"):
        raise ValueError(f"{output_file}: the timm output must be a `.safetensors` file.")
    config, state_dict = load_mimco_checkpoint(input_dir)
    timm_state_dict, kwargs, notes = mimco_checkpoint_to_timm(config, state_dict, str(input_dir), image_size)
    model_name = model_name or timm_model_name_for(config)
    overlay = dict(
        file=str(output_file),
        num_classes=kwargs["num_classes"],
        input_size=(config.num_channels, kwargs["img_size"], kwargs["img_size"]),
        mean=tuple(config.image_mean),
        std=tuple(config.image_std),
    )
    output_file.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "timm_model_name": model_name, "timm_create_model_kwargs": json.dumps(kwargs)}
    save_file({name: tensor.contiguous() for name, tensor in timm_state_dict.items()}, str(output_file), metadata)
    return model_name, kwargs, overlay, notes


def format_timm_create_model_call(model_name: str, kwargs: dict, overlay: dict | None = None) -> str:
    """A `timm.create_model(...)` call, as Python source, that rebuilds the exported model (and loads its weights
    when `overlay` names the file)."""
    arguments = [repr(model_name)]
    if overlay is not None:
        arguments += ["pretrained=True", f"pretrained_cfg_overlay={overlay!r}"]
    arguments += [f"{name}={value!r}" for name, value in kwargs.items()]
    return f"timm.create_model({', '.join(arguments)})"


__all__ = [
    "add_class_position",
    "build_mimco_model",
    "convert_checkpoint_to_mimco",
    "convert_mimco_to_timm",
    "detect_source_format",
    "expected_timm_shapes",
    "extract_vit_state_dict",
    "format_timm_create_model_call",
    "infer_mimco_config",
    "infer_num_attention_heads",
    "load_checkpoint_file",
    "load_mimco_checkpoint",
    "mimco_checkpoint_to_timm",
    "mimco_to_timm_state_dict",
    "resample_position_embeddings",
    "save_mimco_folder",
    "select_state_dict",
    "timm_create_model_kwargs",
    "timm_model_name_for",
    "timm_to_mimco_state_dict",
]
