"""The command-line programs of the package, one module each, installed as console commands.

| console command     | module                         | what it does                                        |
|---------------------|--------------------------------|-----------------------------------------------------|
| `mimco-contrastive` | `run_contrastive_pretraining`  | stage 1: the MoCo v3 teacher                        |
| `mimco-pretrain`    | `run_pretraining`              | stage 2: the MimCo student against a frozen teacher |
| `mimco-finetune`    | `run_finetuning`               | fine-tuning for classification with the `Trainer`   |
| `mimco-probe`       | `run_linear_probe`             | linear probe, kNN and t-SNE on frozen features      |
| `mimco-convert`     | `convert_checkpoint`           | MoCo v3 / DINO / timm checkpoints to and from MimCo |
| `mimco-card`        | `make_model_card`              | the model card (README.md) of a checkpoint folder   |
| `mimco-push`        | `push_to_hub`                  | upload a checkpoint folder to the Hub               |

Each module has `main(argv)`, which returns what it produced (for tests and for `scripts/demo.py`), and `cli()`,
the console entry point, which returns the exit code. `scripts/<module>.py` runs the same `cli()` from a clone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def run_command(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> int:
    """Runs a command's `main(argv)` (default: the process's arguments) and returns its exit code, 0 on success.

    `main` returns a result object for callers in Python; a console entry point must not hand that object to
    `sys.exit`, which would print it and exit with 1.
    """
    main(sys.argv[1:] if argv is None else argv)
    return 0
