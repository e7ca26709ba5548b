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
runs `main` and returns the exit code. `scripts/<module>.py` runs the same `cli()` from a clone.

Exit codes: 0 done; 1 an expected error (`modeling_mimco.errors`), shown as one `PROGRAM: error: MESSAGE` line on
stderr; 2 a command line that argparse could not parse (with the usage); 143 stopped by SIGTERM after writing a
checkpoint (pre-training). Under a launcher with several processes, the main process prints the `error:` line and
the others exit with the same code silently, except for a lost or hung peer, which every survivor reports.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from modeling_mimco.errors import EXPECTED_ERRORS, ProcessGroupFailure, one_line


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
            program = os.path.basename(sys.argv[0]) or "mimco"
            line = f"{program}: error: {one_line(error)}"
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
    main(sys.argv[1:] if argv is None else argv)
    return 0


def recipe_default(arguments: type, name: str, default: Any) -> Any:
    """The field of a subclass of the dataclass `arguments` that changes only the default of its field `name`.

    A command whose recipe differs from the shared defaults (a stage's batch size, say) subclasses the shared
    arguments with such fields: the flag keeps its help and its place in `--help`, and a caller who builds the
    dataclass in Python gets the same default as the command line.
    """
    return dataclasses.field(default=default, metadata=arguments.__dataclass_fields__[name].metadata)
