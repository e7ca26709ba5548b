"""A model folder written before the code was reorganised still loads, and today's folders have the same layout.

`tests/fixtures/folder_layout_e0b733f.json` holds what `save_pretrained` wrote for each model class at the tiny test
shape at commit e0b733f (`tests/helpers/record_folder_layout.py` says how it was recorded). Each test rebuilds such a
folder (the recorded `config.json`, seeded random weights of the recorded names, shapes and dtypes) and loads it with
today's classes and evaluation loader.
"""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from modeling_mimco import (
    MimCoForContrastivePreTraining,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.interop.model_folders import load_backbone


LAYOUT_PATH = os.path.join(os.path.dirname(__file__), "fixtures", "folder_layout_e0b733f.json")
with open(LAYOUT_PATH) as _handle:
    LAYOUT = json.load(_handle)

CLASSES = {
    "MimCoModel": MimCoModel,
    "MimCoForPreTraining": MimCoForPreTraining,
    "MimCoForImageClassification": MimCoForImageClassification,
    "MimCoForContrastivePreTraining": MimCoForContrastivePreTraining,
}


def write_recorded_folder(folder, class_name: str) -> dict[str, torch.Tensor]:
    """Writes a folder with the recorded config and weight layout of `class_name`; returns the weights written."""
    record = LAYOUT[class_name]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(record["config"], handle)
    generator = torch.Generator().manual_seed(0)
    weights = {}
    for name, spec in record["weights"].items():
        dtype = {"F32": torch.float32, "I64": torch.int64}[spec["dtype"]]
        if dtype.is_floating_point:
            weights[name] = torch.randn(spec["shape"], generator=generator, dtype=dtype)
        else:
            weights[name] = torch.randint(0, 5, spec["shape"], generator=generator, dtype=dtype)
    save_file(weights, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return weights


@pytest.mark.parametrize("class_name", sorted(CLASSES))
def test_recorded_folder_loads_every_weight(tmp_path, class_name):
    weights = write_recorded_folder(tmp_path / class_name, class_name)
    model, info = CLASSES[class_name].from_pretrained(tmp_path / class_name, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    state = model.state_dict()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("class_name", sorted(CLASSES))
def test_todays_models_keep_the_recorded_layout(tmp_path, class_name):
    """What today's code saves is what the earlier release wrote, plus the backbone fields at their defaults (so that
    release loads today's folders too)."""
    record = LAYOUT[class_name]
    config_class = CLASSES[class_name].config_class
    config_dict = dict(record["config"])
    model = CLASSES[class_name](config_class.from_dict(config_dict))
    model.save_pretrained(tmp_path)
    # the weights and the config; which remote-code files ride along is the remote-code tests' business
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    shapes = {name: list(tensor.shape) for name, tensor in model.state_dict().items()}
    assert shapes == {name: spec["shape"] for name, spec in record["weights"].items()}
    with open(tmp_path / "config.json") as handle:
        saved = json.load(handle)
    saved.pop("transformers_version", None)
    assert without_backbone_fields(saved) == record["config"]


# What the config has gained since the record: `MimCoBackbone`'s fields, saved in every MimCo config (the student's,
# its teacher's, stage 1's encoder), the backbone in `auto_map`, and stage 1's own `auto_map` (its folder loads as
# remote code too). An earlier release keeps them as unknown attributes and loads the folder as before.
STAGE1_AUTO_MAP = {
    "AutoConfig": "configuration_mimco.MimCoContrastiveConfig",
    "AutoModelForPreTraining": "modeling_mimco_contrastive.MimCoForContrastivePreTraining",
}
BACKBONE_FIELDS = (
    "out_features",
    "out_indices",
    "stage_names",
    "apply_layernorm",
    "reshape_hidden_states",
    "use_feature_pyramid",
)


def without_backbone_fields(config: dict) -> dict:
    """A saved config (a dict) without the backbone fields, after checking that they hold their defaults."""
    config = dict(config)
    if config.get("model_type") == "mimco":
        depth = config["num_hidden_layers"]
        added = {name: config.pop(name) for name in BACKBONE_FIELDS}
        assert added == {
            "out_features": [f"stage{depth}"],
            "out_indices": [depth],
            "stage_names": ["stem"] + [f"stage{index}" for index in range(1, depth + 1)],
            "apply_layernorm": True,
            "reshape_hidden_states": True,
            "use_feature_pyramid": False,
        }
    if config.get("model_type") == "mimco_contrastive":
        assert config.pop("auto_map") == STAGE1_AUTO_MAP
    if "auto_map" in config:
        config["auto_map"] = dict(config["auto_map"])
        assert config["auto_map"].pop("AutoBackbone") == "modeling_mimco.MimCoBackbone"
    for name in ("teacher_config", "backbone_config"):
        if isinstance(config.get(name), dict):
            config[name] = without_backbone_fields(config[name])
    return config


def test_recorded_folders_load_as_evaluation_backbones(tmp_path):
    """The evaluation loader reads the student of a stage-2 folder and the momentum encoder of a stage-1 folder."""
    stage2 = write_recorded_folder(tmp_path / "stage2", "MimCoForPreTraining")
    backbone = load_backbone(str(tmp_path / "stage2"))
    torch.testing.assert_close(
        backbone.model.state_dict()["embeddings.cls_token"], stage2["mimco.embeddings.cls_token"], rtol=0, atol=0
    )

    stage1 = write_recorded_folder(tmp_path / "stage1", "MimCoForContrastivePreTraining")
    backbone = load_backbone(str(tmp_path / "stage1"))
    momentum = {
        name[len("momentum_encoder.") :]: t for name, t in stage1.items() if name.startswith("momentum_encoder.")
    }
    assert momentum, "the record has no momentum encoder weights"
    state = backbone.model.state_dict()
    for name, tensor in momentum.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
