"""The command-line programs of the package, one module each, installed as console commands.

| console command     | module                         | what it does                                        |
|---------------------|--------------------------------|-----------------------------------------------------|
| `mimco-contrastive` | `run_contrastive_pretraining`  | stage 1: the MoCo v3 teacher                        |
| `mimco-pretrain`    | `run_pretraining`              | stage 2: the MimCo student against a frozen teacher |
| `mimco-finetune`    | `run_finetuning`               | fine-tuning for classification with the `Trainer`   |
| `mimco-segment`     | `run_semantic_segmentation`    | UperNet semantic segmentation with the `Trainer`    |
| `mimco-probe`       | `run_linear_probe`             | linear probe, kNN and t-SNE on frozen features      |
| `mimco-convert`     | `convert_checkpoint`           | MoCo v3 / DINO / timm checkpoints to and from MimCo,|
|                     |                                | MimCo to a stock transformers ViT (`--to vit`)      |
| `mimco-card`        | `make_model_card`              | the model card (README.md) of a checkpoint folder   |
| `mimco-push`        | `push_to_hub`                  | upload a checkpoint folder to the Hub               |
| `mimco-make-shards` | `make_shards`                  | a class-folder tree as WebDataset shards            |

Each module has a library function that takes the argument dataclasses in the parser's order and returns what the
command produced (e.g. `run_pretraining.run_pretraining(model_args, data_args, training_args)`), for callers in
Python such as `scripts/demo.py`, `scripts/reproduce.py` and the tests; the dataclasses' defaults are the command
line's. `main(argv)` parses a command line into those dataclasses and calls it; `cli()`, the console entry point,
runs `main` and returns the exit code. `scripts/<module>.py` runs the same `cli()` from a clone, and
`python -m modeling_mimco.commands.<module>` (or `accelerate launch -m modeling_mimco.commands.<module>`) from any
install, a wheel included. The usage and `error:` lines name the program as it was started: the console command,
the script's file name, and under `-m` the console command (`program_name`).

The modules import only the standard library, `transformers`' argument parser and the argument dataclasses at the
top; torch, the models, Accelerate, `datasets` and the data pipeline are imported by the functions that do the work,
so that `--help` and a bad flag answer within a second. `mimco-finetune` and `mimco-segment` take every flag of
`transformers.TrainingArguments`, whose module imports torch: they parse in two phases
(`parse_with_training_arguments`), their own model and data flags first, with `--help`, then the rest into their
`TrainingArguments` subclass once the work starts.

Exit codes: 0 done; 1 an expected error (`modeling_mimco.errors`), shown as one `PROGRAM: error: MESSAGE` line on
stderr; 2 a command line that argparse could not parse (with the usage); 143 stopped by SIGTERM after writing a
checkpoint (pre-training). Under a launcher with several processes, the main process prints the `error:` line and
the others exit with the same code silently, except for a lost or hung peer, which every survivor reports.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from modeling_mimco.errors import EXPECTED_ERRORS, ProcessGroupFailure, one_line


if TYPE_CHECKING:
    from transformers import HfArgumentParser


# module -> console command (setup.cfg's `console_scripts`), the name a module run with `python -m` goes by
CONSOLE_COMMANDS = {
    "modeling_mimco.commands.run_contrastive_pretraining": "mimco-contrastive",
    "modeling_mimco.commands.run_pretraining": "mimco-pretrain",
    "modeling_mimco.commands.run_finetuning": "mimco-finetune",
    "modeling_mimco.commands.run_semantic_segmentation": "mimco-segment",
    "modeling_mimco.commands.run_linear_probe": "mimco-probe",
    "modeling_mimco.commands.convert_checkpoint": "mimco-convert",
    "modeling_mimco.commands.make_model_card": "mimco-card",
    "modeling_mimco.commands.push_to_hub": "mimco-push",
    "modeling_mimco.commands.make_shards": "mimco-make-shards",
}


def program_name() -> str:
    """The program's name as its messages give it: the console command (`mimco-pretrain`) or the script
    (`run_pretraining.py`) as the user started it, and the console command for a module run with `python -m` or
    `accelerate launch -m`, whose `sys.argv[0]` is the module's file path."""
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if main_spec is not None and main_spec.name in CONSOLE_COMMANDS:
        return CONSOLE_COMMANDS[main_spec.name]
    return os.path.basename(sys.argv[0]) or "mimco"


def argument_parser(dataclass_types, **kwargs) -> HfArgumentParser:
    """The `HfArgumentParser` of a command's argument dataclasses, under the program's name (`program_name`);
    `kwargs` go to `argparse.ArgumentParser` (`allow_abbrev`, `epilog`, `usage`, `formatter_class`...)."""
    from transformers import HfArgumentParser

    return HfArgumentParser(dataclass_types, prog=program_name(), **kwargs)


TRAINING_HELP_FLAG = "--help_training"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (as `HfArgumentParser`'s), the epilog's lines as written."""


class _ShowTrainingHelp(argparse.Action):
    """`--help_training`: prints the help of every training flag (phase 2's parser) and exits, as `--help` does."""

    def __init__(self, option_strings, dest, training_arguments: Callable[[], type], help: str | None = None):
        super().__init__(option_strings, argparse.SUPPRESS, nargs=0, default=argparse.SUPPRESS, help=help)
        self.training_arguments = training_arguments

    def __call__(self, parser, namespace, values, option_string=None):
        training_parser(self.training_arguments()).print_help()
        parser.exit()


def training_epilog(training_defaults: dict[str, Any], width: int = 100) -> str:
    """The end of a two-phase command's `--help`: every `TrainingArguments` flag is accepted, the recipe's defaults
    (`training_defaults`, the dict its `TrainingArguments` subclass reads), and how to see all training flags."""
    lines, line = [], " "
    for name, value in training_defaults.items():
        item = f"--{name} {value}"
        if len(line) + 2 + len(item) > width and line.strip():
            lines.append(line)
            line = " "
        line += " " + item
    lines.append(line)
    return "\n".join(
        [
            "Training flags: every flag of transformers' TrainingArguments is accepted too (--output_dir,",
            "--max_steps, --seed, --report_to, --push_to_hub, ...). The recipe's defaults, where they differ from",
            "transformers':",
            *lines,
            f"All training flags with their help: {program_name()} {TRAINING_HELP_FLAG} (slower: it imports torch).",
        ]
    )


def training_parser(training_arguments: type) -> HfArgumentParser:
    """Phase 2's parser: the command's `TrainingArguments` subclass alone, with a short usage line."""
    usage = f"%(prog)s [model and data flags: --help] [TrainingArguments flags: {TRAINING_HELP_FLAG}]"
    return argument_parser(training_arguments, usage=usage)


def parse_with_training_arguments(
    dataclass_types: tuple[type, ...],
    training_arguments: Callable[[], type],
    training_defaults: dict[str, Any],
    argv: list[str] | None = None,
) -> tuple:
    """Parses the command line of a command that takes every flag of transformers' `TrainingArguments`, in two
    phases, so that `--help` and a bad model or data flag answer without importing torch.

    Phase 1 reads the command's own dataclasses (`dataclass_types`, from modules that import no torch), with
    `--help` (whose epilog lists the recipe's `training_defaults`) and `--help_training`, and leaves every other
    string; it takes no abbreviation, so that it never swallows an abbreviated training flag. Phase 2 imports the
    `TrainingArguments` subclass (`training_arguments()`; transformers' `training_args` imports torch) and reads the
    rest into it; what it does not know is refused as argparse refuses an unknown flag (exit code 2). Returns the
    dataclasses in order, the training arguments last.
    """
    parser = argument_parser(
        dataclass_types, allow_abbrev=False, epilog=training_epilog(training_defaults), formatter_class=_HelpFormatter
    )
    parser.add_argument(
        TRAINING_HELP_FLAG,
        TRAINING_HELP_FLAG.replace("_", "-"),
        action=_ShowTrainingHelp,
        training_arguments=training_arguments,
        help="Show every training flag (transformers' TrainingArguments, with this recipe's defaults) and exit.",
    )
    *own, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    phase_two = training_parser(training_arguments())
    _, unknown = phase_two.parse_known_args(remaining)  # refused before the arguments are built and checked
    if unknown:
        phase_two.error(f"unrecognized arguments: {' '.join(unknown)}")
    # the `.args` file next to the program, if any, was read by phase 1: its training flags are in `remaining`
    (training_args,) = phase_two.parse_args_into_dataclasses(args=remaining, look_for_args_file=False)
    return (*own, training_args)


def reports_errors(main: Callable[[list[str] | None], object]) -> Callable[[list[str] | None], object]:
    """Wraps a command's `main(argv)` so that an expected error ends the program with one line.

    This is the one place where expected errors (`modeling_mimco.errors.EXPECTED_ERRORS`) become
    `PROGRAM: error: MESSAGE` (raised as `SystemExit`, so exit code 1 and the line on stderr), for every command;
    a new command gets it by decorating its `main`. Other exceptions are bugs and keep their traceback.

    Under a launcher (`accelerate launch`, `torchrun`) every process meets the same refusal; only the main process
    prints it, the others exit with the same code silently. A `ProcessGroupFailure` (another process died or hung)
    is printed by every process that sees it, which then ends at once (`os._exit`): its process group can hang in
    the teardown of a normal exit.
    """

    @functools.wraps(main)
    def main_reporting_errors(argv: list[str] | None = None):
        try:
            return main(argv)
        except EXPECTED_ERRORS as error:
            if os.environ.get("MIMCO_TRACEBACK"):
                raise
            sys.stdout.flush()
            line = f"{program_name()}: error: {one_line(error)}"
            if isinstance(error, ProcessGroupFailure):
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
                os._exit(1)
            if not _is_main_process():
                raise SystemExit(1) from None
            raise SystemExit(line) from None

    return main_reporting_errors


def _is_main_process() -> bool:
    """Whether this is the main process of a launch: rank 0 of the process group where one exists, else of the
    launcher's `RANK` (set for every process it starts), without creating a process group."""
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def run_command(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Runs a command's `main(argv)` (default: the process's arguments) and returns 0; errors exit on their own.

    `main` returns a result object for callers in Python; a console entry point must not hand that object to
    `sys.exit`, which would print it and exit with 1.
    """
    plain_library_logs()
    show_package_info()
    main(sys.argv[1:] if argv is None else argv)
    return 0


_TERMINAL_CODES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _WithoutTerminalCodes(logging.Filter):
    """Removes terminal escape codes (transformers' bold `LOAD REPORT` title) from the records a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "\x1b[" in message:
            record.msg, record.args = _TERMINAL_CODES.sub("", message), None
        return True


class _UntilLoggingIsSetUp(logging.StreamHandler):
    """Writes the package's records on stderr, the message alone (as Python's last-resort handler writes
    warnings), until the program sets up logging itself (a root handler: `logging.basicConfig`), which then writes
    them."""

    def emit(self, record: logging.LogRecord) -> None:
        if not logging.getLogger().handlers:
            super().emit(record)


def show_package_info() -> None:
    """Lets the main process show the package's info lines (what a folder reads: `Reading N images in C classes
    from DIR`) where no logging is set up yet; warnings are shown as before, in every process."""
    package = logging.getLogger("modeling_mimco")
    if not any(isinstance(handler, _UntilLoggingIsSetUp) for handler in package.handlers):
        package.addHandler(_UntilLoggingIsSetUp())
    if package.level == logging.NOTSET and os.environ.get("RANK", "0") == "0":
        package.setLevel(logging.INFO)


def plain_library_logs() -> None:
    """Makes transformers' log handler write plain text where its stream is no terminal (a log file, a pipe): no
    raw escape codes such as `\\x1b[1m` end up in the file. Called by `run_command` for every console command."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.get_logger()  # sets up the library's handler
    for handler in logging.getLogger("transformers").handlers:
        stream = getattr(handler, "stream", None)
        is_terminal = stream is not None and hasattr(stream, "isatty") and stream.isatty()
        if not is_terminal and not any(isinstance(item, _WithoutTerminalCodes) for item in handler.filters):
            handler.addFilter(_WithoutTerminalCodes())


def recipe_default(arguments: type, name: str, default: Any) -> Any:
    """The field of a subclass of the dataclass `arguments` that changes only the default of its field `name`.

    A command whose recipe differs from the shared defaults (a stage's batch size, say) subclasses the shared
    arguments with such fields: the flag keeps its help and its place in `--help`, and a caller who builds the
    dataclass in Python gets the same default as the command line.
    """
    return dataclasses.field(default=default, metadata=arguments.__dataclass_fields__[name].metadata)
