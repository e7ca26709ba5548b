"""Checkpoint conversion between MimCo and timm-style Vision Transformers (timm, MoCo v3, DINO).

A MimCo backbone and a timm `VisionTransformer` with a CLS token, absolute position embeddings and pre-norm blocks
hold the same tensors under different names (see `vit_checkpoints.py`, which reads checkpoints and renames their
weights), so a conversion is exact. This module makes one model out of the other:

* `convert_checkpoint_to_mimco`: a MoCo v3, DINO or timm checkpoint file becomes a `MimCoModel`. Every tensor is
  checked against the target config (a mismatch raises `ValueError` naming the key and both shapes) and the
  position embeddings are resampled bicubically when the target resolution differs. The folder it writes
  (safetensors, `config.json`, `preprocessor_config.json` for `ViTImageProcessor`) is what
  `MimCoForPreTraining.from_teacher(folder)` takes as a stage-2 teacher.
* `convert_mimco_to_timm`: a MimCo checkpoint folder becomes a timm state dict as `.safetensors`, together with
  the `timm.create_model` keyword arguments that rebuild the architecture.

The command-line front end is `mimco-convert` (`modeling_mimco/commands/convert_checkpoint.py`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from modeling_mimco.configuration_mimco import MimCoConfig
from modeling_mimco.interop.model_folders import load_mimco_checkpoint, save_image_processor
from modeling_mimco.interop.vit_checkpoints import (
    TIMM_VIT_FAMILIES,
    add_class_position,
    default_mask_patch_size,
    detect_source_format,
    extract_vit_state_dict,
    infer_mimco_config,
    load_checkpoint_file,
    mimco_name_for,
    mimco_to_timm_state_dict,
    select_state_dict,
    timm_name_for,
    timm_to_mimco_state_dict,
)
from modeling_mimco.modeling_mimco import PRETRAINING_ONLY_PREFIXES, MimCoModel, resample_position_embeddings


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
    state_dict = dict(add_class_position(state_dict, source, origin))
    grid_size = config.image_size // config.patch_size
    state_dict["pos_embed"] = resample_position_embeddings(state_dict["pos_embed"], grid_size, grid_size)

    mimco_names = {}
    for name in state_dict:
        mimco_name = mimco_name_for(name)
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
        if tensor.shape != expected[name].shape:
            raise ValueError(
                f"{source}: weight {source_key!r} has shape {tuple(tensor.shape)} but the target config expects "
                f"{tuple(expected[name].shape)} (MimCo {name!r})."
            )
    missing = [name for name in expected if name not in converted]
    if missing:
        timm_missing = [timm_name_for(name) or name for name in missing]
        raise ValueError(f"{source}: weights missing for the target config: {timm_missing}.")
    model.load_state_dict(converted, strict=True)
    model.eval()
    return model, notes


def save_mimco_folder(model: MimCoModel, output_dir: str | Path) -> None:
    """Writes `model` with `save_pretrained` (safetensors, `config.json` with `auto_map`, code files) and a
    `ViTImageProcessor` (`preprocessor_config.json`) that resizes to the model's resolution bicubically and normalises
    with its `image_mean`/`image_std`."""
    config = model.config
    model.save_pretrained(output_dir)
    save_image_processor(output_dir, config.image_size, list(config.image_mean), list(config.image_std))


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
        values.update(image_size=image_size, mask_patch_size=default_mask_patch_size(image_size, config.patch_size))
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
        if name.startswith(PRETRAINING_ONLY_PREFIXES):
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
        grid_size = image_size // config.patch_size
        converted["pos_embed"] = resample_position_embeddings(converted["pos_embed"], grid_size, grid_size)
        notes.append(f"position embeddings resampled (bicubic) from {config.image_size} to {image_size} px.")
    num_classes = converted["head.weight"].shape[0] if "head.weight" in converted else 0
    kwargs = timm_create_model_kwargs(config, num_classes=num_classes, image_size=image_size)

    expected = expected_timm_shapes(kwargs)
    for name, tensor in converted.items():
        if name not in expected:
            raise ValueError(f"{source}: weight {name!r} has no place in the timm ViT that the config describes.")
        if tuple(tensor.shape) != expected[name]:
            raise ValueError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)} but the config implies {expected[name]}."
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
    "build_mimco_model",
    "convert_checkpoint_to_mimco",
    "convert_mimco_to_timm",
    "expected_timm_shapes",
    "format_timm_create_model_call",
    "mimco_checkpoint_to_timm",
    "save_mimco_folder",
    "timm_create_model_kwargs",
    "timm_model_name_for",
]
