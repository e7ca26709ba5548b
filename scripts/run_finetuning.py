#!/usr/bin/env python
"""Fine-tune a MimCo (or any transformers) ViT for image classification with `transformers.Trainer`.

The program lives in `modeling_mimco/commands/run_finetuning.py` and is installed as the `mimco-finetune` command; this
file runs it from a clone of the repository: `python scripts/run_finetuning.py --help`.
"""

import sys

from modeling_mimco.commands.run_finetuning import cli


if __name__ == "__main__":
    sys.exit(cli())
