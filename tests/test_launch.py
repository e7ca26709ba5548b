"""The pre-training scripts as a user launches them: `accelerate launch` with 2 real processes (gloo on the CPU),
compared with one process on the global batch, through the same `scripts/*.py` files the README shows.

Every image's augmentation and mask are seeded by (seed, epoch, image index), and every loss with in-batch negatives
gathers them across processes, so 2 processes x batch 4 must train exactly like 1 process x batch 8: the logged
per-step losses and the saved weights agree to 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
ATOL = 1e-5
STAGE1_STEPS, STAGE2_STEPS = 2, 3
PER_PROCESS_BATCH = 4
NUM_PROCESSES = 2
LOSS_KEYS = ("loss", "patch_loss", "image_loss")

COMMON = ["--model_preset", "tiny", "--report_to", "none", "--logging_steps", "1"]
# Stage 1 is compared over 2 steps at a base learning rate of 1e-4 (3.1e-6 per step at batch 8). Its BatchNorm
# layers make some gradients exactly zero in theory (the encoder's final LayerNorm bias feeds a Linear + BatchNorm,
# which removes any constant shift) and rounding noise in practice; Adam's first steps are about +-lr whatever the
# gradient's size, so the noise's sign, which differs between one and two processes, moves those weights by up to
# a few lr, and the batch-8 BatchNorm statistics amplify the difference in the next step's loss and in the running
# statistics. So stage 1 is held to ATOL only where no update has happened yet (the first step's loss: forward,
# data sharding and synchronised BatchNorm) and to looser bounds after it. Seen on an Intel Xeon: loss 5.6e-6,
# weights 5.7e-6; on an AMD EPYC: first loss 4.8e-7, second loss 3.4e-5, trainable weights 9.2e-6, BatchNorm running
# statistics 1.1e-4 (the momentum encoder, which moves 1 % as far, 3.2e-8). Stage 2 has no BatchNorm and agrees to
# ~1e-7 everywhere.
STAGE1_LOSS_ATOL, STAGE1_WEIGHT_ATOL, STAGE1_RUNNING_STATS_ATOL = 2e-4, 3e-5, 5e-4
STAGE1 = ["--learning_rate", "1e-4", "--max_train_steps", str(STAGE1_STEPS)]
# stochastic depth as SimMIM and BEiT pre-train with: drawn per image, it must not break the equivalence
STAGE2 = ["--head_hidden_size", "32", "--max_train_steps", str(STAGE2_STEPS), "--drop_path_rate", "0.1"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env(tmp_path: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TQDM_DISABLE="1",
        # no accelerate config file of the user's: only what the command line (or --config_file) says
        HF_HOME=str(tmp_path / "hf_home"),
    )
    env.update(extra)
    return env


def _run(command: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _launch(script: str, args: list[str], env: dict, *launcher_args: str) -> subprocess.CompletedProcess:
    """`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/SCRIPT ...`, as the README says."""
    if not launcher_args:
        launcher_args = ("--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1")
        launcher_args += ("--mixed_precision", "no", "--dynamo_backend", "no")
        launcher_args += ("--main_process_port", str(_free_port()))
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", *launcher_args, str(SCRIPTS / script), *args]
    return _run(command, {**env, "ACCELERATE_USE_CPU": "1"})


def _single(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    return _run([sys.executable, str(SCRIPTS / script), *args], env)


def _ok(completed: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    return completed


def _results(folder: Path) -> dict:
    return json.loads((folder / "train_results.json").read_text())


def _assert_same_run(
    two: Path,
    one: Path,
    weight_files: tuple[str, ...],
    later_loss_atol: float = ATOL,
    weight_atol: float = ATOL,
    running_stats_atol: float = ATOL,
) -> None:
    """The 2-process run `two` against the 1-process run `one`: the first step's losses to ATOL, later losses to
    `later_loss_atol`, saved weights to `weight_atol` (BatchNorm running statistics to `running_stats_atol`)."""
    history_two, history_one = _results(two)["log_history"], _results(one)["log_history"]
    assert [r["step"] for r in history_two] == [r["step"] for r in history_one]
    assert [r["step"] for r in history_one] == list(range(1, len(history_one) + 1)) and len(history_one) >= 2
    for record_two, record_one in zip(history_two, history_one):
        atol = ATOL if record_one["step"] == 1 else later_loss_atol
        for key in LOSS_KEYS:
            if key in record_one:
                assert record_two[key] == pytest.approx(record_one[key], abs=atol), (key, record_two, record_one)
    for name in weight_files:
        weights_two, weights_one = load_file(two / name), load_file(one / name)
        assert weights_two.keys() == weights_one.keys()
        for key in weights_one:
            difference = (weights_two[key].double() - weights_one[key].double()).abs().max().item()
            bound = running_stats_atol if ".running_" in key else weight_atol
            assert difference <= bound, f"{name}: {key} differs by {difference:.2e}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Both stages, each launched with 2 processes x batch 4 and run in 1 process x batch 8."""
    root = tmp_path_factory.mktemp("launch")
    env = _env(root)
    batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH)]
    big_batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    folders = {name: root / name for name in ("stage1_two", "stage1_one", "stage2_two", "stage2_one")}
    stage1 = [*COMMON, *STAGE1]
    folders["stage1_launch"] = _ok(
        _launch("run_contrastive_pretraining.py", [*stage1, *batch, "--output_dir", str(folders["stage1_two"])], env)
    )
    _ok(
        _single(
            "run_contrastive_pretraining.py", [*stage1, *big_batch, "--output_dir", str(folders["stage1_one"])], env
        )
    )
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(folders["stage1_two"])]
    # The 2-process stage-2 run is launched through a written accelerate config file: on a machine without GPUs, the
    # same MULTI_GPU launch as `--multi_gpu` plus ACCELERATE_USE_CPU=1 (`use_cpu: true` would start one process).
    config_file = root / "accelerate_config.yaml"
    config_file.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        f"num_processes: {NUM_PROCESSES}\n"
        "num_machines: 1\n"
        "machine_rank: 0\n"
        "main_process_ip: 127.0.0.1\n"
        f"main_process_port: {_free_port()}\n"
        "mixed_precision: 'no'\n"
        "use_cpu: false\n"
        "dynamo_config: {}\n"
    )
    folders["stage2_launch"] = _ok(
        _launch(
            "run_pretraining.py",
            [*stage2, *batch, "--output_dir", str(folders["stage2_two"])],
            env,
            "--config_file",
            str(config_file),
        )
    )
    _ok(_single("run_pretraining.py", [*stage2, *big_batch, "--output_dir", str(folders["stage2_one"])], env))
    folders["root"] = root
    return folders


def test_stage1_two_processes_train_like_one_process_on_the_global_batch(runs):
    _assert_same_run(
        runs["stage1_two"],
        runs["stage1_one"],
        ("model.safetensors", "contrastive_model/model.safetensors"),
        later_loss_atol=STAGE1_LOSS_ATOL,
        weight_atol=STAGE1_WEIGHT_ATOL,
        running_stats_atol=STAGE1_RUNNING_STATS_ATOL,
    )
    assert _results(runs["stage1_two"])["num_processes"] == 2
    assert _results(runs["stage1_two"])["distributed_type"] == "MULTI_CPU"


def test_stage2_launched_from_a_config_file_trains_like_one_process(runs):
    _assert_same_run(runs["stage2_two"], runs["stage2_one"], ("model.safetensors",))
    assert _results(runs["stage2_two"])["num_processes"] == 2
    assert _results(runs["stage2_one"])["num_processes"] == 1


def test_stage2_checkpoint_of_one_process_resumes_on_two_like_the_uninterrupted_run(runs):
    """A checkpoint written by 1 process (batch 8) resumed by 2 processes (batch 4 each, the same global batch)
    continues as the uninterrupted 1-process run, drop path included: every image's augmentation, mask and
    stochastic depth come from its own seed, not from how the batch is split."""
    root, env = runs["root"], _env(runs["root"])
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(runs["stage1_two"]), "--checkpointing_steps", "1"]
    written = root / "stage2_checkpointed_one"
    big_batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    _ok(_single("run_pretraining.py", [*stage2, *big_batch, "--output_dir", str(written)], env))
    resumed = root / "stage2_resumed_two"
    _resume_elsewhere(written, resumed)
    batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH)]
    _ok(
        _launch(
            "run_pretraining.py",
            [*stage2, *batch, "--output_dir", str(resumed), "--resume_from_checkpoint", "latest"],
            env,
        )
    )
    assert _results(resumed)["num_processes"] == 2
    _assert_same_run(resumed, runs["stage2_one"], ("model.safetensors",))


def test_stage2_checkpoint_of_two_processes_resumes_on_one_like_the_uninterrupted_run(runs):
    """The other way round: a checkpoint written by 2 processes x 4 resumed by 1 process x 8."""
    root, env = runs["root"], _env(runs["root"])
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(runs["stage1_two"]), "--checkpointing_steps", "1"]
    written = root / "stage2_checkpointed_two"
    batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH)]
    _ok(_launch("run_pretraining.py", [*stage2, *batch, "--output_dir", str(written)], env))
    resumed = root / "stage2_resumed_one"
    _resume_elsewhere(written, resumed)
    big_batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    resume = ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"]
    _ok(_single("run_pretraining.py", [*stage2, *big_batch, *resume], env))
    assert _results(resumed)["num_processes"] == 1
    _assert_same_run(resumed, runs["stage2_one"], ("model.safetensors",))


def _resume_elsewhere(written: Path, resumed: Path) -> None:
    """Copies the first checkpoint of `written` into a fresh output folder `resumed`, as a job that comes back on
    another allocation finds its checkpoint."""
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(written / "checkpoints" / "checkpoint-1", resumed / "checkpoints" / "checkpoint-1")


@pytest.mark.parametrize("written_on, resumed_on", [(1, 2), (2, 1)], ids=["1_to_2", "2_to_1"])
def test_stage1_checkpoint_resumes_on_another_process_count_like_the_uninterrupted_run(runs, written_on, resumed_on):
    """Stage 1 (BatchNorm in the projector and predictor, the momentum encoder, two views) written by N processes
    and resumed by M with the same global batch: the second step's loss and the final weights are those of the
    uninterrupted 1-process run, to stage 1's bounds (see STAGE1_LOSS_ATOL)."""
    root, env = runs["root"], _env(runs["root"])
    stage1 = [*COMMON, *STAGE1, "--checkpointing_steps", "1"]

    def run(processes: int, args: list[str]) -> subprocess.CompletedProcess:
        batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES // processes)]
        if processes == 1:
            return _ok(_single("run_contrastive_pretraining.py", [*stage1, *batch, *args], env))
        return _ok(_launch("run_contrastive_pretraining.py", [*stage1, *batch, *args], env))

    written = root / f"stage1_checkpointed_{written_on}"
    run(written_on, ["--output_dir", str(written)])
    resumed = root / f"stage1_resumed_{written_on}_on_{resumed_on}"
    _resume_elsewhere(written, resumed)
    run(resumed_on, ["--output_dir", str(resumed), "--resume_from_checkpoint", "latest"])
    assert _results(resumed)["num_processes"] == resumed_on
    _assert_same_run(
        resumed,
        runs["stage1_one"],
        ("model.safetensors", "contrastive_model/model.safetensors"),
        later_loss_atol=STAGE1_LOSS_ATOL,
        weight_atol=STAGE1_WEIGHT_ATOL,
        running_stats_atol=STAGE1_RUNNING_STATS_ATOL,
    )


def test_two_machines_on_loopback_train_like_one_machine(runs):
    """`accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one process per
    "machine", each machine its own launcher as on a cluster: stage 2 trains as the 1-process run on the same global
    batch (and so as one machine with 2 processes)."""
    root, env = runs["root"], _env(runs["root"], ACCELERATE_USE_CPU="1")
    output_dir = root / "stage2_two_machines"
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(runs["stage1_two"])]
    args = [*stage2, "--per_device_train_batch_size", str(PER_PROCESS_BATCH), "--output_dir", str(output_dir)]
    port = str(_free_port())
    accelerate = Path(sys.executable).with_name("accelerate")
    machines = []
    for rank in range(2):
        launcher = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        command = [str(accelerate), "launch", *launcher, str(SCRIPTS / "run_pretraining.py"), *args]
        machines.append(
            subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [machine.communicate(timeout=300) for machine in machines]
    for machine, (stdout, stderr) in zip(machines, outputs):
        assert machine.returncode == 0, stdout[-3000:] + stderr[-5000:]
    results = _results(output_dir)
    assert results["num_processes"] == 2 and results["distributed_type"] == "MULTI_CPU"
    _assert_same_run(output_dir, runs["stage2_one"], ("model.safetensors",))


def test_launch_prints_the_start_banner_and_one_plain_line_per_logging_step(runs):
    stdout = runs["stage2_launch"].stdout
    assert stdout.count("***** Running training *****") == 1  # the main process only
    for expected in (
        "Num examples = ",
        "Instantaneous batch size per device = 4",
        "Total train batch size (w. parallel, distributed & accumulation) = 8",
        "Gradient accumulation steps = 1",
        f"Total optimization steps = {STAGE2_STEPS}",
        "Distributed type = MULTI_CPU, processes = 2",
        "Mixed precision = no",
    ):
        assert expected in stdout, expected
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in lines] == [f"step {step}/{STAGE2_STEPS}" for step in (1, 2, 3)]
    assert all("loss " in line and "lr " in line for line in lines)


def test_launcher_mixed_precision_is_what_the_run_records(tmp_path, runs):
    """bf16 set by the launcher alone (not by --mixed_precision) is what train_results.json and hparams record."""
    output_dir = tmp_path / "bf16"
    args = [*COMMON, *STAGE2, "--teacher_name_or_path", str(runs["stage1_two"]), "--output_dir", str(output_dir)]
    args += ["--per_device_train_batch_size", "4", "--max_train_steps", "1", "--report_to", "tensorboard"]
    args += ["--with_tracking"]
    launcher = ("--num_processes", "1", "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no")
    completed = _ok(_launch("run_pretraining.py", args, _env(tmp_path), *launcher))
    assert "Mixed precision = bf16" in completed.stdout
    assert _results(output_dir)["mixed_precision"] == "bf16"
    hparams = list((output_dir / "logs").rglob("events.out.tfevents.*"))
    assert hparams, "TensorBoard wrote no event file"
    assert any(b"bf16" in path.read_bytes() for path in hparams)
