"""The committed model cards (`model_cards/<name>/README.md`) are what `mimco-card` renders from the inputs committed
beside them (`config.json`, `results.json`), with the command line of `make cards`.

A change of the template, of `hub/model_card.py` or of a card's inputs that is not followed by `make cards` fails
here, and so does a card edited by hand. The shipped stage-1 teachers in `model_cards/teachers/` have cards of their
own (`make teachers` writes them with the probe curve added) and are not rendered here.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
CARDS_DIR = ROOT / "model_cards"
# the checkpoints the project documents: the demo's teacher and student, the reproduction's MimCo student
DOCUMENTED = ("mimco-demo-teacher", "mimco-demo-student", "mimco-tiny-cifar10-reproduction")
# the loop of `make cards`, with `$$card` for the folder
MAKE_CARDS_COMMAND = (
    "scripts/make_model_card.py --checkpoint_dir $$card --results_file $$card/results.json \\\n"
    "\t\t\t--hub_model_id your-namespace/$$(basename $$card) --overwrite_output"
)


def committed_cards() -> list[str]:
    """Every `model_cards/<name>/` with a `results.json`: the folders `make cards` renders."""
    return sorted(path.parent.name for path in CARDS_DIR.glob("*/results.json"))


def test_every_documented_checkpoint_has_a_card_and_its_inputs():
    assert set(DOCUMENTED) <= set(committed_cards())
    for name in committed_cards():
        folder = CARDS_DIR / name
        assert {"README.md", "config.json", "results.json"} <= set(os.listdir(folder)), name
        # a card's inputs are small files: no weights are committed for these
        assert not list(folder.glob("*.safetensors")), name
    assert (CARDS_DIR / "README.md").is_file()


def test_make_cards_runs_the_command_line_of_this_test():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "\ncards: " in makefile
    assert MAKE_CARDS_COMMAND in makefile


@pytest.mark.slow
@pytest.mark.parametrize("name", committed_cards())
def test_committed_card_equals_what_mimco_card_renders(tmp_path, name):
    folder = CARDS_DIR / name
    output = tmp_path / "README.md"
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "make_model_card.py")]
        + ["--checkpoint_dir", str(folder), "--results_file", str(folder / "results.json")]
        + ["--hub_model_id", f"your-namespace/{name}", "--output_file", str(output)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    rendered = output.read_bytes()
    committed = (folder / "README.md").read_bytes()
    assert rendered == committed, (
        f"model_cards/{name}/README.md differs from what mimco-card renders from its config.json and results.json; "
        "run `make cards` and commit the result."
    )
