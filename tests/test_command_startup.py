"""The console commands answer `--help` and reject a bad flag without importing torch: the modules import the
argument dataclasses and transformers' argument parser only, and defer torch, the models, Accelerate, `datasets`
and the data pipeline to the functions that do the work. `mimco-finetune` and `mimco-segment`, which take every flag
of `transformers.TrainingArguments` (whose module imports torch), parse in two phases: their own model and data flags
(and `--help`) without torch, then the rest into their `TrainingArguments` subclass; a training flag still reaches
it, and a misspelt one is refused with one line.

Each check runs in a fresh interpreter, as the console command would; no wall-clock time is asserted."""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from modeling_mimco.commands import CONSOLE_COMMANDS


REPO = Path(__file__).resolve().parents[1]
LIGHT_COMMANDS = (
    "run_contrastive_pretraining",
    "run_pretraining",
    "run_linear_probe",
    "convert_checkpoint",
    "make_model_card",
    "push_to_hub",
    "make_shards",
    "run_finetuning",
    "run_semantic_segmentation",
)
TWO_PHASE_COMMANDS = {
    # module: (the function `main` hands the parsed arguments to, the recipe's training defaults)
    "run_finetuning": ("run_finetuning", "FINETUNING_TRAINING_DEFAULTS"),
    "run_semantic_segmentation": ("run_semantic_segmentation", "SEGMENTATION_TRAINING_DEFAULTS"),
}
# a flag that is refused without importing torch: an unknown one, or, where phase 2 takes unknown flags (the training
# flags), a bad value of one of the command's own flags
BAD_FLAG = {"run_finetuning": "--image_size=abc", "run_semantic_segmentation": "--crop_size=abc"}
HEAVY = ("torch", "accelerate", "datasets", "torchvision")

CHECK = textwrap.dedent(
    """
    import contextlib, io, sys
    module_name, flag = sys.argv[1], sys.argv[2]
    module = __import__(f"modeling_mimco.commands.{module_name}", fromlist=["cli"])
    sys.argv = ["mimco-test", flag]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            module.cli()
    except SystemExit as exit:
        code = exit.code
    else:
        code = 0
    print(code)
    print(" ".join(name for name in sys.argv[3:] if name in sys.modules))
    print(out.getvalue())
    """
)


def _run_check(module: str, flag: str) -> tuple[str, list[str], str]:
    completed = subprocess.run(
        [sys.executable, "-c", CHECK, module, flag, *HEAVY],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    code, loaded, output = completed.stdout.split("\n", 2)
    return code, loaded.split(), output


@pytest.mark.parametrize("module", LIGHT_COMMANDS)
def test_help_imports_no_torch(module):
    code, loaded, output = _run_check(module, "--help")
    assert code == "0", output
    assert output.startswith("usage: mimco-test"), output[:300]
    assert loaded == [], f"--help of {module} imported {loaded}"


@pytest.mark.parametrize("module", LIGHT_COMMANDS)
def test_unknown_flag_imports_no_torch(module):
    code, loaded, output = _run_check(module, BAD_FLAG.get(module, "--no_such_flag"))
    assert code == "2", output
    assert "mimco-test: error:" in output, output[-500:]
    assert loaded == [], f"an unknown flag of {module} imported {loaded}"


@pytest.mark.parametrize("module", TWO_PHASE_COMMANDS)
def test_help_lists_the_recipes_training_defaults(module):
    code, loaded, output = _run_check(module, "-h")
    assert code == "0", output
    assert "every flag of transformers' TrainingArguments is accepted" in output, output[-1500:]
    assert "--help_training" in output and "--weight_decay 0.05" in output, output[-1500:]
    assert loaded == [], f"-h of {module} imported {loaded}"


REACH_TRAINING_ARGUMENTS = textwrap.dedent(
    """
    import dataclasses, sys
    from modeling_mimco.evaluation import recipes
    module_name, function, defaults = sys.argv[1:4]
    module = __import__(f"modeling_mimco.commands.{module_name}", fromlist=["cli"])
    def show(model_args, data_args, training_args):
        fields = {field.name: field.default for field in dataclasses.fields(training_args)}
        same = all(fields[name] == value for name, value in getattr(recipes, defaults).items())
        print(type(training_args).__name__, training_args.learning_rate, training_args.max_steps, same)
    setattr(module, function, show)  # main hands the parsed arguments to it: nothing is trained
    sys.argv = ["mimco-test", *sys.argv[4:]]
    module.cli()
    """
)


@pytest.mark.parametrize("module", TWO_PHASE_COMMANDS)
def test_a_training_flag_reaches_the_training_arguments(module, tmp_path):
    function, defaults = TWO_PHASE_COMMANDS[module]
    flags = ["--learning_rate", "0.5", "--max_steps", "1", "--output_dir", str(tmp_path), "--report_to", "none"]
    completed = subprocess.run(
        [sys.executable, "-c", REACH_TRAINING_ARGUMENTS, module, function, defaults, *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    name = "FineTuningArguments" if module == "run_finetuning" else "SegmentationTrainingArguments"
    # the field defaults of the TrainingArguments subclass are the dict `--help` lists
    assert completed.stdout.split()[-4:] == [name, "0.5", "1", "True"], completed.stdout[-1000:]


@pytest.mark.parametrize("module", TWO_PHASE_COMMANDS)
def test_a_misspelt_training_flag_is_refused_with_one_line(module, tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", f"modeling_mimco.commands.{module}", "--learnin_rate", "1", "--max_steps", "1"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr, completed.stderr[-3000:]
    errors = [line for line in completed.stderr.splitlines() if "error:" in line]
    command = CONSOLE_COMMANDS[f"modeling_mimco.commands.{module}"]
    assert errors == [f"{command}: error: unrecognized arguments: --learnin_rate 1"], completed.stderr[-3000:]
    assert not any(tmp_path.iterdir())


def test_help_training_lists_every_training_flag():
    completed = subprocess.run(
        [sys.executable, "-m", "modeling_mimco.commands.run_finetuning", "--help_training"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.startswith("usage: mimco-finetune"), completed.stdout[:300]
    for flag in ("--learning_rate", "--adam_beta1", "--gradient_accumulation_steps", "--ddp_timeout"):
        assert flag in completed.stdout, flag
    words = " ".join(completed.stdout.split())
    assert "--learning_rate LEARNING_RATE, --learning-rate LEARNING_RATE Peak" in words  # the recipe's field
    assert "(default: 0.001)" in words


def test_package_import_is_light():
    completed = subprocess.run(
        [sys.executable, "-c", "import sys, modeling_mimco; print('torch' in sys.modules)"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.stdout.strip() == "False", completed.stderr[-3000:]


def test_public_names_load_and_register_the_auto_classes():
    script = textwrap.dedent(
        """
        import modeling_mimco
        from transformers import AutoConfig, AutoModel
        model_class = modeling_mimco.MimCoModel
        config = AutoConfig.for_model("mimco", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, image_size=32, patch_size=8)
        assert type(AutoModel.from_config(config)) is model_class
        print("ok")
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.stdout.strip() == "ok", completed.stderr[-3000:]


def test_a_model_imported_from_its_module_still_saves_its_remote_code(tmp_path):
    """The Auto-class registration is lazy, but every `save_pretrained` writes the `auto_map` and the model files
    however the class was imported (here from its module, the package's public names never touched)."""
    script = textwrap.dedent(
        f"""
        import json, os, modeling_mimco
        from modeling_mimco.configuration_mimco import MimCoConfig
        from modeling_mimco.modeling_mimco import MimCoModel
        config = MimCoConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8, mask_patch_size=8)
        MimCoModel(config).save_pretrained({str(tmp_path)!r})
        saved = json.load(open(os.path.join({str(tmp_path)!r}, "config.json")))
        print(modeling_mimco._registered, saved["auto_map"]["AutoModel"], sorted(os.listdir({str(tmp_path)!r})))
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    registered, auto_model, files = completed.stdout.strip().split(" ", 2)
    assert registered == "False" and auto_model == "modeling_mimco.MimCoModel"
    assert "'modeling_mimco.py'" in files and "'configuration_mimco.py'" in files


def test_console_command_names_match_setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(REPO / "setup.cfg")
    scripts = {}
    for line in parser["options.entry_points"]["console_scripts"].strip().splitlines():
        name, target = (part.strip() for part in line.split("="))
        scripts[target.split(":")[0]] = name
    assert scripts == CONSOLE_COMMANDS
