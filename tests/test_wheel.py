"""The package as a user installs it: a wheel built from this tree, installed into a separate environment, used from
another directory through its console commands.

The environment reuses the dependencies already installed here (a path entry to this interpreter's site-packages,
after the new environment's own), so the test needs no network; this interpreter's editable install of the package
is not visible there (its `.pth` hook is not run), so everything comes from the wheel.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
COMMANDS = (
    "mimco-contrastive",
    "mimco-pretrain",
    "mimco-finetune",
    "mimco-segment",
    "mimco-probe",
    "mimco-convert",
    "mimco-card",
    "mimco-push",
    "mimco-make-shards",
)


def _run(command: list, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert completed.returncode == 0, f"{command}:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}"
    return completed


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    # no build isolation: the build backend (setuptools) is already installed, and CI should not fetch it again
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, REPO],
        cwd=root,
    )
    (wheel,) = dist.glob("mimco-*.whl")
    environment = root / "env"
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    new_site = Path(
        subprocess.check_output(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True
        ).strip()
    )
    (new_site / "reuse_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheel], cwd=root)
    work = root / "elsewhere"
    work.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    return {"wheel": wheel, "python": python, "bin": environment / "bin", "cwd": work, "env": env}


def test_wheel_ships_the_package_the_commands_and_the_card_template(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    assert "modeling_mimco/hub/templates/model_card.md" in names
    assert "modeling_mimco/commands/run_pretraining.py" in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    text = zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    for command in COMMANDS:
        assert f"{command} = " in text, command


def test_package_is_imported_from_the_wheel_not_from_the_clone(installed):
    completed = _run(
        [installed["python"], "-c", "import modeling_mimco; print(modeling_mimco.__file__)"],
        cwd=installed["cwd"],
        env=installed["env"],
    )
    location = Path(completed.stdout.strip())
    assert REPO not in location.parents, location
    assert installed["bin"].parent in location.parents, location


def test_every_console_command_answers_help(installed):
    # all at once: each start is mostly imports, and two cores run them side by side
    processes = {
        command: subprocess.Popen(
            [installed["bin"] / command, "--help"],
            cwd=installed["cwd"],
            env=installed["env"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in COMMANDS
    }
    for command, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, f"{command}:\n{stderr[-3000:]}"
        assert stdout.startswith(f"usage: {command}"), stdout[:200]


def test_model_card_from_an_installed_wheel(installed):
    checkpoint = installed["cwd"] / "tiny-mimco"
    script = (
        "import modeling_mimco, sys\n"
        "config = modeling_mimco.MimCoConfig(image_size=32, patch_size=4, mask_patch_size=8, hidden_size=32,\n"
        "    num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)\n"
        "modeling_mimco.MimCoModel(config).save_pretrained(sys.argv[1])\n"
    )
    _run([installed["python"], "-c", script, checkpoint], cwd=installed["cwd"], env=installed["env"])
    completed = _run(
        [installed["bin"] / "mimco-card", "--checkpoint_dir", checkpoint], cwd=installed["cwd"], env=installed["env"]
    )
    card = (checkpoint / "README.md").read_text()
    assert "library_name: transformers" in card
    assert "mimco" in card
    assert "Wrote the model card" in completed.stdout


def test_accelerate_launch_of_a_module_from_an_installed_wheel(installed):
    """A wheel has no `scripts/` folder: `accelerate launch -m modeling_mimco.commands.run_pretraining` trains from
    it, and its messages name the console command."""
    teacher = installed["cwd"] / "tiny-teacher"
    script = (
        "import modeling_mimco, sys\n"
        "from modeling_mimco.configuration_mimco import preset_backbone_kwargs\n"
        "config = modeling_mimco.MimCoConfig(**preset_backbone_kwargs('tiny', None))\n"
        "modeling_mimco.MimCoModel(config).save_pretrained(sys.argv[1])\n"
    )
    _run([installed["python"], "-c", script, teacher], cwd=installed["cwd"], env=installed["env"])
    env = {**installed["env"], "HF_HOME": str(installed["cwd"] / "hf_home"), "TQDM_DISABLE": "1"}
    launch = [installed["python"], "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1"]
    module = ["-m", "modeling_mimco.commands.run_pretraining"]
    output_dir = installed["cwd"] / "student"
    args = ["--teacher_name_or_path", teacher, "--output_dir", output_dir, "--model_preset", "tiny"]
    args += ["--head_hidden_size", "32", "--max_train_steps", "1", "--per_device_train_batch_size", "4"]
    args += ["--report_to", "none", "--max_train_samples", "16"]
    _run([*launch, *module, *args], cwd=installed["cwd"], env=env, timeout=600)
    assert (output_dir / "config.json").is_file()
    assert list(output_dir.glob("*.safetensors"))

    completed = subprocess.run(
        [str(part) for part in [*launch, *module, "--no_such_flag"]],
        cwd=installed["cwd"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode != 0
    assert "mimco-pretrain: error:" in completed.stderr, completed.stderr[-2000:]
    assert "usage: mimco-pretrain" in completed.stderr, completed.stderr[-2000:]
