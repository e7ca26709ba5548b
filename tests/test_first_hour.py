"""The README's first run, as a new user types it: each console command of the block, in order, from a folder outside
the repository, with tiny overrides appended (the last value of a flag wins), so that each step reads what the one
before it wrote."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Per program: what makes its README line run in seconds (the README's flags stay, these come after them).
TINY_OVERRIDES = {
    "mimco-contrastive": ["--max_train_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none"],
    "mimco-pretrain": ["--max_train_steps", "2", "--per_device_train_batch_size", "8", "--report_to", "none"],
    "mimco-probe": ["--probe_epochs", "2", "--max_train_samples", "64", "--max_eval_samples", "32"],
    "mimco-finetune": [
        "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--save_strategy", "no", "--dataloader_pin_memory", "false",
    ],
}  # fmt: skip


def first_run_commands() -> list[list[str]]:
    """The lines of the README block marked `first-run commands` (continuations joined, comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- first-run commands:.*?-->\n```bash\n(.*?)```", text, re.DOTALL).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line.split() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_first_run_block_uses_console_commands_only():
    programs = [command[0] for command in first_run_commands()]
    assert programs == list(TINY_OVERRIDES), programs


@pytest.mark.slow
def test_the_readme_first_run_runs_in_order_from_an_empty_folder(tmp_path):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for command in first_run_commands():
        program = shutil.which(command[0], path=str(BIN)) or command[0]
        process = subprocess.run(
            [program, *command[1:], *TINY_OVERRIDES[command[0]]],
            cwd=tmp_path,
            env=environment,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert process.returncode == 0, (command, process.stderr[-3000:])
        assert "Traceback" not in process.stderr, (command, process.stderr[-3000:])
    for folder in ("out/teacher", "out/student", "out/finetuned"):
        assert (tmp_path / folder / "config.json").is_file(), folder
    probe = json.loads((tmp_path / "out" / "probe" / "linear_probe_results.json").read_text())
    assert len(probe["models"]) == 3, probe["models"]
    finetuned = json.loads((tmp_path / "out" / "finetuned" / "config.json").read_text())
    assert finetuned["pooling"] == "cls"
