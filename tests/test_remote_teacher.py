"""A stage-2 teacher whose model code lives in its own folder (`auto_map`, as on the Hub): refused without
`--trust_remote_code`, trained against with it, and the saved student loads without running the teacher's code.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from test_training import _script_command, _subprocess_env, stage2_args
from transformers import ViTConfig, ViTModel

from modeling_mimco import MimCoConfig, MimCoForPreTraining, MimCoModel


pytestmark = pytest.mark.slow

CONFIGURATION_CODE = textwrap.dedent(
    """
    from transformers import ViTConfig


    class ToyViTConfig(ViTConfig):
        model_type = "toy_vit"
    """
)
MODELING_CODE = textwrap.dedent(
    """
    from transformers import ViTModel

    from .configuration_toy import ToyViTConfig


    class ToyViTModel(ViTModel):
        config_class = ToyViTConfig
    """
)


@pytest.fixture(scope="module")
def remote_code_teacher(tmp_path_factory) -> Path:
    """A ViT saved as a model type that transformers does not know, with its code beside the weights."""
    folder = tmp_path_factory.mktemp("toy_teacher")
    config = ViTConfig(
        image_size=32, patch_size=4, hidden_size=24, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    saved.update(
        model_type="toy_vit",
        architectures=["ToyViTModel"],
        auto_map={"AutoConfig": "configuration_toy.ToyViTConfig", "AutoModel": "modeling_toy.ToyViTModel"},
    )
    (folder / "config.json").write_text(json.dumps(saved))
    (folder / "configuration_toy.py").write_text(CONFIGURATION_CODE)
    (folder / "modeling_toy.py").write_text(MODELING_CODE)
    return folder


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        _script_command("run_pretraining", args), env=_subprocess_env(), capture_output=True, text=True, timeout=300
    )


def test_remote_code_teacher_needs_trust_remote_code(tmp_path, remote_code_teacher):
    completed = _run(stage2_args(remote_code_teacher, tmp_path / "refused", steps=1))
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    (line,) = [line for line in completed.stderr.splitlines() if ": error: " in line]
    assert "--teacher_name_or_path" in line and "trust_remote_code" in line
    assert not (tmp_path / "refused" / "model.safetensors").exists()


def test_remote_code_teacher_trains_with_trust_remote_code(tmp_path, remote_code_teacher):
    output_dir = tmp_path / "student"
    completed = _run(stage2_args(remote_code_teacher, output_dir, "--trust_remote_code", steps=2))
    assert completed.returncode == 0, completed.stderr[-3000:]
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["teacher_config"]["model_type"] == "toy_vit"
    assert saved["teacher_config"]["auto_map"]["AutoModel"] == "modeling_toy.ToyViTModel"

    # the student loads in this process without the teacher's code, and saves its config back unchanged
    student = MimCoModel.from_pretrained(output_dir)
    config = MimCoConfig.from_pretrained(output_dir)
    assert config.teacher_config.to_dict()["model_type"] == "toy_vit"
    student.save_pretrained(tmp_path / "again")
    again = json.loads((tmp_path / "again" / "config.json").read_text())
    assert again["teacher_config"]["model_type"] == "toy_vit"
    # rebuilding the whole pre-training model would run the teacher's code: refused with what to do instead
    with pytest.raises(ValueError, match="with trust_remote_code enabled"):
        MimCoForPreTraining.from_pretrained(output_dir)
