"""FSDP2 as a user launches it: `accelerate launch --config_file fsdp.yaml` (the README's config, `fsdp_version: 2`)
with 2 real processes (gloo on the CPU), against the same launch with DDP on the same global batch.

The trained weights are sharded (per transformer block, plus the root); the frozen teacher (stage 2) and the
momentum branch (stage 1) stay whole on every process. With 2 processes a gradient's reduction is the sum of two
numbers either way, so stage 2 trains bit for bit as DDP (measured difference 0 in every loss and weight). Stage 1
differs by rounding only: the EMA of a sharded block reads its all-gathered weight with `lerp_`, DDP's one
`_foreach_lerp_` (momentum encoder 9e-10 after 2 steps), and the clipped gradient norm sums the squares of each
shard first (grad_norm 54.5288 vs 54.5271, float64 says 54.5298), which Adam's first steps turn into up to ~2 lr on
the weights whose gradient is rounding noise (see test_launch's STAGE1 bounds): measured losses 4.8e-7, trainable
weights 2.3e-6, BatchNorm running statistics 2.5e-6. Both stages are held to ATOL where DDP and FSDP round alike and
to test_launch's stage-1 bounds elsewhere.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file
from test_launch import (
    ATOL,
    COMMON,
    NUM_PROCESSES,
    PER_PROCESS_BATCH,
    REPO,
    SCRIPTS,
    STAGE1,
    STAGE1_LOSS_ATOL,
    STAGE1_RUNNING_STATS_ATOL,
    STAGE1_WEIGHT_ATOL,
    STAGE2,
    STAGE2_STEPS,
    _assert_same_run,
    _env,
    _free_port,
    _launch,
    _ok,
    _results,
    _run,
)

from modeling_mimco import MimCoForPreTraining
from modeling_mimco.training.checkpointing import MANIFEST_NAME, list_checkpoints, verify_checkpoint
from modeling_mimco.training.sharding import SHARDED_MODEL_DIR


pytestmark = pytest.mark.slow

# The README's FSDP2 config (without the port, which each launch picks).
FSDP_CONFIG = (
    "compute_environment: LOCAL_MACHINE\n"
    "distributed_type: FSDP\n"
    f"num_processes: {NUM_PROCESSES}\n"
    "num_machines: 1\n"
    "machine_rank: 0\n"
    "main_process_ip: 127.0.0.1\n"
    "mixed_precision: 'no'\n"
    "use_cpu: false\n"
    "fsdp_config:\n"
    "  fsdp_version: 2\n"
    "  fsdp_reshard_after_forward: true\n"
)
BATCH = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH)]
STAGE1_FILES = ("model.safetensors", "contrastive_model/model.safetensors")


def _launch_fsdp(root: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    config = root / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    launcher = ("--config_file", str(config), "--main_process_port", str(_free_port()))
    return _launch(script, [*args, *BATCH], _env(root), *launcher)


def _launch_ddp(root: Path, script: str, args: list[str]) -> subprocess.CompletedProcess:
    return _launch(script, [*args, *BATCH], _env(root))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Stage 1 and stage 2, each with DDP and with FSDP on 2 processes x batch 4; the FSDP runs checkpoint every step.
    Stage 2's teacher is the DDP stage 1."""
    root = tmp_path_factory.mktemp("fsdp")
    folders = {name: root / name for name in ("stage1_ddp", "stage1_fsdp", "stage2_ddp", "stage2_fsdp")}
    stage1 = [*COMMON, *STAGE1]
    _ok(_launch_ddp(root, "run_contrastive_pretraining.py", [*stage1, "--output_dir", str(folders["stage1_ddp"])]))
    checkpoints = ["--checkpointing_steps", "1"]
    folders["stage1_launch"] = _ok(
        _launch_fsdp(
            root,
            "run_contrastive_pretraining.py",
            [*stage1, *checkpoints, "--output_dir", str(folders["stage1_fsdp"])],
        )
    )
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(folders["stage1_ddp"])]
    _ok(_launch_ddp(root, "run_pretraining.py", [*stage2, "--output_dir", str(folders["stage2_ddp"])]))
    folders["stage2_launch"] = _ok(
        _launch_fsdp(root, "run_pretraining.py", [*stage2, *checkpoints, "--output_dir", str(folders["stage2_fsdp"])])
    )
    folders["root"], folders["stage2_args"] = root, [*stage2, *checkpoints]
    return folders


def test_stage2_fsdp_trains_like_ddp_on_the_same_global_batch(runs):
    fsdp, ddp = runs["stage2_fsdp"], runs["stage2_ddp"]
    _assert_same_run(fsdp, ddp, ("model.safetensors",))
    results = _results(fsdp)
    assert results["fsdp"] is True and results["num_processes"] == 2
    assert _results(ddp)["fsdp"] is False
    assert "FSDP2 (trained weights sharded)" in runs["stage2_launch"].stdout
    # the final folder is an ordinary one, as DDP writes it: same files, and it loads with from_pretrained
    assert set(os.listdir(fsdp)) - {"checkpoints"} == set(os.listdir(ddp))
    model = MimCoForPreTraining.from_pretrained(fsdp)
    saved = load_file(ddp / "model.safetensors")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[name], rtol=0, atol=ATOL)


def test_fsdp_runs_print_no_view_warning(runs):
    """FSDP2 warns when a sharded module returns a view tensor (an in-place op on it would drop the pre-backward hook
    and give wrong gradients); neither stage's root returns one."""
    for launch in ("stage1_launch", "stage2_launch"):
        output = runs[launch].stdout + runs[launch].stderr
        assert "FSDP2 (trained weights sharded)" in runs[launch].stdout, launch  # the run did shard
        assert "returned a view tensor" not in output, output[-3000:]


def test_stage1_fsdp_trains_like_ddp_on_the_same_global_batch(runs):
    _assert_same_run(
        runs["stage1_fsdp"],
        runs["stage1_ddp"],
        STAGE1_FILES,
        later_loss_atol=STAGE1_LOSS_ATOL,
        weight_atol=STAGE1_WEIGHT_ATOL,
        running_stats_atol=STAGE1_RUNNING_STATS_ATOL,
    )
    assert _results(runs["stage1_fsdp"])["fsdp"] is True


def test_fsdp_shards_the_trained_state_and_keeps_the_frozen_weights_whole(runs):
    """Per process, FSDP holds half of the trained parameters and AdamW states of DDP (up to the padding of a shard),
    and the whole teacher / momentum branch, as DDP does."""
    for stage in ("stage1", "stage2"):
        fsdp = _results(runs[f"{stage}_fsdp"])["state_bytes_per_process"]
        ddp = _results(runs[f"{stage}_ddp"])["state_bytes_per_process"]
        # stage 1's frozen patch projection belongs to the sharded base encoder: a few kB less under FSDP
        assert 0.99 * ddp["frozen_parameters"] <= fsdp["frozen_parameters"] <= ddp["frozen_parameters"], stage
        for key in ("trained_parameters", "optimizer_states"):
            assert ddp[key] / 2 <= fsdp[key] <= ddp[key] / 2 * 1.05, (stage, key, fsdp, ddp)


def test_fsdp_checkpoints_are_sharded_and_verified(runs):
    for stage in ("stage1_fsdp", "stage2_fsdp"):
        checkpoints = list_checkpoints(str(runs[stage] / "checkpoints"))
        assert len(checkpoints) >= 2
        for checkpoint in checkpoints:
            verify_checkpoint(checkpoint)  # the manifest covers every process's shard files
            shards = sorted(os.listdir(Path(checkpoint) / SHARDED_MODEL_DIR))
            assert ".metadata" in shards and sum(name.endswith(".distcp") for name in shards) == NUM_PROCESSES
            assert not (Path(checkpoint) / "model.safetensors").exists()


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL to the launcher and every process it started (torchrun gives its workers sessions of their own, so
    a process-group kill would leave them training), then waits until all are gone."""
    try:
        victims = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        victims = []
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    process.wait(timeout=60)
    psutil.wait_procs(victims, timeout=60)


def test_sigkill_under_fsdp_resumes_from_the_last_checkpoint_like_the_uninterrupted_run(runs):
    """The launcher and both processes are killed (SIGKILL) once checkpoint-1 is complete; the FSDP run resumed from
    `latest` finishes as the uninterrupted FSDP run (and so as DDP)."""
    root = runs["root"]
    output_dir = root / "stage2_fsdp_killed"
    config = root / "fsdp_kill.yaml"
    config.write_text(FSDP_CONFIG)
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = ["--config_file", str(config), "--main_process_port", str(_free_port())]
    args = [*runs["stage2_args"], "--output_dir", str(output_dir)]
    command = [str(accelerate), "launch", *launcher, str(SCRIPTS / "run_pretraining.py"), *args, *BATCH]
    manifest = output_dir / "checkpoints" / "checkpoint-1" / MANIFEST_NAME
    with open(root / "killed.log", "w") as log:
        process = subprocess.Popen(
            command, env={**_env(root), "ACCELERATE_USE_CPU": "1"}, cwd=REPO, stdout=log, stderr=log
        )
        try:
            deadline = time.monotonic() + 240
            while not manifest.exists() and process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
        finally:
            _kill_tree(process)
    assert manifest.exists(), (root / "killed.log").read_text()[-3000:]
    # A late kill may have left more: keep the state of a run killed right after checkpoint-1.
    for checkpoint in list_checkpoints(str(output_dir / "checkpoints")):
        if not checkpoint.endswith("checkpoint-1"):
            shutil.rmtree(checkpoint)
    for name in ("model.safetensors", "train_results.json"):
        (output_dir / name).unlink(missing_ok=True)
    resumed = _ok(_launch_fsdp(root, "run_pretraining.py", [*args, "--resume_from_checkpoint", "latest"]))
    assert "Resumed from" in resumed.stdout and "at step 1" in resumed.stdout
    history = _results(output_dir)["log_history"]
    assert [record["step"] for record in history] == list(range(1, STAGE2_STEPS + 1))
    _assert_same_run(output_dir, runs["stage2_fsdp"], ("model.safetensors",))


def test_a_sharded_checkpoint_is_refused_by_a_run_without_fsdp(runs):
    """A checkpoint of an FSDP run resumed in one process without FSDP: one error line, before any step."""
    root = runs["root"]
    output_dir = root / "stage2_unsharded_resume"
    checkpoint = runs["stage2_fsdp"] / "checkpoints" / "checkpoint-1"
    args = [*runs["stage2_args"], "--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    args += ["--output_dir", str(output_dir), "--resume_from_checkpoint", str(checkpoint)]
    completed = _run([sys.executable, str(SCRIPTS / "run_pretraining.py"), *args], _env(root))
    assert completed.returncode == 1, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "written by an FSDP run" in errors[0], completed.stderr[-3000:]
    assert "step 1/" not in completed.stdout


def test_a_sharded_checkpoint_of_two_processes_resumes_on_one_fsdp_process(runs):
    """The shards of 2 processes reshard onto 1 FSDP process (batch 8, the same global batch), which finishes as the
    uninterrupted 2-process run."""
    root = runs["root"]
    output_dir = root / "stage2_fsdp_resumed_on_one"
    (output_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(runs["stage2_fsdp"] / "checkpoints" / "checkpoint-1", output_dir / "checkpoints" / "checkpoint-1")
    config = root / "fsdp_one.yaml"
    config.write_text(FSDP_CONFIG)
    launcher = ("--config_file", str(config), "--num_processes", "1", "--main_process_port", str(_free_port()))
    args = [*runs["stage2_args"], "--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    args += ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    completed = _ok(_launch("run_pretraining.py", args, _env(root), *launcher))
    assert "Resumed from" in completed.stdout and "processes = 1, FSDP2" in completed.stdout
    _assert_same_run(output_dir, runs["stage2_fsdp"], ("model.safetensors",))
