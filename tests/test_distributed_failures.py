"""What the processes of a launched run do when one of them dies, hangs, or when every one is refused.

Two "machines" on loopback (`accelerate launch --num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1`, one
process each, each machine its own launcher as on a cluster), so that the surviving machine's launcher does not stop
its process itself, as a single launcher would:

- a process stopped (SIGSTOP) after a checkpoint: the other ends within `--ddp_timeout` plus a margin, with one line
  that names the timeout, the step and its last complete checkpoint, which verifies; both machines relaunched with
  `--resume_from_checkpoint latest` finish as the uninterrupted run;
- a process killed (SIGKILL): the other ends at once with one line naming the lost rank and how to resume;
- a refused request under a 2-process launch: the `error:` line appears once, printed by the main process.

The quick tests below them hold the pieces: which errors are a lost or hung peer, the line, `--ddp_timeout`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from test_launch import (
    COMMON,
    NUM_PROCESSES,
    PER_PROCESS_BATCH,
    REPO,
    SCRIPTS,
    STAGE1_LOSS_ATOL,
    STAGE1_RUNNING_STATS_ATOL,
    STAGE1_WEIGHT_ATOL,
    _assert_same_run,
    _env,
    _free_port,
    _launch,
)
from transformers import HfArgumentParser, TrainingArguments

from modeling_mimco import MimCoModel
from modeling_mimco.commands import reports_errors
from modeling_mimco.commands.run_contrastive_pretraining import ContrastivePreTrainingArguments
from modeling_mimco.commands.run_finetuning import FineTuningArguments
from modeling_mimco.commands.run_pretraining import MimCoPreTrainingArguments
from modeling_mimco.commands.run_semantic_segmentation import SegmentationTrainingArguments
from modeling_mimco.errors import MimCoError, ProcessGroupFailure
from modeling_mimco.evaluation.finetuning import CpuProcessGroupTimeout
from modeling_mimco.training.arguments import PreTrainingArguments
from modeling_mimco.training.checkpointing import (
    MANIFEST_NAME,
    last_complete_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from modeling_mimco.training.failures import RunPosition, collective_failure, failure_kind
from modeling_mimco.training.loop import create_accelerator


SCRIPT = "run_contrastive_pretraining.py"
STEPS, CHECKPOINTING_STEPS, DDP_TIMEOUT = 12, 2, 20
# time for the launcher to notice its process ended and for the processes to unwind, on two busy cores
EXIT_MARGIN = 30
STAGE1_ARGS = [
    *COMMON,
    "--learning_rate",
    "1e-4",
    "--max_train_steps",
    str(STEPS),
    "--checkpointing_steps",
    str(CHECKPOINTING_STEPS),
    "--per_device_train_batch_size",
    str(PER_PROCESS_BATCH),
    "--ddp_timeout",
    str(DDP_TIMEOUT),
]
STAGE1_FILES = ("model.safetensors", "contrastive_model/model.safetensors")


def _start_machines(
    root: Path, name: str, args: list[str], script: str = SCRIPT
) -> list[tuple[subprocess.Popen, Path]]:
    """Two launchers, machine 0 and 1 with one process each, their output in `root/name-machineN.log`."""
    port = str(_free_port())
    accelerate = Path(sys.executable).with_name("accelerate")
    env = _env(root, ACCELERATE_USE_CPU="1")
    machines = []
    for rank in range(2):
        launcher = ["--multi_gpu", "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank)]
        launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
        launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
        log = root / f"{name}-machine{rank}.log"
        command = [str(accelerate), "launch", *launcher, str(SCRIPTS / script), *args]
        with open(log, "w") as handle:
            process = subprocess.Popen(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
        machines.append((process, log))
    return machines


def _start_launch(root: Path, name: str, args: list[str]) -> tuple[subprocess.Popen, Path]:
    """`_launch`'s command (one launcher, 2 processes on this machine) started in the background, its output in
    `root/name.log`."""
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = ["--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    log = root / f"{name}.log"
    command = [str(accelerate), "launch", *launcher, str(SCRIPTS / SCRIPT), *args]
    with open(log, "w") as handle:
        process = subprocess.Popen(
            command, env=_env(root, ACCELERATE_USE_CPU="1"), cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
        )
    return process, log


def _processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The launcher and every process below it."""
    try:
        parent = psutil.Process(launcher.pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _training_process(launcher: subprocess.Popen, script: str = SCRIPT) -> psutil.Process:
    workers = [p for p in _processes(launcher)[1:] if any(script in part for part in p.cmdline())]
    assert len(workers) == 1, workers
    return workers[0]


def _kill(machines: list[tuple[subprocess.Popen, Path]]) -> None:
    """SIGKILL to every launcher and process still there (a stopped one too), then waits until all are gone."""
    victims = [process for launcher, _ in machines for process in _processes(launcher)]
    for victim in victims:
        try:
            victim.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=60)
    for launcher, _ in machines:
        launcher.wait(timeout=60)


def _wait_for(path: Path, machines: list[tuple[subprocess.Popen, Path]], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline or any(launcher.poll() is not None for launcher, _ in machines):
            _kill(machines)
            logs = "\n".join(log.read_text()[-3000:] for _, log in machines)
            pytest.fail(f"{path} was not written:\n{logs}")
        time.sleep(0.02)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if ": error: " in line]


def _assert_one_line_no_traceback(output: str) -> str:
    """The run's own output holds one `error:` line and no traceback of the training process (the launcher adds
    its own ChildFailedError summary, which names no file of the package)."""
    lines = _error_lines(output)
    assert len(lines) == 1, output[-4000:]
    assert not re.search(r'File "[^"]*modeling_mimco/', output), output[-4000:]
    assert "DistBackendError" not in output and "RuntimeError" not in output, output[-4000:]
    return lines[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed_failures")


@pytest.mark.slow
def test_a_stopped_process_makes_the_other_exit_after_ddp_timeout_and_the_run_resumes(root):
    output_dir = root / "hung"
    args = [*STAGE1_ARGS, "--output_dir", str(output_dir)]
    uninterrupted = root / "uninterrupted"
    machines = _start_machines(root, "hung", args)
    (machine0, log0), (machine1, _) = machines
    reference = []
    try:
        _wait_for(output_dir / "checkpoints" / f"checkpoint-{CHECKPOINTING_STEPS}" / MANIFEST_NAME, machines)
        worker0 = _training_process(machine0)
        for process in reversed(_processes(machine1)):  # the training process first, then its launcher
            process.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        # The uninterrupted run to compare with trains meanwhile, on the CPU that the waiting machine 0 leaves idle;
        # its load cannot shorten the wait (gloo's timeout) and may only delay the exit after it, within EXIT_MARGIN.
        reference.append(_start_launch(root, "uninterrupted", [*STAGE1_ARGS, "--output_dir", str(uninterrupted)]))
        try:
            machine0.wait(timeout=DDP_TIMEOUT + EXIT_MARGIN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"machine 0 still runs {DDP_TIMEOUT + EXIT_MARGIN} s after machine 1 stopped")
        elapsed = time.monotonic() - stopped
        assert not worker0.is_running() or worker0.status() == psutil.STATUS_ZOMBIE
        # the resumed machines start once it has ended: 2 runs side by side could starve a process past the timeout
        for launcher, log in reference:
            launcher.wait(timeout=300)
            assert launcher.returncode == 0, log.read_text()[-4000:]
    finally:
        _kill([*machines, *reference])
    print(f"machine 0 exited {elapsed:.1f} s after machine 1 stopped (--ddp_timeout {DDP_TIMEOUT})")
    output = log0.read_text()
    assert machine0.returncode != 0
    line = _assert_one_line_no_traceback(output)
    assert f"rank 0 of 2: rank 1 did not answer within --ddp_timeout {DDP_TIMEOUT} s after step" in line, line
    assert "--resume_from_checkpoint latest" in line, line
    # the step the line names is one the run reached, and its checkpoint is the newest complete one
    step = int(re.search(r"after step (\d+) of", line).group(1))
    assert CHECKPOINTING_STEPS <= step < STEPS, line
    checkpoint = re.search(r"the last complete checkpoint is (\S+):", line).group(1)
    complete = [c for c in list_checkpoints(str(output_dir / "checkpoints")) if Path(c, MANIFEST_NAME).exists()]
    assert checkpoint == complete[-1], (line, complete)
    verify_checkpoint(checkpoint)
    # it waited for the timeout (less a little: machine 0 may have been waiting in the collective before the stop)
    assert elapsed >= DDP_TIMEOUT - 5, elapsed

    resumed = _start_machines(root, "resumed", [*args, "--resume_from_checkpoint", "latest"])
    try:
        for launcher, log in resumed:
            launcher.wait(timeout=300)
            assert launcher.returncode == 0, log.read_text()[-4000:]
    finally:
        _kill(resumed)
    assert f"Resumed from {checkpoint}" in resumed[0][1].read_text()
    _assert_same_run(
        output_dir,
        uninterrupted,
        STAGE1_FILES,
        later_loss_atol=STAGE1_LOSS_ATOL,
        weight_atol=STAGE1_WEIGHT_ATOL,
        running_stats_atol=STAGE1_RUNNING_STATS_ATOL,
    )


@pytest.mark.slow
def test_a_killed_process_makes_the_other_exit_at_once_naming_it(root):
    output_dir = root / "lost"
    # a long timeout, so that an exit within EXIT_MARGIN cannot be the timeout's
    args = [*STAGE1_ARGS, "--ddp_timeout", "600", "--output_dir", str(output_dir)]
    machines = _start_machines(root, "lost", args)
    (machine0, log0), (machine1, log1) = machines
    try:
        _wait_for(output_dir / "checkpoints" / f"checkpoint-{CHECKPOINTING_STEPS}" / MANIFEST_NAME, machines)
        _training_process(machine1).send_signal(signal.SIGKILL)
        killed = time.monotonic()
        machine0.wait(timeout=EXIT_MARGIN)
        elapsed = time.monotonic() - killed
        machine1.wait(timeout=EXIT_MARGIN)
    finally:
        _kill(machines)
    print(f"machine 0 exited {elapsed:.1f} s after the process of machine 1 was killed")
    assert machine0.returncode != 0 and machine1.returncode != 0
    line = _assert_one_line_no_traceback(log0.read_text())
    assert "rank 0 of 2: lost rank 1 after step" in line, line
    assert "run the same command with --resume_from_checkpoint latest" in line, line
    assert elapsed < EXIT_MARGIN, elapsed  # a dead peer is noticed at once, not after the timeout
    assert not _error_lines(log1.read_text())


@pytest.mark.slow
def test_a_killed_process_ends_a_finetuning_run_in_one_line(root, tiny_mimco_config):
    """`mimco-finetune` (the `Trainer`) reports a lost peer as the pre-training commands do, naming the `Trainer`
    checkpoint to resume from."""
    pretrained = root / "finetune-pretrained"
    MimCoModel(tiny_mimco_config()).save_pretrained(pretrained)
    output_dir = root / "finetune-lost"
    args = ["--model_name_or_path", str(pretrained), "--output_dir", str(output_dir), "--dataset_name", "digits"]
    args += ["--max_train_samples", "256", "--max_eval_samples", "16", "--per_device_train_batch_size", "4"]
    args += ["--max_steps", "200", "--save_strategy", "steps", "--save_steps", "2", "--ddp_timeout", "600"]
    args += ["--report_to", "none", "--dataloader_pin_memory", "false", "--do_train", "--eval_strategy", "no"]
    machines = _start_machines(root, "finetune-lost", args, script="run_finetuning.py")
    (machine0, log0), (machine1, log1) = machines
    try:
        _wait_for(output_dir / "checkpoint-2" / "trainer_state.json", machines)
        _training_process(machine1, "run_finetuning.py").send_signal(signal.SIGKILL)
        machine0.wait(timeout=EXIT_MARGIN)
        machine1.wait(timeout=EXIT_MARGIN)
    finally:
        _kill(machines)
    assert machine0.returncode != 0 and machine1.returncode != 0
    line = _assert_one_line_no_traceback(log0.read_text())
    assert "rank 0 of 2: lost rank 1 after step" in line and "of 200" in line, line
    assert re.search(r"the last complete checkpoint is \S*checkpoint-\d+: run the same command with ", line), line
    assert "--resume_from_checkpoint " in line, line


@pytest.mark.slow
@pytest.mark.parametrize(
    "refused, expected",
    [
        (["--learning_rate", "-1"], "--learning_rate must be positive"),  # before any process group exists
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a GPU"),  # once the processes are a group
    ],
    ids=["bad_argument", "refused_by_the_accelerator"],
)
def test_a_refused_request_under_two_processes_is_printed_once(root, refused, expected):
    output_dir = root / f"refused-{refused[0].strip('-')}"
    args = [*STAGE1_ARGS, *refused, "--output_dir", str(output_dir)]
    completed = _launch(SCRIPT, args, _env(root))
    assert completed.returncode != 0
    output = completed.stdout + completed.stderr
    lines = _error_lines(output)
    assert len(lines) == 1 and expected in lines[0], output[-4000:]
    assert NUM_PROCESSES == 2


# --- the pieces, without launching ----------------------------------------------------------------------------------

# What gloo raised in the runs above (torch 2.14), and what NCCL raises for the same events.
GLOO_LOST = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:4993. This is "
    "typically caused by a remote worker crashing."
)
GLOO_TIMEOUT = "[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:129] Timed out waiting 20000ms for send"
NCCL_TIMEOUT = "Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, OpType=ALLREDUCE) ran for 600000 ms"


@pytest.mark.parametrize(
    "error, kind",
    [
        (RuntimeError(GLOO_LOST), "lost"),
        (RuntimeError("[pair.cc:598] Read error [127.0.0.1]:51234: Connection reset by peer"), "lost"),
        (RuntimeError(GLOO_TIMEOUT), "timeout"),
        (RuntimeError(NCCL_TIMEOUT), "timeout"),
        (RuntimeError("DataLoader timed out after 120 seconds"), None),
        (RuntimeError("mat1 and mat2 shapes cannot be multiplied"), None),
        (MimCoError("the run timed out"), None),  # the package's own errors keep their message
        (ValueError("connection reset by peer"), None),
    ],
)
def test_which_errors_are_a_lost_or_hung_peer(error, kind):
    assert failure_kind(error) == kind


def _checkpoint(output_dir: Path, step: int, complete: bool = True) -> Path:
    folder = output_dir / "checkpoints" / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    if complete:
        (folder / MANIFEST_NAME).write_text('{"files": {}}')
    return folder


def test_the_line_names_the_peer_the_step_and_the_last_complete_checkpoint(tmp_path):
    _checkpoint(tmp_path, 2)
    four = _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # a save that a failure cut short has no manifest
    (tmp_path / "checkpoints" / ".tmp-checkpoint-8").mkdir()
    assert last_complete_checkpoint(str(tmp_path)) == str(four)
    position = RunPosition(state=SimpleNamespace(global_step=7), max_train_steps=300)
    failure = collective_failure(
        RuntimeError(GLOO_LOST),
        last_checkpoint=last_complete_checkpoint(str(tmp_path)),
        ddp_timeout=1800,
        rank=1,
        num_processes=2,
        position=position,
    )
    assert isinstance(failure, ProcessGroupFailure)
    assert str(failure) == (
        f"rank 1 of 2: lost rank 0 after step 7 of 300 (its connection closed: the process ended); the last complete "
        f"checkpoint is {four}: run the same command with --resume_from_checkpoint latest on every machine."
    )
    failure = collective_failure(
        RuntimeError(GLOO_TIMEOUT),
        last_checkpoint=str(four),
        ddp_timeout=20,
        rank=2,
        num_processes=4,
        position=position,
    )
    assert str(failure).startswith(
        "rank 2 of 4: another process did not answer within --ddp_timeout 20 s after step 7 of 300"
    )
    assert "\n" not in str(failure)
    assert last_complete_checkpoint(str(tmp_path / "empty")) is None
    failure = collective_failure(
        RuntimeError(GLOO_LOST), last_checkpoint=None, ddp_timeout=20, rank=0, num_processes=2, position=RunPosition()
    )
    assert "before the first step" in str(failure) and "no complete checkpoint yet" in str(failure)
    # one process has no peer to lose; another error is no failure of the group
    kwargs = dict(last_checkpoint=str(four), ddp_timeout=20, rank=0, position=position)
    assert collective_failure(RuntimeError(GLOO_LOST), num_processes=1, **kwargs) is None
    assert collective_failure(RuntimeError("shapes differ"), num_processes=2, **kwargs) is None


def test_ddp_timeout_is_a_flag_of_every_training_command(tmp_path):
    """The pre-training commands' `--ddp_timeout` has transformers' name and default, and reaches the process
    group through the Accelerator; fine-tuning and segmentation have transformers' own."""
    for arguments in (ContrastivePreTrainingArguments, MimCoPreTrainingArguments):
        (parsed,) = HfArgumentParser(arguments).parse_args_into_dataclasses(
            args=["--output_dir", str(tmp_path), "--ddp_timeout", "20"]
        )
        assert parsed.ddp_timeout == 20
        assert arguments(output_dir=str(tmp_path)).ddp_timeout == TrainingArguments.ddp_timeout == 1800
    with pytest.raises(ValueError, match="--ddp_timeout must be positive"):
        PreTrainingArguments(output_dir=str(tmp_path), ddp_timeout=0)
    for arguments in (FineTuningArguments, SegmentationTrainingArguments):
        assert arguments.__dataclass_fields__["ddp_timeout"].default == 1800
    accelerator = create_accelerator(PreTrainingArguments(output_dir=str(tmp_path / "run"), ddp_timeout=20))
    assert accelerator.init_handler.timeout == timedelta(seconds=20)


class _Exited(Exception):
    pass


def _exit_at_once(code: int):
    raise _Exited(code)


def test_only_the_main_process_prints_a_refusal_but_every_process_a_lost_peer(monkeypatch, capsys):
    """Under a launcher (its `RANK`, no process group yet), an expected error is printed by rank 0 only; every
    process prints a lost peer and ends at once (`os._exit`, faked here; the launches above end for real)."""
    error = MimCoError("--output_dir 'out' is in use by another run.")

    @reports_errors
    def main(argv=None):
        raise error

    monkeypatch.delenv("MIMCO_TRACEBACK", raising=False)
    monkeypatch.setattr(sys, "argv", ["run_pretraining.py"])
    for rank, expected in (("0", "run_pretraining.py: error: --output_dir 'out' is in use by another run."), ("1", 1)):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exited:
            main()
        assert exited.value.code == expected  # a message is printed on stderr with exit code 1
    monkeypatch.delenv("RANK")  # no launcher: the one process is the main one
    with pytest.raises(SystemExit, match="error: --output_dir"):
        main()
    error = ProcessGroupFailure("rank 1 of 2: lost rank 0 after step 3 of 12; ...")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(os, "_exit", _exit_at_once)
    capsys.readouterr()
    with pytest.raises(_Exited) as exited:
        main()
    assert exited.value.args == (1,)
    assert capsys.readouterr().err == "run_pretraining.py: error: rank 1 of 2: lost rank 0 after step 3 of 12; ...\n"


PROCESS_GROUP_TIMEOUT = """
import sys
import torch
from transformers import HfArgumentParser
from modeling_mimco.commands.run_finetuning import FineTuningArguments

(args,) = HfArgumentParser(FineTuningArguments).parse_args_into_dataclasses(args=sys.argv[1:])
group = torch.distributed.distributed_c10d._get_default_group()
timeout = group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
print(f"rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: timeout {timeout:g} s")
"""


@pytest.mark.slow
def test_finetuning_processes_on_cpus_get_ddp_timeout(tmp_path):
    """transformers passes `--ddp_timeout` to the process group on GPUs only; `mimco-finetune` and `mimco-segment`
    (`CpuProcessGroupTimeout`) pass it on CPUs too."""
    assert issubclass(SegmentationTrainingArguments, CpuProcessGroupTimeout)
    script = tmp_path / "process_group_timeout.py"
    script.write_text(PROCESS_GROUP_TIMEOUT)
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--main_process_port", str(_free_port())]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    args = ["--output_dir", str(tmp_path / "out"), "--ddp_timeout", "20", "--report_to", "none"]
    completed = subprocess.run(
        [str(accelerate), "launch", *launcher, str(script), *args],
        env={**_env(tmp_path), "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    # the two processes share the launcher's stdout, so their lines may run into each other
    assert sorted(re.findall(r"rank \d+ of \d+: timeout \d+(?:\.\d+)? s", completed.stdout)) == [
        "rank 0 of 2: timeout 20 s",
        "rank 1 of 2: timeout 20 s",
    ], completed.stdout[-3000:] + completed.stderr[-3000:]
