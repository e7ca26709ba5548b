"""No orphans (`modeling_mimco.training.orphans`): a process whose starter is killed outright ends with it.

- `accelerate launch` killed with SIGKILL: both training processes get SIGTERM, write a checkpoint and exit, which
  frees the output folder's lock, and a relaunch with `--resume_from_checkpoint latest` ends with the weights of the
  uninterrupted run.
- `make demo`'s first process killed with SIGKILL: its second process (`BackgroundRun`) ends within seconds.
- The helper itself, in small processes: the kernel's parent-death signal, the watching thread used where there is
  none, and a parent that had ended before either was set up.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from test_demo import processes_with_environment
from test_launch import (
    COMMON,
    NUM_PROCESSES,
    PER_PROCESS_BATCH,
    REPO,
    SCRIPTS,
    _assert_same_run,
    _env,
    _free_port,
    _launch,
    _ok,
    _results,
    _single,
)

from modeling_mimco.training.checkpointing import OutputDirLock, find_resume_checkpoint, verify_checkpoint


ORPHANS = REPO / "modeling_mimco" / "training" / "orphans.py"
# How long a process may take to end after its parent was killed: one step and a checkpoint of a tiny model on a
# shared 2-core machine (measured: about 1-3 s), or the watching thread's one-second look.
PROMPT = 30


# --- the helper in small processes -----------------------------------------------------------------------------------

# The middle process starts the child and waits; the child loads `orphans.py` by its path (no torch: it starts in
# a fraction of a second), asks for SIGTERM when its parent ends, writes how into a file, and waits. Its SIGTERM
# handler writes another file, as the training loop's would write a checkpoint.
CHILD = textwrap.dedent(
    """
    import importlib.util, signal, sys, time
    spec = importlib.util.spec_from_file_location("orphans", sys.argv[1])
    orphans = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(orphans)
    def on_sigterm(signum, frame):
        open(sys.argv[2], "w").write("SIGTERM")
        sys.exit(143)
    signal.signal(signal.SIGTERM, on_sigterm)
    if sys.argv[3] == "thread":
        orphans._set_parent_death_signal = lambda signum: False  # as on a platform without prctl
    expected = None if sys.argv[4] == "parent" else int(sys.argv[4])
    how = orphans.end_with_parent(expected)
    open(sys.argv[5], "w").write(how)
    time.sleep(120)
    """
)
MIDDLE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
    print(child.pid, flush=True)
    time.sleep(120)
    """
)


def _child_of_killed_parent(tmp_path: Path, how: str) -> tuple[str, float]:
    """Starts middle -> child, kills the middle with SIGKILL once the child watches it; returns how the child
    watched and the seconds from the kill to the child's end."""
    marker, report = tmp_path / "sigterm", tmp_path / "how"
    middle = subprocess.Popen(
        [sys.executable, "-c", MIDDLE, CHILD, str(ORPHANS), str(marker), how, "parent", str(report)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        child = psutil.Process(int(middle.stdout.readline()))
        assert child.ppid() == middle.pid
        deadline = time.monotonic() + 60
        while not (report.is_file() and report.read_text()) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        middle.kill()
        middle.wait()
        middle.stdout.close()
    killed = time.monotonic()
    gone, alive = psutil.wait_procs([child], timeout=PROMPT)
    elapsed = time.monotonic() - killed
    for process in alive:
        process.kill()
    assert not alive, f"the child outlived its killed parent by {PROMPT} s"
    assert marker.read_text() == "SIGTERM"  # it ended through its SIGTERM handler
    return report.read_text(), elapsed


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_the_kernel_sends_sigterm_when_the_parent_is_killed(tmp_path):
    how, elapsed = _child_of_killed_parent(tmp_path, "prctl")
    assert how == "prctl"
    assert elapsed < 5


def test_a_watching_thread_sends_sigterm_where_there_is_no_prctl(tmp_path):
    how, elapsed = _child_of_killed_parent(tmp_path, "thread")
    assert how == "thread"
    assert elapsed < 5  # a look every second


def test_a_parent_that_ended_before_the_watch_began_is_caught_at_once(tmp_path):
    """The expected parent is not this process's parent any more (here: a pid that is not its parent)."""
    marker = tmp_path / "sigterm"
    completed = subprocess.run(
        [sys.executable, "-c", CHILD, str(ORPHANS), str(marker), "prctl", str(os.getpid() + 1_000_000), "-"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 143, completed.stderr
    assert marker.read_text() == "SIGTERM"


def test_only_a_launcher_s_processes_are_watched(monkeypatch):
    from modeling_mimco.training import orphans

    for name in orphans.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert not orphans.started_by_launcher() and orphans.end_with_launcher() is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert orphans.started_by_launcher()


# --- accelerate launch killed -------------------------------------------------------------------------------------

STEPS = 12
STAGE2 = ["--head_hidden_size", "32", "--drop_path_rate", "0.1", "--max_train_steps", str(STEPS)]
BATCH = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH)]


def _training_processes(launcher: psutil.Process) -> list[psutil.Process]:
    return [
        process
        for process in launcher.children(recursive=True)
        if any(part.endswith("run_pretraining.py") for part in process.cmdline())
    ]


@pytest.mark.slow
def test_sigkill_of_the_launcher_ends_the_training_processes_with_a_checkpoint(tmp_path):
    """SIGKILL to `accelerate launch` while 2 processes train: they get SIGTERM (their parent's death signal),
    write a checkpoint and exit, within seconds; the lock is free at once, and the run resumed from `latest`
    ends as the uninterrupted run."""
    from modeling_mimco import MimCoConfig, MimCoModel
    from modeling_mimco.configuration_mimco import preset_backbone_kwargs

    teacher = tmp_path / "teacher"
    MimCoModel(MimCoConfig(**preset_backbone_kwargs("tiny"))).save_pretrained(teacher)
    env = _env(tmp_path)
    stage2 = [*COMMON, *STAGE2, "--teacher_name_or_path", str(teacher)]
    args = [*stage2, *BATCH]
    # The uninterrupted run to compare with: one process on the same global batch, which trains as 2 processes do
    # (stage 2 to ~1e-7, tests/test_launch.py), at the cost of one interpreter instead of a launcher and two.
    reference = tmp_path / "uninterrupted"
    big_batch = ["--per_device_train_batch_size", str(PER_PROCESS_BATCH * NUM_PROCESSES)]
    _ok(_single("run_pretraining.py", [*stage2, *big_batch, "--output_dir", str(reference)], env))

    output_dir = tmp_path / "killed"
    accelerate = Path(sys.executable).with_name("accelerate")
    launcher_args = ["--multi_gpu", "--num_processes", str(NUM_PROCESSES), "--num_machines", "1"]
    launcher_args += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    command = [str(accelerate), "launch", *launcher_args, str(SCRIPTS / "run_pretraining.py"), *args]
    command += ["--output_dir", str(output_dir)]
    log = tmp_path / "killed.log"
    with open(log, "w") as output:
        launch = subprocess.Popen(
            command, env={**env, "ACCELERATE_USE_CPU": "1"}, cwd=REPO, stdout=output, stderr=output
        )
    trainers = []
    try:
        deadline = time.monotonic() + 240
        while f"step 1/{STEPS}" not in log.read_text() and launch.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        trainers = _training_processes(psutil.Process(launch.pid))
        # accelerate runs torch's elastic agent in its own process: it is the training processes' parent
        assert len(trainers) == NUM_PROCESSES and {p.ppid() for p in trainers} == {launch.pid}, log.read_text()
    finally:
        launch.kill()  # SIGKILL: the launcher cannot stop its processes itself
        launch.wait()
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(trainers, timeout=PROMPT)
    elapsed = time.monotonic() - killed
    for process in alive:
        process.kill()
    text = log.read_text()
    assert not alive, f"training processes outlived the launcher by {PROMPT} s:\n{text[-3000:]}"
    print(f"training processes ended {elapsed:.1f} s after the launcher's SIGKILL")
    assert "SIGTERM received: checkpoint written, exiting." in text, text[-3000:]
    checkpoint = find_resume_checkpoint(str(output_dir), "latest")
    verify_checkpoint(checkpoint)
    stopped_at = int(Path(checkpoint).name.split("-")[1])
    assert 1 <= stopped_at < STEPS
    print(f"checkpoint written on SIGTERM at step {stopped_at}/{STEPS}")
    assert not (output_dir / "model.safetensors").exists()  # the run had not finished
    lock = OutputDirLock(str(output_dir))
    assert lock.acquire() is None  # free: nothing holds it
    lock.release()

    resume = ["--output_dir", str(output_dir), "--resume_from_checkpoint", "latest"]
    resumed = _ok(_launch("run_pretraining.py", [*args, *resume], env))
    assert "Resumed from" in resumed.stdout and f"at step {stopped_at}" in resumed.stdout, resumed.stdout[-3000:]
    assert [record["step"] for record in _results(output_dir)["log_history"]] == list(range(1, STEPS + 1))
    _assert_same_run(output_dir, reference, ("model.safetensors",))


# --- the demo's first process killed ------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_of_the_demo_ends_its_second_process(tmp_path):
    """SIGKILL to `make demo`'s process while the second one trains pixel MIM: the second ends within seconds."""
    marker = f"demo-orphan-{os.getpid()}-{tmp_path.name}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    env["MIMCO_TEST_RUN"] = marker
    command = [sys.executable, str(REPO / "scripts" / "demo.py"), "--output_dir", str(tmp_path / "demo")]
    demo = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        log = tmp_path / "demo" / "baselines.log"
        deadline = time.monotonic() + 120
        while "Training" not in (log.read_text() if log.is_file() else "") and time.monotonic() < deadline:
            time.sleep(0.5)  # until pixel MIM trains in the second process
        second = [
            process
            for process in psutil.Process(demo.pid).children()
            if any("spawn_main" in part for part in process.cmdline())
        ]
        assert len(second) == 1, [process.cmdline() for process in psutil.Process(demo.pid).children()]
    finally:
        demo.kill()  # SIGKILL: the first process cannot stop the second itself
        demo.wait()
    killed = time.monotonic()
    gone, alive = psutil.wait_procs(second, timeout=PROMPT)
    elapsed = time.monotonic() - killed
    for process in alive:
        process.kill()
    assert not alive, f"the second process outlived the first by {PROMPT} s"
    print(f"the demo's second process ended {elapsed:.1f} s after the first's SIGKILL")
    # and then every process of the run: a loader worker ends once it sees that its process has (torch's own check,
    # every 5 s), which a worker still starting up (a spawned interpreter importing torch) does only when it has
    # started, up to half a minute on a busy 2-core machine; multiprocessing's resource tracker ends after them
    deadline = time.monotonic() + 90
    while processes_with_environment("MIMCO_TEST_RUN", marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_environment("MIMCO_TEST_RUN", marker) == []
