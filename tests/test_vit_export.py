"""`mimco-convert --to vit`: a MimCo folder becomes a folder that stock transformers loads as a ViT, without remote
code and without this package, and that computes what the MimCo model computes.

Every model is a 32-px, patch-4, width-32, 2-block ViT whose tensors (biases and norms too) are random, so a weight
that lands in the wrong place changes the outputs. The command runs as a subprocess through its console entry point;
the export is read back in a Python process where `modeling_mimco` cannot be imported (`helpers.clean_process`).
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.clean_process import run_without_package
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import PreTrainedConfig, ViTConfig, ViTImageProcessor, ViTModel

from modeling_mimco import MimCoConfig, MimCoForImageClassification, MimCoForPreTraining, MimCoModel
from modeling_mimco.commands.convert_checkpoint import ConversionArguments, conversion_target, convert_to_vit
from modeling_mimco.interop.vit_export import (
    VIT_EXPORT_FIELDS,
    export_mimco_to_vit,
    mimco_to_vit_state_dict,
    vit_to_mimco_state_dict,
)
from modeling_mimco.modeling_mimco import get_2d_sincos_position_embeddings


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"
EXPORT_DOCS = ROOT / "docs" / "finetuning.md"  # the page with the export commands
TOLERANCE = 1e-5
LABELS = {0: "cat", 1: "dog", 2: "eel"}


def tiny_config(**overrides) -> MimCoConfig:
    values = dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=16,
    )
    return MimCoConfig(**{**values, **overrides})


def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Distinct random values in every floating tensor, except a fixed sin-cos table, which stays as built."""
    generator = torch.Generator().manual_seed(seed)
    fixed = {name for name, parameter in model.named_parameters() if name.endswith("position_embeddings")}
    fixed = {name for name in fixed if not model.get_parameter(name).requires_grad}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name in fixed:
                continue
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return model.eval()


def mimco_convert(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs the `mimco-convert` console command installed next to this interpreter, importing this tree's code (a
    clone without the console command runs the same `cli()` through `scripts/convert_checkpoint.py`)."""
    console = Path(sys.executable).parent / "mimco-convert"
    command = [str(console)] if console.is_file() else [sys.executable, str(SCRIPT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [*command, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------------------------------------------------
# What each config field becomes


def test_every_config_field_has_an_export_rule():
    """A new `MimCoConfig` field fails here until `VIT_EXPORT_FIELDS` says how the export carries it."""
    generic = {field.name for field in dataclasses.fields(PreTrainedConfig)}
    own = {field.name for field in dataclasses.fields(MimCoConfig)} - generic
    assert own - set(VIT_EXPORT_FIELDS) == set()
    assert set(VIT_EXPORT_FIELDS) - own <= {"id2label", "label2id", "problem_type", "dtype"}
    vit_fields = {field.name for field in dataclasses.fields(ViTConfig)}
    for name, handling in VIT_EXPORT_FIELDS.items():
        if handling == "mapped":
            assert name in vit_fields, name


def test_default_conversion_target_is_unchanged(tmp_path):
    folder, file = tmp_path / "folder", tmp_path / "file.pth"
    folder.mkdir()
    file.write_bytes(b"")

    def target(path: Path, to: str | None = None) -> str:
        return conversion_target(ConversionArguments(input_path=str(path), output_path="out", to=to))

    assert target(folder) == "timm" and target(file) == "mimco"
    assert target(folder, "timm") == "timm" and target(folder, "vit") == "vit" and target(file, "mimco") == "mimco"
    with pytest.raises(ValueError, match="--to vit converts a MimCo checkpoint folder"):
        target(file, "vit")
    with pytest.raises(ValueError, match="--to mimco converts a checkpoint file"):
        target(folder, "mimco")


def test_sincos_position_table_is_exported_exactly(tmp_path):
    config = tiny_config(position_embedding_type="sincos")
    model = randomize_(MimCoModel(config), seed=3)
    sincos = get_2d_sincos_position_embeddings(config.hidden_size, config.image_size // config.patch_size)
    assert torch.equal(model.embeddings.position_embeddings, sincos)
    model.save_pretrained(tmp_path / "mimco")
    _, notes = export_mimco_to_vit(tmp_path / "mimco", tmp_path / "vit")

    exported = load_file(str(tmp_path / "vit" / "model.safetensors"))
    assert torch.equal(exported["embeddings.position_embeddings"], sincos)
    assert any("fixed 2-D sin-cos table" in note for note in notes)
    vit = ViTModel.from_pretrained(tmp_path / "vit").eval()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        difference = max_diff(vit(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state)
    print(f"sin-cos ViTModel last_hidden_state: max abs diff {difference:.3g}")
    assert difference < TOLERANCE


def test_image_size_exports_for_another_resolution(tmp_path):
    """At another size the export equals MimCo's `interpolate_pos_encoding=True`: the table is resampled by MimCo's
    resampler at export time, not by ViT's (another bicubic kernel) at run time."""
    model = randomize_(MimCoModel(tiny_config()), seed=7)
    model.save_pretrained(tmp_path / "mimco")
    _, notes = export_mimco_to_vit(tmp_path / "mimco", tmp_path / "vit", image_size=48)
    assert any("from 32 to 48 px" in note for note in notes)
    assert json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())["size"] == {
        "height": 48,
        "width": 48,
    }
    vit = ViTModel.from_pretrained(tmp_path / "vit").eval()
    assert vit.config.image_size == 48
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = model(pixel_values, interpolate_pos_encoding=True).last_hidden_state
        difference = max_diff(vit(pixel_values).last_hidden_state, expected)
    print(f"48-px export ViTModel last_hidden_state: max abs diff {difference:.3g}")
    assert difference < TOLERANCE
    with pytest.raises(ValueError, match=r"`image_size` \(30\) must be a positive multiple of `patch_size` \(4\)"):
        export_mimco_to_vit(tmp_path / "mimco", tmp_path / "vit30", image_size=30)


def test_output_folder_with_code_files_is_refused(tmp_path):
    """Overwriting a folder that holds code (an earlier MimCo save) would leave the code next to the export."""
    MimCoModel(tiny_config()).save_pretrained(tmp_path / "mimco")
    MimCoModel(tiny_config()).save_pretrained(tmp_path / "old")  # holds configuration_mimco.py, modeling_mimco.py...
    arguments = ConversionArguments(
        input_path=str(tmp_path / "mimco"), output_path=str(tmp_path / "old"), to="vit", overwrite_output=True
    )
    with pytest.raises(ValueError, match="holds code files"):
        convert_to_vit(arguments)
    arguments.output_path = str(tmp_path / "mimco")
    with pytest.raises(ValueError, match="is the input folder"):
        convert_to_vit(arguments)


# ------------------------------------------------------------------------------------------------------------------
# The export, read back where only transformers is installed

CLEAN_CHILD = textwrap.dedent(
    """
    import json
    import sys

    import torch
    from PIL import Image
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForImageClassification,
        ViTForImageClassification,
        ViTModel,
        pipeline,
    )

    folder, inputs_path, image_path, results_path = sys.argv[1:5]
    try:
        import modeling_mimco  # noqa: F401
    except ImportError:
        importable = False
    else:
        importable = True
    pixel_values = torch.load(inputs_path, weights_only=True)
    config = AutoConfig.from_pretrained(folder)
    results = {"importable": importable, "config_class": type(config).__name__}
    auto = AutoModel.from_pretrained(folder).eval()
    vit = ViTModel.from_pretrained(folder).eval()
    results["auto_class"] = f"{type(auto).__module__}.{type(auto).__name__}"
    with torch.no_grad():
        results["auto_last_hidden_state"] = auto(pixel_values).last_hidden_state
        outputs = vit(pixel_values)
        results["vit_last_hidden_state"] = outputs.last_hidden_state
        results["vit_pooler_output"] = outputs.pooler_output
        if config.architectures == ["ViTForImageClassification"]:
            auto_classifier = AutoModelForImageClassification.from_pretrained(folder).eval()
            classifier = ViTForImageClassification.from_pretrained(folder).eval()
            results["classifier_class"] = f"{type(auto_classifier).__module__}.{type(auto_classifier).__name__}"
            results["auto_logits"] = auto_classifier(pixel_values).logits
            results["vit_logits"] = classifier(pixel_values).logits
            classify = pipeline("image-classification", model=folder)
            results["pipeline"] = json.dumps(classify(Image.open(image_path), top_k=3))
    torch.save(results, results_path)
    """
)


def build_case(case: str) -> tuple[torch.nn.Module, MimCoModel]:
    """The MimCo model of a case and the backbone whose outputs the export must reproduce. Each case also sets
    mapped fields away from ViT's defaults, so that a field not carried shows in the outputs."""
    if case == "model":
        model = MimCoModel(tiny_config(layer_norm_eps=1e-5))
        return randomize_(model, seed=11), model
    if case == "classifier":
        config = tiny_config(
            num_labels=3,
            id2label=LABELS,
            label2id={label: index for index, label in LABELS.items()},
            hidden_act="quick_gelu",
            qkv_bias=False,
        )
        model = randomize_(MimCoForImageClassification(config), seed=12)
        return model, model.mimco
    config = tiny_config(position_embedding_type="sincos", drop_path_rate=0.1, hidden_act="gelu_pytorch_tanh")
    model = randomize_(MimCoForPreTraining(config), seed=13)
    return model, model.mimco


@pytest.mark.slow
@pytest.mark.parametrize("case", ["model", "classifier", "pretraining"])
def test_export_loads_in_stock_transformers_and_matches(tmp_path, case):
    model, backbone = build_case(case)
    model.save_pretrained(tmp_path / "mimco")
    exported = tmp_path / "vit"
    result = mimco_convert("--input_path", str(tmp_path / "mimco"), "--output_path", str(exported), "--to", "vit")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr

    # a stock ViT folder: no remote code, nothing of this package
    saved_config = json.loads((exported / "config.json").read_text())
    assert saved_config["model_type"] == "vit"
    assert "auto_map" not in saved_config
    expected_class = "ViTForImageClassification" if case == "classifier" else "ViTModel"
    assert saved_config["architectures"] == [expected_class]
    assert sorted(path.name for path in exported.rglob("*")) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    processor = json.loads((exported / "preprocessor_config.json").read_text())
    assert processor["image_processor_type"].startswith("ViTImageProcessor")
    assert processor["size"] == {"height": 32, "width": 32}
    assert processor["image_mean"] == pytest.approx(list(model.config.image_mean))
    assert processor["image_std"] == pytest.approx(list(model.config.image_std))
    if case == "classifier":
        assert saved_config["id2label"] == {str(index): label for index, label in LABELS.items()}
        assert saved_config["label2id"] == {label: index for index, label in LABELS.items()}
    if case == "pretraining":
        assert "skipped" in result.stdout and "student" in result.stdout

    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    pixels = np.random.default_rng(6).integers(0, 256, size=(40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    child = run_without_package(
        CLEAN_CHILD,
        [exported, tmp_path / "pixel_values.pt", tmp_path / "image.png", tmp_path / "results.pt"],
        tmp_path,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    results = torch.load(tmp_path / "results.pt", weights_only=True)
    assert results["importable"] is False
    assert results["config_class"] == "ViTConfig"
    assert results["auto_class"] == "transformers.models.vit.modeling_vit.ViTModel"

    with torch.no_grad():
        expected = backbone(pixel_values)
    differences = {
        "AutoModel last_hidden_state": max_diff(results["auto_last_hidden_state"], expected.last_hidden_state),
        "ViTModel last_hidden_state": max_diff(results["vit_last_hidden_state"], expected.last_hidden_state),
    }
    if case != "classifier":
        # the identity pooler: pooler_output is MimCo's (the normalised CLS token)
        differences["ViTModel pooler_output"] = max_diff(results["vit_pooler_output"], expected.pooler_output)
    else:
        assert results["classifier_class"] == "transformers.models.vit.modeling_vit.ViTForImageClassification"
        with torch.no_grad():
            expected_logits = model(pixel_values).logits
        differences["AutoModelForImageClassification logits"] = max_diff(results["auto_logits"], expected_logits)
        differences["ViTForImageClassification logits"] = max_diff(results["vit_logits"], expected_logits)

        # the pipeline: the image processor of the folder, then the classifier, with the labels of the config
        predictions = json.loads(results["pipeline"])
        assert sorted(prediction["label"] for prediction in predictions) == sorted(LABELS.values())
        image_inputs = ViTImageProcessor.from_pretrained(exported)(Image.open(tmp_path / "image.png"))
        with torch.no_grad():
            logits = model(torch.as_tensor(np.asarray(image_inputs["pixel_values"]))).logits
        probabilities = logits.softmax(-1)[0]
        for prediction in predictions:
            index = {label: i for i, label in LABELS.items()}[prediction["label"]]
            assert prediction["score"] == pytest.approx(probabilities[index].item(), abs=TOLERANCE)
        differences["pipeline scores"] = max(
            abs(p["score"] - probabilities[{v: k for k, v in LABELS.items()}[p["label"]]].item()) for p in predictions
        )
    for name, difference in differences.items():
        print(f"{case}: {name}: max abs diff {difference:.3g}")
    assert all(difference < TOLERANCE for difference in differences.values()), differences


# ------------------------------------------------------------------------------------------------------------------
# What a ViT cannot carry is refused in one line


def add_weight(folder: Path, name: str, tensor: torch.Tensor) -> None:
    """Adds a tensor to a saved folder's `model.safetensors`, as a model with more than a plain ViT would hold."""
    weights = load_file(str(folder / "model.safetensors"))
    weights[name] = tensor
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


REFUSALS = {
    # case: (what is saved, the words the one line must hold)
    "mean pooling classifier": ("mean_classifier", ["`pooling`", "'mean'", "CLS token"]),
    "mean pooling backbone": ("mean_model", ["`pooling`", "'mean'", "CLS token"]),
    "register tokens": ("registers", ["'embeddings.register_tokens'", "no place in transformers' ViTModel"]),
    "layer scale": ("layer_scale", ["'layers.0.ls1.gamma'", "no place in transformers' ViTModel"]),
    "a file input": ("file", ["--to vit converts a MimCo checkpoint folder", "is not a folder"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(REFUSALS))
def test_what_vit_cannot_carry_is_refused_in_one_line(tmp_path, case):
    kind, words = REFUSALS[case]
    source = tmp_path / "mimco"
    if kind == "mean_classifier":
        MimCoForImageClassification(tiny_config(pooling="mean", num_labels=3)).save_pretrained(source)
    elif kind == "mean_model":
        MimCoModel(tiny_config(pooling="mean")).save_pretrained(source)
    elif kind == "file":
        source = tmp_path / "model.safetensors"
        save_file({name: t.contiguous() for name, t in MimCoModel(tiny_config()).state_dict().items()}, str(source))
    else:
        MimCoModel(tiny_config()).save_pretrained(source)
        if kind == "registers":
            add_weight(source, "embeddings.register_tokens", torch.zeros(1, 4, 32))
        else:
            add_weight(source, "layers.0.ls1.gamma", torch.ones(32))
    output = tmp_path / "vit"
    result = mimco_convert("--input_path", str(source), "--output_path", str(output), "--to", "vit")
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mimco-convert: error:") or lines[0].startswith("convert_checkpoint.py: error:")
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not output.exists()


# ------------------------------------------------------------------------------------------------------------------
# The documented command


@pytest.mark.slow
def test_documented_vit_export_command_runs(tmp_path):
    """The `--to vit` command that docs/finetuning.md prints runs as printed on a saved MimCo folder of the name it
    uses."""
    commands = [
        line
        for line in EXPORT_DOCS.read_text().splitlines()
        if line.startswith("mimco-convert") and "--to vit" in line
    ]
    assert len(commands) == 1, commands
    arguments = shlex.split(commands[0].split("#")[0])[1:]
    input_name = arguments[arguments.index("--input_path") + 1]
    output_name = arguments[arguments.index("--output_path") + 1]
    model = randomize_(MimCoModel(tiny_config()), seed=21)
    model.save_pretrained(tmp_path / input_name)
    result = mimco_convert(*arguments, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"AutoModel\.from_pretrained\('.*'\)", result.stdout)
    vit = ViTModel.from_pretrained(tmp_path / output_name).eval()
    pixel_values = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(22))
    with torch.no_grad():
        assert max_diff(vit(pixel_values).last_hidden_state, model(pixel_values).last_hidden_state) < TOLERANCE


def test_a_vit_state_dict_renames_back_to_the_mimco_backbone_it_came_from():
    """`vit_to_mimco_state_dict` inverts `mimco_to_vit_state_dict` (the dense study loads pixel MIM's ViT with it)."""
    torch.manual_seed(0)
    model = MimCoModel(MimCoConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, intermediate_size=64))  # fmt: skip
    vit_state, _ = mimco_to_vit_state_dict(model.state_dict(), model.config.hidden_size)
    vit_state["embeddings.mask_token"] = model.state_dict()["embeddings.mask_token"]  # the export drops it
    vit_config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64)  # fmt: skip
    vit = ViTModel(vit_config, add_pooling_layer=False, use_mask_token=True)  # as ViTForMaskedImageModeling's `.vit`
    vit.load_state_dict(vit_state, strict=True)  # the names are transformers' own
    back = vit_to_mimco_state_dict(vit.state_dict(), list(model.state_dict()))
    assert back.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(back[name], tensor, rtol=0, atol=0, msg=name)
