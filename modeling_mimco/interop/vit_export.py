"""Export of a MimCo checkpoint folder to a stock `transformers` ViT folder (`mimco-convert --to vit`).

A MimCo backbone with CLS pooling computes what transformers' `ViTModel` computes: the same patch convolution, CLS
token and absolute position table, pre-norm blocks with the same attention scaling and MLP, and a final LayerNorm.
Only the weight names differ, and MimCo fuses query, key and value into one `qkv` projection that ViT keeps as three
(`q_proj`, `k_proj`, `v_proj`, in that order along `qkv`'s output rows). The folder written here is therefore read by
`ViTModel`, `ViTForImageClassification`, `AutoModel` and `AutoModelForImageClassification` without remote code and
without this package: `config.json` is a plain `ViTConfig` (no `auto_map`), no `.py` file is written, and
`preprocessor_config.json` is the `ViTImageProcessor` of the MimCo folder.

* A `MimCoModel` folder becomes a `ViTModel`; a `MimCoForImageClassification` folder a `ViTForImageClassification`
  (its `id2label` / `label2id` kept); a `MimCoForPreTraining` folder exports its student, without teacher and heads.
* ViTModel's pooler (`dense` + `pooler_act` on the final CLS token) is written as the identity (`dense` = I, bias 0,
  `pooler_act="linear"`): its `pooler_output` is then the normalised CLS token, which is MimCo's `pooler_output`.
* What ViT cannot compute is refused with a `ValueError` naming the field and value (`check_vit_exportable`);
  `VIT_EXPORT_FIELDS` says, for every `MimCoConfig` field, how it is carried.

The outputs are equal at the exported resolution. ViT's `interpolate_pos_encoding=True` resamples the position table
with another bicubic kernel than MimCo's (no antialiasing), so at other resolutions the two differ; export with
`image_size` instead, which resamples the table once with MimCo's own resampler.

The weights are written by the installed transformers' own `save_pretrained`, so the folder uses the weight names
that this transformers version saves and loads without renaming.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import PreTrainedModel, ViTConfig, ViTForImageClassification, ViTModel

from modeling_mimco.configuration_mimco import MimCoConfig
from modeling_mimco.interop.model_folders import load_mimco_checkpoint, save_image_processor
from modeling_mimco.modeling_mimco import (
    PRETRAINING_ONLY_PREFIXES,
    get_2d_sincos_position_embeddings,
    resample_position_embeddings,
)


# How each `MimCoConfig` field reaches the exported ViT. "mapped": the ViTConfig field of the same name, same meaning;
# "weights": carried by the exported tensors; "labels": a classifier's labels, kept; "processor": written to
# `preprocessor_config.json`; "refused unless": only the named value has a ViT counterpart, any other is refused;
# "training only": changes training, not what the model computes, and ViT has no such setting (dropped with a note
# when it is set); "pre-training only": used by `MimCoForPreTraining` (masking, heads, losses, teacher), not by the
# exported student; "backbone only": how `MimCoBackbone` picks and shapes its outputs, not carried. The other
# fields of every transformers config (`architectures`, `return_dict`...) are not carried.
VIT_EXPORT_FIELDS: dict[str, str] = {
    "image_size": "mapped",
    "patch_size": "mapped",
    "num_channels": "mapped",
    "hidden_size": "mapped",
    "num_hidden_layers": "mapped",
    "num_attention_heads": "mapped",
    "intermediate_size": "mapped",
    "hidden_act": "mapped",  # both models take the activation from transformers' ACT2FN by this name
    "layer_norm_eps": "mapped",  # ViTConfig.layer_norm_eps sets every LayerNorm, as in MimCo
    "qkv_bias": "mapped",  # ViT's q/k/v projections all have a bias or none, as MimCo's fused qkv
    "hidden_dropout_prob": "mapped",  # training only; ViT has no dropout after the MLP activation (noted)
    "attention_probs_dropout_prob": "mapped",
    "initializer_range": "mapped",
    "position_embedding_type": "weights",  # a sin-cos table is written into ViT's position_embeddings, exactly
    "pooling": "refused unless 'cls'",
    "drop_path_rate": "training only",
    "image_mean": "processor",
    "image_std": "processor",
    "mask_strategy": "pre-training only",
    "mask_ratio": "pre-training only",
    "mask_patch_size": "pre-training only",
    "head_hidden_size": "pre-training only",
    "patch_loss_type": "pre-training only",
    "image_loss_type": "pre-training only",
    "patch_negatives": "pre-training only",
    "patch_temperature": "pre-training only",
    "image_temperature": "pre-training only",
    "patch_loss_weight": "pre-training only",
    "image_loss_weight": "pre-training only",
    "teacher_config": "pre-training only",
    "teacher_image_mean": "pre-training only",
    "teacher_image_std": "pre-training only",
    "teacher_autocast": "pre-training only",
    # `MimCoBackbone`'s choice of outputs; the exported ViTModel returns every layer's output instead
    # (`output_hidden_states=True`), and a pyramid's weights have no ViT counterpart (refused by name)
    "_out_features": "backbone only",
    "_out_indices": "backbone only",
    "use_feature_pyramid": "backbone only",
    "apply_layernorm": "backbone only",
    "reshape_hidden_states": "backbone only",
    # fields of every transformers config that the export carries
    "id2label": "labels",  # a classifier's, kept in the ViTForImageClassification config
    "label2id": "labels",
    "problem_type": "labels",
    "dtype": "weights",  # the weights are written in the checkpoint's dtype
}

_MAPPED_FIELDS = tuple(name for name, handling in VIT_EXPORT_FIELDS.items() if handling == "mapped")

# MimCo backbone weight -> ViTModel weight, for the weights that are renamed only ({i}: a block index).
_RENAMES = {
    "embeddings.cls_token": "embeddings.cls_token",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embeddings.projection.weight",
    "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embeddings.projection.bias",
    "layers.{i}.layernorm_before.weight": "layers.{i}.layernorm_before.weight",
    "layers.{i}.layernorm_before.bias": "layers.{i}.layernorm_before.bias",
    "layers.{i}.attention.proj.weight": "layers.{i}.attention.o_proj.weight",
    "layers.{i}.attention.proj.bias": "layers.{i}.attention.o_proj.bias",
    "layers.{i}.layernorm_after.weight": "layers.{i}.layernorm_after.weight",
    "layers.{i}.layernorm_after.bias": "layers.{i}.layernorm_after.bias",
    "layers.{i}.mlp.fc1.weight": "layers.{i}.mlp.fc1.weight",
    "layers.{i}.mlp.fc1.bias": "layers.{i}.mlp.fc1.bias",
    "layers.{i}.mlp.fc2.weight": "layers.{i}.mlp.fc2.weight",
    "layers.{i}.mlp.fc2.bias": "layers.{i}.mlp.fc2.bias",
    "layernorm.weight": "layernorm.weight",
    "layernorm.bias": "layernorm.bias",
}
# MimCo's fused projection, split along its output rows into ViT's three.
_QKV_SPLIT = ("q_proj", "k_proj", "v_proj")
# used only to replace masked patches in pre-training; ViTModel has it only for masked image modelling
_DROPPED = ("embeddings.mask_token",)


def check_vit_exportable(config: MimCoConfig) -> None:
    """Raises `ValueError` naming the field and value when transformers' ViT cannot compute what `config`
    describes; returns when every field is carried exactly (see `VIT_EXPORT_FIELDS`)."""
    if config.pooling != "cls":
        raise ValueError(
            f"`pooling` is {config.pooling!r}: transformers' ViT pools the CLS token (ViTForImageClassification "
            "classifies `last_hidden_state[:, 0]`, ViTModel's pooler reads it too), so a model that averages its patch "
            "tokens has no exact ViT export; `--to timm` exports it (global_pool='avg')."
        )
    if config.position_embedding_type not in ("learned", "sincos"):
        raise ValueError(f"`position_embedding_type` {config.position_embedding_type!r} has no ViT counterpart.")


# The fields that give a `ViTConfig` a MimCo backbone's shape (the same names in both configs).
VIT_SHAPE_FIELDS = (
    "image_size",
    "patch_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "layer_norm_eps",
    "qkv_bias",
)


def vit_shape_kwargs(config: MimCoConfig) -> dict:
    """`ViTConfig` keyword arguments for a model of `config`'s shape (`VIT_SHAPE_FIELDS`), for the stock-transformers
    models that the benchmarks and the pixel-MIM baseline build beside MimCo; `vit_config_for` is the exact export."""
    return {name: getattr(config, name) for name in VIT_SHAPE_FIELDS}


def vit_config_for(config: MimCoConfig, classifier: bool, image_size: int | None = None) -> ViTConfig:
    """The `ViTConfig` of the export: the backbone fields of `config` (at `image_size` when given), the identity
    pooler (`pooler_act="linear"`, `pooler_output_size=hidden_size`) and, for a classifier, the labels (`id2label`,
    `label2id`, `problem_type`)."""
    check_vit_exportable(config)
    values = {name: getattr(config, name) for name in _MAPPED_FIELDS}
    if image_size is not None:
        values["image_size"] = image_size
    values.update(pooler_output_size=config.hidden_size, pooler_act="linear")
    if classifier:
        values.update(id2label=dict(config.id2label), label2id=dict(config.label2id))
        if config.problem_type is not None:
            values["problem_type"] = config.problem_type
    return ViTConfig(**values)


def _vit_name(mimco_name: str) -> str | None:
    """The ViTModel name of a renamed MimCo backbone weight, or `None` when it is not one of `_RENAMES`."""
    parts = mimco_name.split(".")
    pattern = mimco_name
    if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit():
        pattern = ".".join(["layers", "{i}", *parts[2:]])
        target = _RENAMES.get(pattern)
        return None if target is None else target.replace("{i}", parts[1])
    return _RENAMES.get(pattern)


def mimco_to_vit_state_dict(
    state_dict: dict[str, torch.Tensor], hidden_size: int, source: str = "MimCo checkpoint"
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Renames a MimCo state dict (`MimCoModel`, `MimCoForImageClassification` or `MimCoForPreTraining`) to
    transformers' ViT names.

    Backbone weights get `ViTModel` names (a classifier's and a pre-training model's lose their `mimco.` prefix); the
    fused `qkv` weight `(3 * hidden_size, hidden_size)` and bias `(3 * hidden_size,)` become `q_proj`, `k_proj` and
    `v_proj`; a classifier's `classifier.*` is returned under that name. The teacher and heads of a pre-training
    checkpoint and the mask token are left out. Any other weight raises `ValueError` naming it (ViT has no place for
    it, e.g. register tokens or layer scale). Returns the renamed tensors and notes on what was left out.
    """
    converted: dict[str, torch.Tensor] = {}
    notes = []
    skipped = 0
    for name, tensor in state_dict.items():
        if name.startswith(PRETRAINING_ONLY_PREFIXES):
            skipped += 1
            continue
        if name.startswith("classifier."):
            converted[name] = tensor
            continue
        name = name.removeprefix("mimco.")
        if name in _DROPPED:
            continue
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[2:4] == ["attention", "qkv"]:
            if tensor.shape[0] != 3 * hidden_size:
                raise ValueError(
                    f"{source}: weight {name!r} has shape {tuple(tensor.shape)}; a fused qkv projection has "
                    f"3 * hidden_size = {3 * hidden_size} output rows."
                )
            for projection, part in zip(_QKV_SPLIT, tensor.split(hidden_size, dim=0), strict=True):
                converted[f"layers.{parts[1]}.attention.{projection}.{parts[4]}"] = part.clone()
            continue
        vit_name = _vit_name(name)
        if vit_name is None:
            raise ValueError(
                f"{source}: weight {name!r} has no place in transformers' ViTModel (it has no register tokens, layer "
                "scale, or other weights beyond a plain ViT), so the model cannot be exported exactly."
            )
        converted[vit_name] = tensor
    if skipped:
        notes.append(f"skipped {skipped} pre-training tensors (teacher and heads); exported the student.")
    if any(name.removeprefix("mimco.") in _DROPPED for name in state_dict):
        notes.append("the mask token (used only when pre-training masks patches) has no place in ViTModel; dropped.")
    return converted, notes


def vit_to_mimco_state_dict(
    vit_state_dict: dict[str, torch.Tensor], mimco_names: list[str]
) -> dict[str, torch.Tensor]:
    """The inverse of `mimco_to_vit_state_dict` for a backbone: a `ViTModel` state dict (transformers' names, e.g. the
    `.vit` of a `ViTForMaskedImageModeling`) renamed to the `MimCoModel` weights `mimco_names`, with `q_proj`, `k_proj`
    and `v_proj` fused into `qkv` again; the mask token comes from a ViT built with `use_mask_token` (as
    `ViTForMaskedImageModeling`'s). A MimCo weight with no ViT counterpart raises `KeyError` naming it."""
    state = {}
    for name in mimco_names:
        parts = name.split(".")
        if len(parts) == 5 and parts[0] == "layers" and parts[2:4] == ["attention", "qkv"]:
            prefix = f"layers.{parts[1]}.attention"
            state[name] = torch.cat([vit_state_dict[f"{prefix}.{projection}.{parts[4]}"] for projection in _QKV_SPLIT])
        else:
            state[name] = vit_state_dict[_vit_name(name) or name]
    return state


def _identity_pooler(hidden_size: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """ViTModel's pooler weights that make `pooler_output` the normalised CLS token (with `pooler_act="linear"`)."""
    return {
        "pooler.dense.weight": torch.eye(hidden_size, dtype=dtype),
        "pooler.dense.bias": torch.zeros(hidden_size, dtype=dtype),
    }


def _load_exactly(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Loads `state_dict` into `model`, first checking names and shapes so that a mismatch is one `ValueError`
    naming the weight (torch's own error spans many lines)."""
    expected = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in expected:
            raise ValueError(f"{source}: weight {name!r} has no place in {type(model).__name__}.")
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{source}: weight {name!r} has shape {tuple(tensor.shape)} but {type(model).__name__} expects "
                f"{tuple(expected[name].shape)}."
            )
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise ValueError(f"{source}: weights missing for {type(model).__name__}: {missing}.")
    model.load_state_dict(state_dict, strict=True)


def _training_notes(config: MimCoConfig, position_embeddings: torch.Tensor) -> list[str]:
    """Notes on what the export keeps exactly but behaves otherwise when the ViT is trained further."""
    notes = []
    if config.position_embedding_type == "sincos":
        grid_size = math.isqrt(position_embeddings.shape[1] - 1)
        sincos = get_2d_sincos_position_embeddings(config.hidden_size, grid_size).to(position_embeddings.dtype)
        # the checkpoint's table is what MimCo computes with; it differs from a fresh one when it was resampled
        kind = (
            "fixed 2-D sin-cos table"
            if torch.equal(position_embeddings, sincos)
            else "checkpoint's fixed position table (not a fresh sin-cos table: resampled?)"
        )
        notes.append(
            f"position_embedding_type='sincos': the {kind} is written into ViT's `position_embeddings`, which ViT "
            "trains when fine-tuned (set its requires_grad to False to keep it fixed)."
        )
    if config.drop_path_rate > 0:
        notes.append(
            f"drop_path_rate={config.drop_path_rate}: ViT has no stochastic depth; it acts only in training, so the "
            "outputs are unchanged, but fine-tuning the export runs without it."
        )
    if config.hidden_dropout_prob > 0:
        notes.append(
            f"hidden_dropout_prob={config.hidden_dropout_prob}: MimCo also drops out the MLP's activation, ViT only "
            "the attention and MLP outputs; only training differs."
        )
    return notes


def export_mimco_to_vit(
    input_dir: str | Path, output_dir: str | Path, image_size: int | None = None
) -> tuple[PreTrainedModel, list[str]]:
    """Writes a MimCo checkpoint folder as a stock transformers ViT folder; returns the exported model and notes.

    `input_dir` holds a `MimCoModel`, `MimCoForImageClassification` or `MimCoForPreTraining` (`save_pretrained`).
    With a classifier (`classifier.weight` in the weights) the export is a `ViTForImageClassification`, otherwise a
    `ViTModel` with the identity pooler. `output_dir` gets `config.json` (a `ViTConfig`), `model.safetensors` in the
    checkpoint's dtype, and `preprocessor_config.json` (`ViTImageProcessor`: bicubic resize to `image_size`, the
    config's `image_mean`/`image_std`). A config or weight that ViT cannot carry raises `ValueError` naming it, before
    anything is written. `image_size` exports for another resolution: the position table is resampled as MimCo's
    `interpolate_pos_encoding` does, so the export at that size computes what MimCo computes there.
    """
    source = str(input_dir)
    config, state_dict = load_mimco_checkpoint(input_dir)
    try:
        check_vit_exportable(config)
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None
    converted, notes = mimco_to_vit_state_dict(state_dict, config.hidden_size, source)
    if image_size is not None and image_size != config.image_size:
        if image_size <= 0 or image_size % config.patch_size != 0:
            raise ValueError(
                f"`image_size` ({image_size}) must be a positive multiple of `patch_size` ({config.patch_size})."
            )
        grid_size = image_size // config.patch_size
        name = "embeddings.position_embeddings"
        converted[name] = resample_position_embeddings(converted[name], grid_size, grid_size)
        notes.append(
            f"position embeddings resampled (bicubic, as MimCo's interpolate_pos_encoding) from {config.image_size} "
            f"to {image_size} px."
        )
    image_size = image_size or config.image_size
    classifier = "classifier.weight" in converted
    vit_config = vit_config_for(config, classifier, image_size)
    dtype = converted["embeddings.cls_token"].dtype if "embeddings.cls_token" in converted else torch.float32
    if classifier:
        if converted["classifier.weight"].shape[0] != config.num_labels:
            raise ValueError(
                f"{source}: the classifier has {converted['classifier.weight'].shape[0]} outputs but `num_labels` is "
                f"{config.num_labels}."
            )
        model: PreTrainedModel = ViTForImageClassification(vit_config)
        converted = {
            (name if name.startswith("classifier.") else f"vit.{name}"): tensor for name, tensor in converted.items()
        }
        notes.insert(0, f"exported as ViTForImageClassification ({config.num_labels} labels).")
    else:
        model = ViTModel(vit_config)
        converted.update(_identity_pooler(config.hidden_size, dtype))
        notes.insert(
            0, "exported as ViTModel; its pooler is the identity, so pooler_output is the normalised CLS token."
        )
    model.to(dtype)
    _load_exactly(model, converted, source)
    model.eval()
    position_embeddings = converted[
        "vit.embeddings.position_embeddings" if classifier else "embeddings.position_embeddings"
    ]
    notes += _training_notes(config, position_embeddings)
    notes.append(
        f"outputs equal MimCo's at {image_size} px; ViT's interpolate_pos_encoding resamples the position table with "
        "another bicubic kernel than MimCo's, so for another resolution export with --image_size."
    )

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    save_image_processor(output_dir, image_size, list(config.image_mean), list(config.image_std))
    return model, notes


__all__ = [
    "VIT_EXPORT_FIELDS",
    "check_vit_exportable",
    "export_mimco_to_vit",
    "mimco_to_vit_state_dict",
    "vit_config_for",
]
