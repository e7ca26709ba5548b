"""The benchmark harness runs on a tiny config and compares like with like."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_mimco.benchmarks import benchmark


REPO = Path(__file__).resolve().parents[1]


def test_reference_computes_the_same_loss_on_the_same_weights():
    torch.manual_seed(0)
    args = benchmark.BenchmarkArguments(model_preset="tiny", batch_size=4, head_hidden_size=32)
    config = benchmark.mimco_config(args)
    model = benchmark.MimCoForPreTraining(config).train()
    reference = benchmark.ReferenceMimCo(model).train()
    pixel_values = torch.randn(4, 3, config.image_size, config.image_size)
    bool_masked_pos = model.mask_generator.batch(4)
    ours, theirs = benchmark.same_loss_check(model, reference, (pixel_values, bool_masked_pos))
    assert ours == pytest.approx(theirs, abs=1e-5)

    # and the gradients that reach the student agree too, so both steps do the same work
    model(pixel_values, bool_masked_pos=bool_masked_pos).loss.backward()
    reference(pixel_values, bool_masked_pos).backward()
    ours_grad = model.mimco.layers[0].attention.qkv.weight.grad
    hidden = config.hidden_size
    theirs_grad = torch.cat(
        [
            reference.student.layers[0].attention.q_proj.weight.grad,
            reference.student.layers[0].attention.k_proj.weight.grad,
            reference.student.layers[0].attention.v_proj.weight.grad,
        ]
    )
    assert theirs_grad.shape == (3 * hidden, hidden)
    assert torch.allclose(ours_grad, theirs_grad, atol=1e-5)


@pytest.mark.slow
def test_harness_writes_every_figure(tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(REPO / "scripts" / "benchmark.py"),
        "--model_preset", "tiny",
        "--batch_size", "4",
        "--head_hidden_size", "32",
        "--warmup", "0",
        "--repeats", "1",
        "--data_images", "4",
        "--data_source_sizes", "48x40",
        "--best_precision", "bf16",
        "--gemm_size", "128",
        "--boolean_index_variant",
        "--drop_path_rate", "0.1",
        "--output_json", str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    names = ("mimco_step", "floor", "reference", "mimco_teacher_bf16", "mimco_teacher_autocast", "mimco_best")
    for name in (*names, "reference_fp32"):
        assert result["images_per_second"][name] > 0
        # utilisation = model FLOPs/s over the GEMM rate measured in the same run, so a ratio to the machine's limit
        assert result["flops_utilisation"][name] > 0
    assert set(result["gemm_flops_per_second"]) == {"fp32", "bf16"}
    flops = result["model_flops_per_step"]
    assert flops["floor"] < flops["mimco_step"] == flops["reference"]  # model FLOPs: the method's, not the code's
    assert result["flops_utilisation"]["mimco_step"] == pytest.approx(
        flops["mimco_step"] / result["seconds_per_step"]["mimco_step"] / result["gemm_flops_per_second"]["fp32"]
    )
    # the bf16 teacher: timed, and its loss stays close to the fp32 one on the same weights
    for name in ("mimco_teacher_bf16", "mimco_teacher_autocast"):
        change = result["teacher_bf16"][name]
        assert change["speedup"] > 0
        assert change["loss_relative_difference"] < 1e-2
        assert change["target_min_cosine"] > 0.99
    assert result["overhead"] == pytest.approx(
        result["seconds_per_step"]["mimco_step"] / result["seconds_per_step"]["floor"]
    )
    assert result["speedup"] == pytest.approx(
        result["seconds_per_step"]["reference"] / result["seconds_per_step"]["mimco_step"]
    )
    assert result["best_settings_speedup"] > 0
    # the general (boolean-index) path and the seeded drop path, timed beside the step they compare with
    assert result["static_shape_speedup"] == pytest.approx(
        result["seconds_per_step"]["mimco_step_boolean_index"] / result["seconds_per_step"]["mimco_step"]
    )
    assert result["seeded_drop_path_cost"] == pytest.approx(
        result["seconds_per_step"]["mimco_step_seeded"] / result["seconds_per_step"]["mimco_step"]
    )
    assert result["peak_memory_mb"] > 0
    data = result["data"]["48x40"]
    assert data["mimco_images_per_second"] > 0 and data["run_mim_images_per_second"] > 0
    # stage 1's loaders side by side: ours, ours with the photometric half left to the device, torchvision's v2
    for name in ("stage1", "stage1_photometric_on_device", "stage1_torchvision"):
        assert data[f"{name}_images_per_second"] > 0
    assert data["stage1_speedup"] == pytest.approx(
        data["stage1_images_per_second"] / data["stage1_torchvision_images_per_second"]
    )
    assert result["same_weights_loss"]["mimco"] == pytest.approx(result["same_weights_loss"]["reference"], abs=1e-5)
    assert "overhead" in completed.stdout and "speedup" in completed.stdout and "large GEMM" in completed.stdout


def test_flops_are_counted_as_the_docs_count_them():
    """ViT-S/16 at 224 is 4.6 GMAC = 9.2 GFLOP per image forward; a stage-2 step of batch 16 adds the teacher's
    forward and the heads on the 120 masked patches of each image (docs/benchmarks.md)."""
    from modeling_mimco.benchmarks.measurement import floor_step_flops, mimco_step_flops, vit_forward_flops

    config = benchmark.mimco_config(benchmark.BenchmarkArguments(model_preset="vit-small-patch16"))
    assert vit_forward_flops(config, 1) == pytest.approx(9.197e9, rel=1e-3)
    floor = floor_step_flops(config, 16)
    assert floor.student == pytest.approx(3 * 16 * 9.197e9, rel=1e-3)
    assert floor.teacher == pytest.approx(16 * 9.197e9, rel=1e-3)
    heads = mimco_step_flops(config, 16).total - floor.total
    patch_head = 3 * 16 * 120 * 2 * (384 * 2048 + 2048 * 384)
    assert patch_head < heads < 1.1 * patch_head


def test_gpu_peak_table_matches_device_names():
    from modeling_mimco.benchmarks.gpu_check.peaks import lookup_gpu_peak

    assert lookup_gpu_peak("NVIDIA H200").bf16 == pytest.approx(989.4)
    assert lookup_gpu_peak("NVIDIA H100 80GB HBM3").part == "H100 SXM"
    assert lookup_gpu_peak("NVIDIA H100 PCIe").bf16 == pytest.approx(756.5)
    assert lookup_gpu_peak("NVIDIA A100-SXM4-40GB").fp32 == pytest.approx(19.5)
    assert lookup_gpu_peak("NVIDIA L4").part == "L4"  # not L40 / L40S
    assert lookup_gpu_peak("NVIDIA L40S").part == "L40S"
    assert lookup_gpu_peak("NVIDIA A10G").part == "A10G"
    assert lookup_gpu_peak("Tesla T4").bf16 is None
    assert lookup_gpu_peak("Some Future GPU") is None


@pytest.mark.slow
def test_data_only_times_the_loaders_side_by_side(tmp_path):
    """`--data_only`, as docs/benchmarks.md runs it for the loaders: no training step, every loader in one run."""
    output = tmp_path / "loaders.json"
    command = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--data_only", "--model_preset", "tiny"]
    command += ["--data_images", "4", "--repeats", "1", "--data_source_sizes", "64x48", "--output_json", str(output)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    assert "seconds_per_step" not in result and set(result["data"]) == {"64x48"}
    assert "stage 1 ours" in completed.stdout and "torchvision v2" in completed.stdout
