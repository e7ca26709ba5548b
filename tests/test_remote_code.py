"""A saved MimCo folder loads as remote code in a Python process that cannot import this package."""

import json
import textwrap

import pytest
import torch
from helpers.clean_process import run_without_package

from modeling_mimco import MimCoConfig, MimCoForPreTraining


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
def test_saved_folder_loads_as_remote_code_in_a_clean_process(tmp_path, teacher):
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

    result = run_without_package(CHILD_SCRIPT, [checkpoint, tmp_path / "inputs.pt", tmp_path / "out.pt"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    results = torch.load(tmp_path / "out.pt", weights_only=True)
    assert results["classes"] == ["MimCoConfig", "MimCoModel", "MimCoForPreTraining", "MimCoForImageClassification"]
    assert results["modules"][0].startswith("transformers_modules.")
    assert torch.allclose(results["last_hidden_state"], expected_tokens, atol=1e-6)
    assert torch.allclose(results["loss"], expected_loss, atol=1e-6)
    assert results["logits_shape"] == [2, 4]
