"""What a ViT checkpoint holds: reading checkpoint files safely, the MoCo v3 / DINO / timm layouts inside them, the
weight names that a timm `VisionTransformer` and a `MimCoModel` give the same tensors, and the `MimCoConfig` that a
checkpoint's shapes imply.

* Files are read without running code: `.safetensors` with safetensors, every pickle with
  `torch.load(..., weights_only=True)` (a pickle that needs anything but tensors and plain containers is refused with
  a `ValueError`).
* The official layouts are unpacked: MoCo v3 (`state_dict` with `module.base_encoder.*` / `module.momentum_encoder.*`,
  projector `head.*` and `module.predictor.*` ignored), DINO (a plain timm-style state dict, or a full training
  checkpoint whose `teacher` / `student` entries hold `backbone.*` keys) and any timm `VisionTransformer`.
* `timm_to_mimco_state_dict` and `mimco_to_timm_state_dict` rename tensors (never reshape them), so a conversion
  is exact.

`convert.py` builds models from what this module reads. It imports only torch, safetensors and the MimCo config.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from modeling_mimco.configuration_mimco import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, MimCoConfig


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


def mimco_name_for(timm_name: str) -> str | None:
    """The `MimCoModel` name of a timm `VisionTransformer` backbone weight, or `None` when MimCo has no such weight."""
    return _rename(timm_name, _TIMM_TO_MIMCO)


def timm_name_for(mimco_name: str) -> str | None:
    """The timm `VisionTransformer` name of a `MimCoModel` backbone weight, or `None` when timm has no such weight."""
    return _rename(mimco_name, _MIMCO_TO_TIMM)


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
        new_name = mimco_name_for(name)
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
        new_name = timm_name_for(name)
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
        if mimco_name_for(name) is None:
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


def default_mask_patch_size(image_size: int, patch_size: int, target: int = 32) -> int:
    """The largest multiple of `patch_size` that divides `image_size` and is at most `target` pixels (or one patch)."""
    grid = image_size // patch_size
    best = 1
    for multiple in range(1, grid + 1):
        if grid % multiple == 0 and multiple * patch_size <= max(target, patch_size):
            best = multiple
    return best * patch_size


def _patch_embedding_shape(
    state_dict: dict[str, torch.Tensor], source: str, key: Callable[[str], str]
) -> tuple[int, int, int]:
    """`(hidden_size, num_channels, patch_size)` from `patch_embed.proj.weight`, checked against `cls_token`."""
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
    return hidden_size, num_channels, patch_size


def _position_grid_size(state_dict: dict[str, torch.Tensor], source: str, key: Callable[[str], str]) -> int:
    """The side of the patch grid that `pos_embed` `(1, 1 + grid**2, width)` covers."""
    pos_embed = _require(state_dict, "pos_embed", source)
    grid = _square_root(pos_embed.shape[1] - 1)
    if pos_embed.ndim != 3 or grid is None:
        raise ValueError(
            f"{source}: weight {key('pos_embed')!r} has shape {_shape(pos_embed)}; (1, 1 + grid**2, width) was expected."
        )
    return grid


def _num_blocks(state_dict: dict[str, torch.Tensor], source: str) -> int:
    """The number of transformer blocks `blocks.{i}.*`, whose indices must run from 0 without gaps."""
    block_indices = sorted(
        {int(match.group(1)) for name in state_dict if (match := re.match(r"blocks\.(\d+)\.", name))}
    )
    if not block_indices:
        raise ValueError(f"{source}: no transformer blocks (`blocks.{{i}}.*` weights) found.")
    for expected, index in enumerate(block_indices):
        if expected != index:
            raise ValueError(f"{source}: the block indices are not contiguous: block {expected} is missing.")
    return len(block_indices)


def _intermediate_size(state_dict: dict[str, torch.Tensor], source: str, key: Callable[[str], str]) -> int:
    """The MLP width, from `blocks.0.mlp.fc1.weight`."""
    fc1 = _require(state_dict, "blocks.0.mlp.fc1.weight", source)
    if fc1.ndim != 2:
        raise ValueError(
            f"{source}: weight {key('blocks.0.mlp.fc1.weight')!r} has shape {_shape(fc1)}; 2 dims expected."
        )
    return fc1.shape[0]


def _target_image_size(
    image_size: int | None, checkpoint_grid: int, patch_size: int, projection: str
) -> tuple[int, list[str]]:
    """The converted model's resolution: `image_size` when given (checked), else the checkpoint's; with a note
    when the position embeddings will be resampled. `projection` names the patch embedding in errors."""
    checkpoint_image_size = checkpoint_grid * patch_size
    if image_size is None:
        return checkpoint_image_size, []
    if image_size <= 0 or image_size % patch_size != 0:
        raise ValueError(
            f"`image_size` ({image_size}) must be a positive multiple of the patch size {patch_size} of {projection}."
        )
    if image_size == checkpoint_image_size:
        return image_size, []
    grid = image_size // patch_size
    return image_size, [
        f"position embeddings resampled (bicubic) from {checkpoint_grid}x{checkpoint_grid} to {grid}x{grid} patches "
        f"({checkpoint_image_size} -> {image_size} px)."
    ]


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

    hidden_size, num_channels, patch_size = _patch_embedding_shape(state_dict, source, key)
    projection = f"{key('patch_embed.proj.weight')!r} {(hidden_size, num_channels, patch_size, patch_size)}"
    grid = _position_grid_size(state_dict, source, key)
    num_hidden_layers = _num_blocks(state_dict, source)
    intermediate_size = _intermediate_size(state_dict, source, key)

    notes = []
    if num_attention_heads is None:
        num_attention_heads, reason = infer_num_attention_heads(hidden_size, names, source_format)
        notes.append(f"num_attention_heads={num_attention_heads} ({reason}).")
    elif num_attention_heads <= 0 or hidden_size % num_attention_heads != 0:
        raise ValueError(
            f"`num_attention_heads` ({num_attention_heads}) must divide the width {hidden_size} of "
            f"{key('patch_embed.proj.weight')!r}."
        )
    image_size, image_size_notes = _target_image_size(image_size, grid, patch_size, projection)
    notes += image_size_notes
    if image_mean is None and image_std is None and num_channels != len(IMAGENET_DEFAULT_MEAN):
        image_mean, image_std = [0.5] * num_channels, [0.5] * num_channels
        notes.append(f"{num_channels} input channels: pixel mean/std set to 0.5 (pass --image_mean/--image_std).")
    config = MimCoConfig(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=num_channels,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        hidden_act="gelu",
        layer_norm_eps=1e-6,
        qkv_bias="blocks.0.attn.qkv.bias" in state_dict,
        position_embedding_type="sincos" if source_format == "mocov3" else "learned",
        pooling="mean" if "fc_norm.weight" in state_dict else "cls",
        mask_patch_size=default_mask_patch_size(image_size, patch_size),
        image_mean=list(image_mean) if image_mean is not None else list(IMAGENET_DEFAULT_MEAN),
        image_std=list(image_std) if image_std is not None else list(IMAGENET_DEFAULT_STD),
    )
    return config, notes


__all__ = [
    "MOCOV3_ENCODERS",
    "SOURCE_FORMATS",
    "TIMM_VIT_FAMILIES",
    "add_class_position",
    "default_mask_patch_size",
    "detect_source_format",
    "extract_vit_state_dict",
    "infer_mimco_config",
    "infer_num_attention_heads",
    "load_checkpoint_file",
    "mimco_name_for",
    "mimco_to_timm_state_dict",
    "select_state_dict",
    "timm_name_for",
    "timm_to_mimco_state_dict",
]
