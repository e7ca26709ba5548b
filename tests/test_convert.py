"""Checkpoint conversion: MoCo v3 / DINO / timm ViTs -> MimCoModel, MimCo -> timm, safety and shape checks.

Every model is a 32-px, patch-4, width-64, 2-block ViT with random weights, so each conversion is checked by
comparing outputs with timm's own forward pass.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers.scripts import load_script
from safetensors.torch import load_file, save_file

from modeling_mimco import (
    MimCoConfig,
    MimCoForImageClassification,
    MimCoForPreTraining,
    MimCoModel,
)
from modeling_mimco.interop import convert, vit_checkpoints


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_checkpoint.py"
TINY_VIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0)
HEADS = "4"


@pytest.fixture(scope="module")
def script():
    return load_script("convert_checkpoint")


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Gives every tensor (biases and norms included) distinct random values, so no weight can go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in module.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)
    return module.eval()


def make_timm_vit(seed: int, **overrides) -> torch.nn.Module:
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **{**TINY_VIT, **overrides})
    return randomize_(model, seed)


def mocov3_sincos(dim: int, grid: int) -> torch.Tensor:
    """MoCo v3's fixed position table: sin/cos of the first grid axis in the first half, of the second in the other
    half, zeros for the CLS position."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    first, second = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    first = first.flatten()[:, None] * omega
    second = second.flatten()[:, None] * omega
    table = torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), table])[None]


def mocov3_encoders():
    base, momentum = make_timm_vit(1), make_timm_vit(2)
    with torch.no_grad():
        for encoder in (base, momentum):
            encoder.pos_embed.copy_(mocov3_sincos(64, 8))
    return base, momentum


def save_mocov3_checkpoint(path: Path, base, momentum) -> None:
    """The official MoCo v3 layout: DDP-prefixed base and momentum encoders with their projectors, a predictor,
    and the optimizer state."""
    generator = torch.Generator().manual_seed(3)
    state_dict = {}
    for name, encoder in (("base", base), ("momentum", momentum)):
        for key, tensor in encoder.state_dict().items():
            state_dict[f"module.{name}_encoder.{key}"] = tensor.clone()
        state_dict[f"module.{name}_encoder.head.0.weight"] = torch.randn(96, 64, generator=generator)
        state_dict[f"module.{name}_encoder.head.1.weight"] = torch.randn(96, generator=generator)
        state_dict[f"module.{name}_encoder.head.1.bias"] = torch.randn(96, generator=generator)
        state_dict[f"module.{name}_encoder.head.1.running_mean"] = torch.randn(96, generator=generator)
        state_dict[f"module.{name}_encoder.head.1.running_var"] = torch.rand(96, generator=generator)
        state_dict[f"module.{name}_encoder.head.1.num_batches_tracked"] = torch.tensor(7)
        state_dict[f"module.{name}_encoder.head.3.weight"] = torch.randn(32, 96, generator=generator)
    state_dict["module.predictor.0.weight"] = torch.randn(96, 32, generator=generator)
    state_dict["module.predictor.1.running_mean"] = torch.randn(96, generator=generator)
    state_dict["module.predictor.3.weight"] = torch.randn(32, 96, generator=generator)
    parameters = [torch.nn.Parameter(torch.randn(4, 4, generator=generator))]
    optimizer = torch.optim.AdamW(parameters, lr=1.5e-4, betas=(0.9, 0.95))
    parameters[0].grad = torch.ones(4, 4)
    optimizer.step()
    checkpoint = {
        "epoch": 300,
        "arch": "vit_small",
        "state_dict": state_dict,
        "optimizer": optimizer.state_dict(),
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
    }
    torch.save(checkpoint, path)


@pytest.fixture(scope="module")
def mocov3_checkpoint(tmp_path_factory):
    base, momentum = mocov3_encoders()
    path = tmp_path_factory.mktemp("mocov3") / "vit-tiny-300ep.pth.tar"
    save_mocov3_checkpoint(path, base, momentum)
    return path, base, momentum


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_close_to_timm(mimco: MimCoModel, timm_model, images) -> None:
    with torch.no_grad():
        expected = timm_model.forward_features(images)
        actual = mimco(images).last_hidden_state
    assert actual.shape == expected.shape
    assert max_diff(actual, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------------------------
# MoCo v3


@pytest.mark.parametrize("encoder", [None, "momentum", "base"])
def test_mocov3_checkpoint_converts_the_chosen_encoder(script, mocov3_checkpoint, images, tmp_path, encoder):
    path, base, momentum = mocov3_checkpoint
    argv = ["--input_path", str(path), "--output_path", str(tmp_path / "out"), "--num_attention_heads", HEADS]
    if encoder is not None:
        argv += ["--encoder", encoder]
    script.main(argv)

    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (tmp_path / "out" / name).is_file()
    model = MimCoModel.from_pretrained(tmp_path / "out").eval()
    assert model.config.position_embedding_type == "sincos"
    chosen, other = (base, momentum) if encoder == "base" else (momentum, base)
    assert_close_to_timm(model, chosen, images)
    with torch.no_grad():
        assert max_diff(model(images).last_hidden_state, other.forward_features(images)) > 1e-2
    loaded = model.state_dict()["layers.1.attention.qkv.weight"]
    assert torch.equal(loaded, chosen.state_dict()["blocks.1.attn.qkv.weight"])
    assert not torch.equal(loaded, other.state_dict()["blocks.1.attn.qkv.weight"])
    # The checkpoint's own position table is kept, whatever MimCo's sin-cos construction would give.
    assert torch.equal(model.embeddings.position_embeddings.data, chosen.pos_embed.data)


def test_converted_mocov3_is_a_stage2_teacher(mocov3_checkpoint, images, tmp_path):
    path, _, momentum = mocov3_checkpoint
    folder = tmp_path / "teacher"
    convert.convert_checkpoint_to_mimco(path, folder, num_attention_heads=4, image_mean=[0.4, 0.5, 0.6])
    student_config = MimCoConfig(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        head_hidden_size=0,
    )
    model = MimCoForPreTraining.from_teacher(str(folder), student_config)
    teacher = MimCoModel.from_pretrained(folder)
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(model.teacher.state_dict()[name], tensor), name
    assert model.config.teacher_image_mean == pytest.approx([0.4, 0.5, 0.6])
    assert torch.isfinite(model(images).loss)


def test_mocov3_without_the_requested_encoder_is_refused(tmp_path):
    base = make_timm_vit(1)
    state_dict = {f"module.base_encoder.{key}": tensor for key, tensor in base.state_dict().items()}
    path = tmp_path / "base_only.pth.tar"
    torch.save({"arch": "vit_small", "state_dict": state_dict}, path)
    with pytest.raises(ValueError, match="momentum_encoder"):
        convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)


# ------------------------------------------------------------------------------------------------------------------
# DINO and timm


def test_dino_state_dict_matches_timm(images, tmp_path):
    vit = make_timm_vit(4)
    path = tmp_path / "dino_vittiny4_pretrain.pth"
    torch.save(vit.state_dict(), path)
    model, _ = convert.convert_checkpoint_to_mimco(path, tmp_path / "out", num_attention_heads=4)
    assert model.config.position_embedding_type == "learned"
    assert_close_to_timm(MimCoModel.from_pretrained(tmp_path / "out").eval(), vit, images)


@pytest.mark.parametrize("key", [None, "student"])
def test_dino_training_checkpoint_picks_teacher_or_student(images, tmp_path, key):
    teacher, student = make_timm_vit(5), make_timm_vit(6)
    checkpoint = {
        "teacher": {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
        | {"head.mlp.0.weight": torch.ones(8, 64)},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()}
        | {"module.head.mlp.0.weight": torch.ones(8, 64)},
        "epoch": 100,
        "args": argparse.Namespace(arch="vit_small", patch_size=4),
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    model, _ = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4, checkpoint_key=key)
    assert_close_to_timm(model, student if key == "student" else teacher, images)


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(qkv_bias=False, mlp_ratio=2.0), dict(no_embed_class=True), dict(in_chans=1)],
    ids=["default", "no-qkv-bias-mlp2", "no-embed-class", "one-channel"],
)
def test_timm_safetensors_variants_match_timm(tmp_path, overrides):
    vit = make_timm_vit(7, **overrides)
    path = tmp_path / "vit.safetensors"
    save_file(vit.state_dict(), str(path))
    model, _ = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    assert model.config.qkv_bias == overrides.get("qkv_bias", True)
    assert model.config.intermediate_size == int(64 * overrides.get("mlp_ratio", 4.0))
    channels = overrides.get("in_chans", 3)
    assert model.config.num_channels == channels
    images = torch.randn(2, channels, 32, 32, generator=torch.Generator().manual_seed(1))
    assert_close_to_timm(model, vit, images)


def test_timm_average_pooled_vit_matches_pooled_features(tmp_path):
    vit = make_timm_vit(8, global_pool="avg", fc_norm=True)
    path = tmp_path / "vit_avg.bin"
    torch.save(vit.state_dict(), path)
    model, _ = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    assert model.config.pooling == "mean"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = vit.forward_head(vit.forward_features(images), pre_logits=True)
        assert max_diff(model(images).pooler_output, expected) <= 1e-5


def test_timm_classifier_head_is_dropped(images, tmp_path):
    vit = make_timm_vit(9, num_classes=10)
    path = tmp_path / "vit_cls.pth"
    torch.save(vit.state_dict(), path)
    model, notes = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    assert any("head" in note for note in notes)
    assert_close_to_timm(model, vit, images)


def test_attention_heads_change_the_result(images, tmp_path):
    vit = make_timm_vit(10)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    wrong, _ = convert.convert_checkpoint_to_mimco(path, num_attention_heads=2)
    with torch.no_grad():
        assert max_diff(wrong(images).last_hidden_state, vit.forward_features(images)) > 1e-3


def test_num_attention_heads_inference_rules():
    assert vit_checkpoints.infer_num_attention_heads(384, ["vit_small"], "mocov3")[0] == 12
    assert vit_checkpoints.infer_num_attention_heads(768, [None], "mocov3")[0] == 12
    assert vit_checkpoints.infer_num_attention_heads(384, ["vit_small_patch16_224"], "timm")[0] == 6
    assert vit_checkpoints.infer_num_attention_heads(1280, ["vit_huge_patch14_224"], "timm")[0] == 16
    assert vit_checkpoints.infer_num_attention_heads(1280, [], "timm")[0] == 20
    # A family word whose width does not match is ignored.
    assert vit_checkpoints.infer_num_attention_heads(768, ["vit_small"], "timm")[0] == 12
    with pytest.raises(ValueError, match="num_attention_heads"):
        vit_checkpoints.infer_num_attention_heads(100, [], "timm")


def test_image_size_resamples_position_embeddings(images, tmp_path):
    vit = make_timm_vit(11)
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    native, _ = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    larger, notes = convert.convert_checkpoint_to_mimco(path, num_attention_heads=4, image_size=48)
    assert larger.config.image_size == 48
    assert larger.embeddings.position_embeddings.shape == (1, 1 + 12 * 12, 64)
    assert any("resampled" in note for note in notes)
    big_images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = native(big_images, interpolate_pos_encoding=True).last_hidden_state
        assert max_diff(larger(big_images).last_hidden_state, expected) <= 1e-5


# ------------------------------------------------------------------------------------------------------------------
# MimCo -> timm -> MimCo


def tiny_mimco_config(**overrides) -> MimCoConfig:
    values = dict(
        image_size=32,
        patch_size=4,
        mask_patch_size=8,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return MimCoConfig(**{**values, **overrides})


@pytest.mark.parametrize("model_class", [MimCoModel, MimCoForImageClassification])
def test_round_trip_mimco_timm_mimco_is_exact(script, images, tmp_path, model_class):
    config = tiny_mimco_config(num_labels=5) if model_class is MimCoForImageClassification else tiny_mimco_config()
    original = randomize_(model_class(config), seed=12)
    original.save_pretrained(tmp_path / "mimco")
    timm_file = tmp_path / "vit.safetensors"
    model_name, kwargs, overlay = script.main(
        ["--input_path", str(tmp_path / "mimco"), "--output_path", str(timm_file)]
    )

    timm_state_dict = load_file(str(timm_file))
    vit = timm.create_model(model_name, pretrained=False, **kwargs).eval()
    vit.load_state_dict(timm_state_dict, strict=True)
    pretrained = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()
    for name, tensor in vit.state_dict().items():
        assert torch.equal(pretrained.state_dict()[name], tensor), name
    with torch.no_grad():
        if model_class is MimCoForImageClassification:
            assert max_diff(vit(images), original(images).logits) <= 1e-5
            backbone = original.mimco
        else:
            backbone = original
        assert max_diff(vit.forward_features(images), backbone(images).last_hidden_state) <= 1e-5

    back, _ = convert.convert_checkpoint_to_mimco(timm_file, num_attention_heads=config.num_attention_heads)
    original_backbone = backbone.state_dict()
    restored = back.state_dict()
    assert set(restored) == set(original_backbone)
    # timm's ViT has no mask token: it is the one tensor the timm file cannot carry.
    not_in_timm = {name for name in original_backbone if vit_checkpoints.timm_name_for(name) is None}
    assert not_in_timm == {"embeddings.mask_token"}
    for name in set(original_backbone) - not_in_timm:
        assert torch.equal(restored[name], original_backbone[name]), name
    assert torch.equal(restored["embeddings.mask_token"], torch.zeros_like(original_backbone["embeddings.mask_token"]))
    for field in ("image_size", "patch_size", "hidden_size", "num_hidden_layers", "intermediate_size", "qkv_bias"):
        assert getattr(back.config, field) == getattr(config, field), field

    # timm -> MimCo -> timm carries every tensor of the timm file.
    back.save_pretrained(tmp_path / "back")
    convert.convert_mimco_to_timm(tmp_path / "back", tmp_path / "again.safetensors")
    again = load_file(str(tmp_path / "again.safetensors"))
    backbone_keys = {name for name in timm_state_dict if not name.startswith("head.")}
    assert set(again) == backbone_keys
    for name in backbone_keys:
        assert torch.equal(again[name], timm_state_dict[name]), name


def test_pretraining_checkpoint_exports_its_student(tmp_path):
    model = MimCoForPreTraining(tiny_mimco_config(head_hidden_size=0))
    model.save_pretrained(tmp_path / "pretraining")
    timm_file = tmp_path / "student.safetensors"
    _, _, _, notes = convert.convert_mimco_to_timm(tmp_path / "pretraining", timm_file)
    exported = load_file(str(timm_file))
    assert any("student" in note for note in notes)
    assert torch.equal(exported["blocks.0.attn.qkv.weight"], model.mimco.state_dict()["layers.0.attention.qkv.weight"])
    assert not any(name.startswith(("teacher", "patch_head", "image_head")) for name in exported)


def test_timm_kwargs_refuse_what_timm_cannot_express():
    with pytest.raises(ValueError, match="layer_norm_eps"):
        convert.timm_create_model_kwargs(tiny_mimco_config(layer_norm_eps=1e-12))


# ------------------------------------------------------------------------------------------------------------------
# Safety and error messages


class CodeOnLoad:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": make_timm_vit(13).state_dict(), "payload": CodeOnLoad(marker)}, path)
    with pytest.raises(ValueError, match="refused") as error:
        convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    assert str(path) in str(error.value)
    assert "system" in str(error.value)
    assert not marker.exists()


def test_script_refuses_code_pickle_without_traceback(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth.tar"
    torch.save({"state_dict": {"cls_token": torch.zeros(1, 1, 8)}, "payload": CodeOnLoad(marker)}, path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input_path", str(path), "--output_path", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode != 0
    assert "refused" in result.stderr and str(path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_corrupted_qkv_shape_names_the_key(tmp_path):
    state_dict = make_timm_vit(14).state_dict()
    state_dict["blocks.1.attn.qkv.weight"] = torch.randn(3 * 64 + 3, 64)
    path = tmp_path / "corrupt.pth"
    torch.save(state_dict, path)
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.qkv\.weight") as error:
        convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)
    assert "(195, 64)" in str(error.value) and "(192, 64)" in str(error.value)
    assert str(path) in str(error.value)


def test_mocov3_corrupted_key_is_named_as_in_the_file(mocov3_checkpoint, tmp_path):
    path, _, _ = mocov3_checkpoint
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"]["module.momentum_encoder.blocks.0.mlp.fc2.weight"] = torch.randn(64, 100)
    corrupt = tmp_path / "corrupt.pth.tar"
    torch.save(checkpoint, corrupt)
    with pytest.raises(ValueError, match=r"module\.momentum_encoder\.blocks\.0\.mlp\.fc2\.weight"):
        convert.convert_checkpoint_to_mimco(corrupt, num_attention_heads=4)


def test_image_size_not_divisible_by_patch_size(script, tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(make_timm_vit(15).state_dict(), path)
    with pytest.raises(ValueError, match=r"image_size.*patch_embed\.proj\.weight"):
        convert.convert_checkpoint_to_mimco(path, num_attention_heads=4, image_size=30)
    with pytest.raises(SystemExit, match="image_size"):
        script.main(["--input_path", str(path), "--output_path", str(tmp_path / "out"), "--image_size", "30"])


def test_target_config_mismatch_names_key_and_shapes(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(make_timm_vit(16).state_dict(), path)
    target = tiny_mimco_config(intermediate_size=192)
    with pytest.raises(ValueError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(256, 64\).*\(192, 64\)"):
        convert.convert_checkpoint_to_mimco(path, config=target)


def test_unsupported_timm_features_are_named(tmp_path):
    path = tmp_path / "layer_scale.pth"
    torch.save(make_timm_vit(17, init_values=1e-5).state_dict(), path)
    with pytest.raises(ValueError, match=r"blocks\.0\.ls1\.gamma"):
        convert.convert_checkpoint_to_mimco(path, num_attention_heads=4)


def test_existing_output_is_not_overwritten(script, tmp_path):
    path = tmp_path / "vit.pth"
    torch.save(make_timm_vit(18).state_dict(), path)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit, match="overwrite_output"):
        script.main(["--input_path", str(path), "--output_path", str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
