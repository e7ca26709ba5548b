"""A saved MimCo folder loads as remote code in a Python process that cannot import this package (a virtual
environment without it, `clean_venv_python`)."""

import json
import textwrap

import pytest
import torch
from helpers.clean_process import run_without_package

from modeling_mimco import MimCoBackbone, MimCoConfig, MimCoForPreTraining


CHILD_SCRIPT = textwrap.dedent(
    """
    import json

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

    checkpoint, inputs_path, results_path = sys.argv[1:4]
    inputs = torch.load(inputs_path, weights_only=True)
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    backbone = AutoModel.from_pretrained(checkpoint, trust_remote_code=True).eval()
    pretraining = AutoModelForPreTraining.from_pretrained(checkpoint, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(
        checkpoint, trust_remote_code=True, num_labels=4
    ).eval()
    with torch.no_grad():
        last_hidden_state = backbone(inputs["pixel_values"]).last_hidden_state
        loss = pretraining(inputs["pixel_values"], bool_masked_pos=inputs["bool_masked_pos"]).loss
        logits = classifier(inputs["pixel_values"]).logits
    torch.save(
        {
            "last_hidden_state": last_hidden_state,
            "loss": loss,
            "classes": [type(config).__name__, type(backbone).__name__, type(pretraining).__name__,
                        type(classifier).__name__],
            "modules": [type(backbone).__module__],
            "logits_shape": list(logits.shape),
        },
        results_path,
    )
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["mimco", "vit"])
def test_saved_folder_loads_as_remote_code_in_a_clean_process(tmp_path, teacher, clean_venv_python):
    from transformers import ViTConfig

    teacher_config = None
    if teacher == "vit":
        teacher_config = ViTConfig(
            image_size=32,
            patch_size=4,
            hidden_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=96,
        )
    config = MimCoConfig(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=16,
        teacher_config=teacher_config,
    )
    torch.manual_seed(0)
    model = MimCoForPreTraining(config).eval()
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)

    saved_config = json.loads((checkpoint / "config.json").read_text())
    assert saved_config["auto_map"]["AutoModel"] == "modeling_mimco.MimCoModel"
    assert saved_config["auto_map"]["AutoModelForImageClassification"] == "modeling_mimco.MimCoForImageClassification"
    for code_file in ("configuration_mimco.py", "modeling_mimco.py", "losses.py", "masking.py", "teacher.py"):
        assert (checkpoint / code_file).is_file(), code_file

    pixel_values = torch.randn(2, 3, 32, 32)
    bool_masked_pos = model.mask_generator.batch(2)
    torch.save({"pixel_values": pixel_values, "bool_masked_pos": bool_masked_pos}, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_tokens = model.mimco(pixel_values).last_hidden_state
        expected_loss = model(pixel_values, bool_masked_pos=bool_masked_pos).loss

    result = run_without_package(
        CHILD_SCRIPT, [checkpoint, tmp_path / "inputs.pt", tmp_path / "out.pt"], tmp_path, python=clean_venv_python
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = torch.load(tmp_path / "out.pt", weights_only=True)
    assert results["classes"] == ["MimCoConfig", "MimCoModel", "MimCoForPreTraining", "MimCoForImageClassification"]
    assert results["modules"][0].startswith("transformers_modules.")
    assert torch.allclose(results["last_hidden_state"], expected_tokens, atol=1e-6)
    assert torch.allclose(results["loss"], expected_loss, atol=1e-6)
    assert results["logits_shape"] == [2, 4]


BACKBONE_CHILD_SCRIPT = textwrap.dedent(
    """
    import torch
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoBackbone, AutoConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    inputs_path, results_path, *checkpoints = sys.argv[1:]
    pixel_values = torch.load(inputs_path, weights_only=True)
    results = {}
    for checkpoint in checkpoints:
        try:
            backbone = AutoBackbone.from_pretrained(checkpoint, trust_remote_code=True)
            route = "AutoBackbone.from_pretrained"
        except HFValidationError:
            # transformers 5.25 looks every path up on the Hub first, so a local folder of any model fails there;
            # the class named by the folder's `auto_map`, from the folder's own code, is what it would load
            config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
            backbone_class = get_class_from_dynamic_module(config.auto_map["AutoBackbone"], checkpoint)
            backbone = backbone_class.from_pretrained(checkpoint)
            route = "auto_map class"
        backbone.eval()
        with torch.no_grad():
            feature_maps = backbone(pixel_values).feature_maps
        results[checkpoint] = {
            "class": type(backbone).__name__,
            "module": type(backbone).__module__,
            "route": route,
            "feature_maps": list(feature_maps),
        }
    torch.save(results, results_path)
    """
)


@pytest.mark.slow
def test_saved_backbone_loads_as_remote_code_in_a_clean_process(tmp_path, clean_venv_python):
    """A saved `MimCoBackbone` (with its pyramid) and a stage-2 folder load with `AutoBackbone` and
    `trust_remote_code` where the package cannot be imported."""
    config = MimCoConfig(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=16,
    )
    torch.manual_seed(0)
    pretraining = MimCoForPreTraining(config).eval()
    pretraining.save_pretrained(tmp_path / "pretraining")
    backbone = MimCoBackbone.from_pretrained(
        tmp_path / "pretraining", out_features=["stage1", "stage2", "stage3", "stage4"], use_feature_pyramid=True
    ).eval()
    backbone.save_pretrained(tmp_path / "backbone")
    saved_config = json.loads((tmp_path / "backbone" / "config.json").read_text())
    assert saved_config["auto_map"]["AutoBackbone"] == "modeling_mimco.MimCoBackbone"
    assert saved_config["use_feature_pyramid"] and saved_config["out_indices"] == [1, 2, 3, 4]

    pixel_values = torch.randn(2, 3, 48, 32)  # not the config's 32x32: positions resampled
    torch.save(pixel_values, tmp_path / "inputs.pt")
    with torch.no_grad():
        expected_pyramid = backbone(pixel_values).feature_maps
        expected_last_stage = MimCoBackbone.from_pretrained(tmp_path / "pretraining").eval()(pixel_values).feature_maps

    checkpoints = [tmp_path / "backbone", tmp_path / "pretraining"]
    result = run_without_package(
        BACKBONE_CHILD_SCRIPT,
        [tmp_path / "inputs.pt", tmp_path / "out.pt", *checkpoints],
        tmp_path,
        python=clean_venv_python,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    results = torch.load(tmp_path / "out.pt", weights_only=True)
    for checkpoint, expected in zip(checkpoints, [expected_pyramid, expected_last_stage]):
        loaded = results[str(checkpoint)]
        assert loaded["class"] == "MimCoBackbone" and loaded["module"].startswith("transformers_modules.")
        assert [tuple(f.shape) for f in loaded["feature_maps"]] == [tuple(f.shape) for f in expected]
        for actual, wanted in zip(loaded["feature_maps"], expected):
            torch.testing.assert_close(actual, wanted, atol=1e-6, rtol=0)
        assert loaded["route"] in ("AutoBackbone.from_pretrained", "auto_map class")
