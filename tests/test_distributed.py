"""Two processes under `accelerate launch` (gloo on CPU) compute the same step as one process on the global batch.

Every loss with in-batch negatives gathers them across processes and stage 1's BatchNorm synchronises its statistics,
so DDP over N processes with batch B must match one process with batch N*B: losses and updated weights alike.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "tests" / "helpers" / "distributed_step.py"
NUM_PROCESSES = 2
ATOL = 1e-5
GRADIENT_RTOL, GRADIENT_ATOL = 1e-4, 1e-6


def _load_driver():
    spec = importlib.util.spec_from_file_location("_mimco_distributed_step", DRIVER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


driver = _load_driver()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """One `accelerate launch` of the driver for both stages; returns the folder with the per-rank results."""
    output_dir = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(
        # Without a GPU, `--multi_gpu` alone leaves accelerate in single-process mode (DistributedType.NO) even though
        # it starts two processes; ACCELERATE_USE_CPU makes them one MULTI_CPU group over gloo.
        ACCELERATE_USE_CPU="1",
        OMP_NUM_THREADS="1",
        HF_HOME=str(output_dir / "hf_home"),  # no user accelerate config file
        HF_HUB_OFFLINE="1",
    )
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(NUM_PROCESSES),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        str(DRIVER),
        str(output_dir),
        *driver.STAGES,
    ]
    completed = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert completed.returncode == 0, completed.stdout[-2000:] + completed.stderr[-4000:]
    return output_dir


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _assert_close_state(actual: dict, expected: dict, what: str) -> None:
    assert sorted(actual) == sorted(expected), what
    for name, value in expected.items():
        if value.dtype.is_floating_point:
            difference = (actual[name].double() - value.double()).abs().max().item()
            assert difference <= ATOL, f"{what}: {name} differs by {difference}"
        else:
            assert torch.equal(actual[name], value), f"{what}: {name} differs"


@pytest.mark.slow
@pytest.mark.parametrize("stage", driver.STAGES)
def test_two_processes_match_one_process_on_the_global_batch(launched, stage):
    reference = driver.run_steps(stage)
    start_model = driver.build_model(stage)
    start = start_model.state_dict()
    trainable = sorted(name for name, p in start_model.named_parameters() if p.requires_grad)
    for rank in range(NUM_PROCESSES):
        result = torch.load(launched / f"{stage}-rank{rank}.pt", weights_only=True)
        assert result["world_size"] == NUM_PROCESSES
        assert result["losses"] == pytest.approx(reference["losses"], abs=ATOL, rel=0)
        # every trainable parameter received the all-reduced gradient of the global batch
        assert sorted(result["gradients"]) == sorted(reference["gradients"]) == trainable
        for name, gradient in reference["gradients"].items():
            torch.testing.assert_close(
                result["gradients"][name],
                gradient,
                rtol=GRADIENT_RTOL,
                atol=GRADIENT_ATOL,
                msg=lambda m, n=name, r=rank: f"{stage}, rank {r}, gradient of {n}: {m}",
            )
        _assert_close_state(result["state_dict"], reference["state_dict"], f"{stage}, rank {rank} vs one process")
    # the steps changed the weights, so the comparison is not between two untouched models
    moved = [
        name
        for name, value in start.items()
        if value.is_floating_point() and not torch.equal(value, reference["state_dict"][name])
    ]
    assert moved
    if stage == "stage1":
        # the momentum branch and BatchNorm statistics were updated too, and are compared above
        assert any(name.startswith("momentum_encoder.") for name in moved)
        assert any(name.endswith("running_mean") for name in moved)


@pytest.mark.parametrize("stage", driver.STAGES)
def test_half_the_batch_gives_a_different_step(monkeypatch, stage):
    """Guards the comparison above: a process that saw only its own half (no gathered negatives, no synchronised
    statistics or gradients) would not reproduce the global step."""
    reference = driver.run_steps(stage)
    half = driver.GLOBAL_BATCH // 2
    original = driver.make_batches
    monkeypatch.setattr(driver, "make_batches", lambda s: [{k: v[:half] for k, v in b.items()} for b in original(s)])
    local_only = driver.run_steps(stage)
    assert abs(local_only["losses"][0] - reference["losses"][0]) > ATOL
    gradient_gaps = [(local_only["gradients"][n] - g).abs().max().item() for n, g in reference["gradients"].items()]
    assert max(gradient_gaps) > GRADIENT_ATOL
