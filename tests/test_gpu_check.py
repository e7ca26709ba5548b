"""The GPU check kit (`scripts/gpu_check.py`, `modeling_mimco/benchmarks/gpu_check/`) stays runnable without a GPU.

`--smoke` runs every part on the CPU at tiny sizes; this test runs it as a user would, in a subprocess, and checks
the report's structure: every part either ran (its checks passed) or says why it was skipped. The figures of a smoke
run are noise and are not asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modeling_mimco.benchmarks import gpu_check


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_a_complete_report(tmp_path):
    output = tmp_path / "gpu_check"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    completed = subprocess.run(
        # the data part's smoke budget (8 s) can run out on a loaded machine before its last check; 30 s cannot
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke", "--budget_data", "30"]
        + ["--output_dir", str(output)],
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        cwd=REPO,
    )
    seconds = time.perf_counter() - started
    assert completed.returncode == 0, (completed.stdout[-3000:], completed.stderr[-5000:])

    report = json.loads((output / "report.json").read_text())
    markdown = (output / "report.md").read_text()
    assert report["smoke"] is True and report["device"] == "cpu"
    assert list(report["parts"]) == list(gpu_check.PARTS)
    for name, part in report["parts"].items():
        assert part["status"] in ("ok", "skipped"), (name, part.get("error"), part.get("checks"))
        assert part["seconds"] >= 0 and part["budget_seconds"] > 0
        if part["status"] == "skipped":
            assert part["reason"].startswith("skipped:"), name
        for check in part.get("checks", []):
            assert check["status"] in ("ok", "skipped"), (name, check)
            if check["status"] == "skipped":
                assert check["reason"], (name, check)
        assert f"## {name.capitalize()}" in markdown

    # every CPU-capable code path ran: nothing of these is skipped on a CPU
    parts = report["parts"]
    assert parts["environment"]["status"] == "ok"
    assert set(parts["environment"]["gemm"]) == {"bf16", "fp32"}
    correctness = {check["name"]: check for check in parts["correctness"]["checks"]}
    for model in (
        "MimCoModel",
        "MimCoForPreTraining",
        "MimCoForImageClassification",
        "MimCoForContrastivePreTraining",
    ):
        assert correctness[f"fp32_cpu_vs_cpu[{model}]"]["status"] == "ok"
    for name in ("fused_adamw_nan_skip", "torch_compile", "sdpa_fused_kernels_bf16", "save_load_round_trip"):
        assert correctness[name]["status"] == "ok", correctness[name]
    assert correctness["sdpa_fused_kernels_bf16"]["negative_control"] == "refused as expected"
    variants = parts["throughput"]["variants"]
    for name in ("stage2_eager", "stage2_reference", "stage1_eager", "stage2_gradient_checkpointing"):
        assert variants[name]["images_per_second"] > 0
        assert variants[name]["utilisation_vs_measured_gemm"] > 0
    assert {"stage2", "stage1"} <= set(parts["throughput"]["max_batch"])
    # the whole stage-2 model compiled: one graph, no graph break, no recompilation while it is timed
    compile_modes = parts["throughput"]["compile_modes"]["tiny"]
    assert compile_modes["graph_breaks"] == 0 and compile_modes["recompilations_while_timing"] == 0
    assert compile_modes["images_per_second"]["tiny_compiled_default"] > 0
    assert "Whole stage-2 model compiled" in markdown
    assert parts["data"]["all_workers"]["images_per_second"] > 0
    assert "gpu_starved" in parts["data"]["versus_step"]
    assert parts["data"]["device_jpeg_decoding"]["decode_images_per_second"] > 0
    # stage 1's loader, whole and with the photometric half on the device, against the stage-1 step
    assert parts["data"]["stage1_all_workers"]["images_per_second"] > 0
    assert parts["data"]["stage1_photometric_on_device"]["device_photometric_images_per_second"] > 0
    assert "augment_on_device_keeps_up" in parts["data"]["stage1_versus_step"]
    # the reproduction runs when the CIFAR-10 copy is there and says why not otherwise; on the CPU it rehearses the
    # GPU run's design at tiny sizes: 2 seeds whose students share one teacher, the 6 rows, the seed summary
    reproduce = parts["reproduce"]
    if reproduce["status"] == "ok":
        rows = {f"seed-{seed}/{row}" for seed in (0, 1) for row in gpu_check.reproduction.ROWS}
        assert set(reproduce["rows_finished"]) == rows
        assert "--seeds 0 1" in reproduce["command"] and "--smoke" in reproduce["command"]
        folder = output / "reproduce"
        assert (folder / "teacher" / "config.json").is_file() and not (folder / "seed-1" / "teacher").exists()
        compared = {(item["row"], item["metric"]) for item in reproduce["comparisons"]}
        assert ("pixel_mim_matched", "finetune_top1") in compared and ("teacher", "knn_top1_cls") in compared
        assert "| MimCo student against |" in markdown and "larger than the spread?" in markdown
    # the smoke run must stay cheap enough for CI (its budget is 4 minutes; allow for a loaded machine)
    assert report["total_seconds"] < 240, report["total_seconds"]
    assert seconds < 360


def test_arguments_and_skips(tmp_path):
    args = gpu_check.GpuCheckArguments(smoke=True, output_dir=str(tmp_path), dataset_dir=str(tmp_path / "absent"))
    assert args.device == "cpu" and args.max_minutes <= 4 and args.model_preset == "tiny"
    assert args.compile_backend == "aot_eager"
    part = gpu_check.run_part("reproduce", args, {}, time.perf_counter() + 60)
    assert part["status"] == "skipped" and "CIFAR-10 not found" in part["reason"]
    with pytest.raises(ValueError, match="unknown parts"):
        gpu_check.GpuCheckArguments(parts="environment,nonsense", smoke=True)
    if not torch.cuda.is_available():  # the full sizes are refused on a CPU unless asked for by name
        with pytest.raises(ValueError, match="--smoke"):
            gpu_check.GpuCheckArguments()
        assert gpu_check.GpuCheckArguments(device="cpu").batch_size == 128
    # a part that raises is reported as failed, with its error, and does not stop the run
    failing = gpu_check.PART_FUNCTIONS["environment"]
    try:
        gpu_check.PART_FUNCTIONS["environment"] = lambda *a: 1 / 0
        part = gpu_check.run_part("environment", args, {}, time.perf_counter() + 60)
    finally:
        gpu_check.PART_FUNCTIONS["environment"] = failing
    assert part["status"] == "failed" and "ZeroDivisionError" in part["error"]
    # an exhausted run deadline skips the remaining parts with a reason
    part = gpu_check.run_part("data", args, {}, time.perf_counter() - 1)
    assert part["status"] == "skipped" and part["reason"].startswith("skipped:")
