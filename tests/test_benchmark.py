"""The benchmark harness runs on a tiny config and compares like with like."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import benchmark  # noqa: E402


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
        "--output_json", str(output),
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(output.read_text())
    for name in ("mimco_step", "floor", "reference", "mimco_best", "reference_fp32"):
        assert result["images_per_second"][name] > 0
    assert result["overhead"] == pytest.approx(
        result["seconds_per_step"]["mimco_step"] / result["seconds_per_step"]["floor"]
    )
    assert result["speedup"] == pytest.approx(
        result["seconds_per_step"]["reference"] / result["seconds_per_step"]["mimco_step"]
    )
    assert result["best_settings_speedup"] > 0
    assert result["peak_memory_mb"] > 0
    data = result["data"]["48x40"]
    assert data["mimco_images_per_second"] > 0 and data["run_mim_images_per_second"] > 0
    assert result["same_weights_loss"]["mimco"] == pytest.approx(result["same_weights_loss"]["reference"], abs=1e-5)
    assert "overhead" in completed.stdout and "speedup" in completed.stdout
